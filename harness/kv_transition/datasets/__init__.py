"""Dataset sources: LongBench (v1 and LongBench-E; official data.zip, parquet copies, kvpress's mirror),
LongBench v2 and offline synthetic retrieval tasks.

All produce canonical :class:`~kv_transition.datasets.schema.Example` values. Importing this
package has no side effects and does not import ``datasets`` (that happens only when parquet is
actually read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from kv_transition.datasets.schema import Example, stable_id

__all__ = ["Example", "stable_id", "load_examples", "list_tasks", "provenance"]


def load_examples(
    dataset_cfg: Any, data_root: Path, count_tokens: Callable[[str], int],
    progress: Optional[Callable[[str, int, Optional[int]], None]] = None,
) -> list[Example]:
    """Load or generate the examples of a ``DatasetCfg``, dispatching on ``dataset_cfg.source``.

    ``count_tokens`` (the model tokenizer's count) sizes synthetic contexts; LongBench ignores it.
    ``progress`` (stage, advance, total) sees the bytes of a first download.
    """
    from kv_transition.errors import DataError

    if dataset_cfg.source == "synthetic":
        from kv_transition.datasets.synthetic import generate_synthetic

        return generate_synthetic(dataset_cfg.synthetic, count_tokens)
    if dataset_cfg.source == "longbench":
        from kv_transition.datasets.longbench import load_longbench

        return load_longbench(dataset_cfg.longbench, Path(data_root), progress)
    if dataset_cfg.source == "longbench_v2":
        from kv_transition.datasets.longbench_v2 import load_longbench_v2

        return load_longbench_v2(dataset_cfg.longbench_v2, Path(data_root), progress)
    raise DataError(f"unknown dataset.source {dataset_cfg.source!r} (valid: synthetic, longbench, longbench_v2)")


def provenance(dataset_cfg: Any, data_root: Path) -> list[dict[str, Any]]:
    """The downloaded/local data files behind the loaded examples, with their sha256 (for the manifest)."""
    if dataset_cfg.source == "longbench":
        from kv_transition.datasets.longbench import provenance as lb

        return lb(dataset_cfg.longbench, Path(data_root))
    if dataset_cfg.source == "longbench_v2":
        from kv_transition.datasets.longbench_v2 import provenance as v2

        return v2(dataset_cfg.longbench_v2, Path(data_root))
    return []


def list_tasks() -> list[dict[str, Any]]:
    """One row per known task, for `kvt datasets list`."""
    from kv_transition.datasets import longbench_v2
    from kv_transition.datasets.longbench import KVPRESS_MIRROR_TASKS, TASKS
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
            "kvpress_mirror": name in KVPRESS_MIRROR_TASKS,
        })
    rows.append({
        "name": longbench_v2.TASK,
        "source": "longbench_v2",
        "language": "en",
        "metric": longbench_v2.METRIC,
        "category": "multiple_choice",
        "longbench_e": False,
        "chat_template": True,
        "kvpress_mirror": False,
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
            "kvpress_mirror": False,
        })
    return rows
