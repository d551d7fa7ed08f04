"""kvpress engine (filled by the engine work)."""
