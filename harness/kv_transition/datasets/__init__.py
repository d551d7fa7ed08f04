"""Dataset sources: LongBench (v1 and LongBench-E) and offline synthetic retrieval tasks.

Both produce canonical :class:`~kv_transition.datasets.schema.Example` values. Importing this
package has no side effects and does not import ``datasets`` (that happens only when parquet is
actually read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kv_transition.datasets.schema import Example, stable_id

__all__ = ["Example", "stable_id", "load_examples", "list_tasks"]


def load_examples(dataset_cfg: Any, data_root: Path, count_tokens: Callable[[str], int]) -> list[Example]:
    """Load or generate the examples of a ``DatasetCfg``, dispatching on ``dataset_cfg.source``.

    ``count_tokens`` (the model tokenizer's count) sizes synthetic contexts; LongBench ignores it.
    """
    from kv_transition.errors import DataError

    if dataset_cfg.source == "synthetic":
        from kv_transition.datasets.synthetic import generate_synthetic

        return generate_synthetic(dataset_cfg.synthetic, count_tokens)
    if dataset_cfg.source == "longbench":
        from kv_transition.datasets.longbench import load_longbench

        return load_longbench(dataset_cfg.longbench, Path(data_root))
    raise DataError(f"unknown dataset.source {dataset_cfg.source!r} (valid: synthetic, longbench)")


def list_tasks() -> list[dict[str, Any]]:
    """One row per known task, for `kvt datasets list`."""
    from kv_transition.datasets.longbench import TASKS
    from kv_transition.datasets.synthetic import SYNTHETIC_METRICS, SYNTHETIC_TASKS

    rows: list[dict[str, Any]] = []
    for name, info in TASKS.items():
        rows.append({
            "name": name,
            "source": "longbench",
            "language": info.language,
            "metric": info.metric,
            "category": info.category,
            "longbench_e": info.longbench_e,
            "chat_template": info.chat_template,
        })
    for name in SYNTHETIC_TASKS:
        rows.append({
            "name": name,
            "source": "synthetic",
            "language": "en",
            "metric": SYNTHETIC_METRICS[name],
            "category": "retrieval",
            "longbench_e": False,
            "chat_template": True,
        })
    return rows
