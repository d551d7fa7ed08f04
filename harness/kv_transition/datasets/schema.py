"""The canonical example every dataset source is turned into.

An example is a plain, JSON-serialisable value. Its id is derived from its content
(source, task and the source's own id or the generator's parameters), so it is the same on
every run and machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


def stable_id(*parts: Any) -> str:
    """A short deterministic id from JSON-serialisable parts (sha256, 16 hex chars)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Example:
    """One scorable example.

    meta always carries: source ("longbench" | "synthetic"), task, language.
    LongBench adds: length (its own word/char count), all_classes, orig_id (the `_id`).
    Synthetic adds: target_tokens, depth, seed and the generator parameters.
    """

    example_id: str
    question: str
    context: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Example":
        return cls(
            example_id=d["example_id"],
            question=d["question"],
            context=d["context"],
            answers=list(d["answers"]),
            meta=dict(d.get("meta") or {}),
        )
