"""Scoring of recorded responses: the official LongBench metrics, LongBench v2 accuracy (score/longbench_v2.py)
and the synthetic-task metrics.

``score_longbench(task, prediction, answers, all_classes=None) -> float`` gives, for one example, the
number LongBench's eval.py adds up (in [0, 1]; eval.py reports ``round(100 * mean, 2)`` per task).
"""

from kv_transition.score.longbench_v2 import extract_answer, score_v2
from kv_transition.score.metrics import (
    FIRST_LINE_TASKS,
    FLAG_NO_ANSWERS,
    FLAG_ROUGE_EMPTY,
    FLAG_ROUGE_RECURSION,
    LONGBENCH_E_BASE_TASKS,
    LONGBENCH_METRIC,
    METRIC_FUNCTIONS,
    SYNTHETIC_METRIC_NAMES,
    TASK_METRIC,
    base_task,
    longbench_e_bucket,
    score_example,
    score_longbench,
    score_longbench_detailed,
    score_synthetic,
)

__all__ = [
    "FIRST_LINE_TASKS",
    "FLAG_NO_ANSWERS",
    "FLAG_ROUGE_EMPTY",
    "FLAG_ROUGE_RECURSION",
    "LONGBENCH_E_BASE_TASKS",
    "LONGBENCH_METRIC",
    "METRIC_FUNCTIONS",
    "SYNTHETIC_METRIC_NAMES",
    "TASK_METRIC",
    "base_task",
    "extract_answer",
    "longbench_e_bucket",
    "score_example",
    "score_longbench",
    "score_longbench_detailed",
    "score_synthetic",
    "score_v2",
]
