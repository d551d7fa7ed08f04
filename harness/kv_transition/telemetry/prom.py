"""Prometheus text exposition format (0.0.4) → samples. Pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class PromSample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    @property
    def labels_dict(self) -> dict[str, str]:
        return dict(self.labels)


_ESC = {"\\": "\\", '"': '"', "n": "\n"}


def _parse_labels(s: str, i: int) -> tuple[tuple[tuple[str, str], ...], int]:
    """s[i] == '{'; returns labels and the index after '}'."""
    labels: list[tuple[str, str]] = []
    i += 1
    n = len(s)
    while True:
        while i < n and s[i] in " \t,":
            i += 1
        if i >= n:
            raise ValueError("unterminated label set")
        if s[i] == "}":
            return tuple(labels), i + 1
        j = s.index("=", i)
        key = s[i:j].strip()
        i = j + 1
        while s[i] in " \t":
            i += 1
        if s[i] != '"':
            raise ValueError(f"label {key!r}: value not quoted")
        i += 1
        buf = []
        while True:
            ch = s[i]
            if ch == "\\":
                buf.append(_ESC.get(s[i + 1], "\\" + s[i + 1]))
                i += 2
            elif ch == '"':
                i += 1
                break
            else:
                buf.append(ch)
                i += 1
        labels.append((key, "".join(buf)))


def parse_value(tok: str) -> float:
    t = tok.strip()
    low = t.lower()
    if low in ("nan",):
        return math.nan
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    return float(t)


def parse_prometheus(text: str, names: Optional[Iterable[str]] = None) -> list[PromSample]:
    """Parse every sample line (comments/HELP/TYPE skipped); keep only `names` when given.
    Malformed lines are skipped, never fatal."""
    want = set(names) if names is not None else None
    out: list[PromSample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        k = 0
        n = len(line)
        while k < n and line[k] not in "{ \t":
            k += 1
        name = line[:k]
        if want is not None and name not in want:
            continue
        try:
            if k < n and line[k] == "{":
                labels, k = _parse_labels(line, k)
            else:
                labels = ()
            rest = line[k:].split()
            if not rest:
                continue
            value = parse_value(rest[0])  # rest[1], if any, is a timestamp (ignored: we stamp at scrape)
        except (ValueError, IndexError):
            continue
        out.append(PromSample(name, labels, value))
    return out
