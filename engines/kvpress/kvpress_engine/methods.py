"""Method catalog, request-level press specification and budget math.

Pure Python: importing this module must not import torch or kvpress, so the argument parsing,
validation and budget arithmetic can be unit-tested (and used by tools) without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SCOPES = ("query_aware", "context_only")


class PressSpecError(ValueError):
    """A kv_press specification that cannot be served (maps to HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class MethodInfo:
    name: str
    press_class: str | None  # kvpress class name; None for "full"
    params: dict[str, Any]  # parameter -> engine default
    attn: str | None = None  # "eager": needs attention weights; "no_eager": per-layer budgets need sdpa
    # the compressed span must hold more than this many tokens (window / sink sizes), else no compression
    min_tokens_param: tuple[str, ...] = ()
    description: str = ""


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("full", None, {}, description="no compression (baseline)"),
        MethodInfo(
            "snapkv",
            "SnapKVPress",
            {"window_size": 64, "kernel_size": 5},
            min_tokens_param=("window_size",),
            description="SnapKV: attention of the last window_size queries, pooled",
        ),
        MethodInfo(
            "streamingllm",
            "StreamingLLMPress",
            {"n_sink": 4},
            min_tokens_param=("n_sink",),
            description="StreamingLLM: keep n_sink first tokens and the most recent ones",
        ),
        MethodInfo(
            "observed_attention",
            "ObservedAttentionPress",
            {},
            attn="eager",
            description="H2O-style: average attention each key received during prefill (eager attention)",
        ),
        MethodInfo(
            "pyramidkv",
            "PyramidKVPress",
            {"window_size": 64, "kernel_size": 5, "beta": 20},
            attn="no_eager",
            min_tokens_param=("window_size",),
            description="PyramidKV: SnapKV scores with per-layer pyramid budgets",
        ),
        MethodInfo("knorm", "KnormPress", {}, description="keep keys with the smallest L2 norm"),
        MethodInfo("tova", "TOVAPress", {}, description="TOVA: attention of the last token, averaged over heads"),
        MethodInfo(
            "expected_attention",
            "ExpectedAttentionPress",
            {"n_future_positions": 512, "n_sink": 4, "use_covariance": True, "use_vnorm": True, "epsilon": 0.0},
            min_tokens_param=("n_sink",),
            description="expected attention of future queries (query statistics + averaged RoPE)",
        ),
        MethodInfo("random", "RandomPress", {"seed": 0}, description="random eviction (control); seeded"),
    ]
}

# parameter name -> expected python type (bool before int: bool is an int subclass)
PARAM_TYPES: dict[str, type] = {
    "window_size": int,
    "kernel_size": int,
    "beta": int,
    "n_sink": int,
    "n_future_positions": int,
    "use_covariance": bool,
    "use_vnorm": bool,
    "epsilon": float,
    "seed": int,
}

KV_PRESS_KEYS = {"method", "compression_ratio", "budget", "scope", "question_start", *PARAM_TYPES}


@dataclass
class PressSpec:
    """What the client (or the server default) asked for."""

    method: str = "full"
    compression_ratio: float | None = None
    budget: int | None = None
    scope: str = "query_aware"
    question_start: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def info(self) -> MethodInfo:
        return METHODS[self.method]

    @property
    def semantics(self) -> str:
        if self.method == "full":
            return "none"
        return "budget" if self.budget is not None else "ratio"


def _check_param(name: str, value: Any, where: str) -> Any:
    typ = PARAM_TYPES[name]
    if typ is bool:
        if not isinstance(value, bool):
            raise PressSpecError(f"{name} must be a boolean", f"{where}.{name}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PressSpecError(f"{name} must be an integer", f"{where}.{name}")
        if name == "seed":
            return value
        if name == "kernel_size":
            if value < 1 or value % 2 == 0:
                raise PressSpecError("kernel_size must be a positive odd integer", f"{where}.{name}")
            return value
        lo = 0 if name == "n_sink" else 1
        if value < lo:
            raise PressSpecError(f"{name} must be >= {lo}", f"{where}.{name}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PressSpecError(f"{name} must be a finite number", f"{where}.{name}")
    if value < 0:
        raise PressSpecError(f"{name} must be >= 0", f"{where}.{name}")
    return float(value)


def validate_ratio(value: Any, param: str = "kv_press.compression_ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PressSpecError("compression_ratio must be a number in [0, 1)", param)
    if not 0 <= value < 1:
        raise PressSpecError(f"compression_ratio must be in [0, 1), got {value}", param)
    return float(value)


def validate_budget(value: Any, param: str = "kv_press.budget") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise PressSpecError("budget must be a positive integer (tokens)", param)
    if value <= 0:
        raise PressSpecError(f"budget must be > 0 tokens, got {value}", param)
    return value


def resolve_press_spec(default: PressSpec, override: dict[str, Any] | None) -> PressSpec:
    """Merge a request's ``kv_press`` object over the server default and validate the result.

    Rules: ``method`` in the request replaces the default method; ``compression_ratio`` and ``budget`` are
    mutually exclusive in one request and a request giving either replaces both defaults; method parameters
    given in the request win over the server's flags, which win over the method's defaults; parameters a
    method does not take are rejected when given in the request (ignored when they come from server flags).
    """
    where = "kv_press"
    if override is None:
        override = {}
    if not isinstance(override, dict):
        raise PressSpecError("kv_press must be an object", where)
    unknown = sorted(set(override) - KV_PRESS_KEYS)
    if unknown:
        raise PressSpecError(f"unknown kv_press field(s): {', '.join(unknown)}", f"{where}.{unknown[0]}")

    method = override.get("method", default.method)
    if not isinstance(method, str) or method not in METHODS:
        raise PressSpecError(
            f"unknown method {method!r}; known methods: {', '.join(METHODS)}", f"{where}.method"
        )
    info = METHODS[method]

    if "compression_ratio" in override and "budget" in override:
        if override["compression_ratio"] is not None and override["budget"] is not None:
            raise PressSpecError("give either compression_ratio or budget, not both", f"{where}.budget")
    ratio, budget = default.compression_ratio, default.budget
    if override.get("compression_ratio") is not None:
        ratio, budget = validate_ratio(override["compression_ratio"]), None
    elif override.get("budget") is not None:
        ratio, budget = None, validate_budget(override["budget"])
    else:
        if ratio is not None:
            ratio = validate_ratio(ratio)
        if budget is not None:
            budget = validate_budget(budget)

    scope = override.get("scope", default.scope)
    if scope not in SCOPES:
        raise PressSpecError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}", f"{where}.scope")
    question_start = override.get("question_start", None if "scope" in override else default.question_start)
    if question_start is not None:
        if isinstance(question_start, bool) or not isinstance(question_start, int) or question_start < 0:
            raise PressSpecError("question_start must be a non-negative integer", f"{where}.question_start")
    if scope == "context_only" and question_start is None:
        raise PressSpecError(
            "scope context_only needs question_start (where the question begins in the prompt)",
            f"{where}.question_start",
        )

    params: dict[str, Any] = {}
    for name, dflt in info.params.items():
        value = dflt
        if name in default.params and default.params[name] is not None:
            value = default.params[name]
        if name in override and override[name] is not None:
            value = override[name]
        params[name] = _check_param(name, value, where)
    for name in PARAM_TYPES:
        if name in override and override[name] is not None and name not in info.params:
            raise PressSpecError(f"method {method!r} takes no parameter {name!r}", f"{where}.{name}")

    if method == "full":
        if override.get("budget") is not None or (override.get("compression_ratio") or 0) > 0:
            raise PressSpecError("method 'full' takes no compression_ratio or budget", f"{where}.method")
        ratio, budget = None, None
    elif ratio is None and budget is None:
        raise PressSpecError(
            f"method {method!r} needs compression_ratio or budget (none in the request nor the server defaults)",
            f"{where}.compression_ratio",
        )
    return PressSpec(method, ratio, budget, scope, question_start, params)


@dataclass(frozen=True)
class CompressionPlan:
    """How a press is applied to a span of ``span_tokens`` tokens."""

    effective_ratio: float  # fraction removed (what is reported)
    press_ratio: float  # value handed to the press (budget semantics nudge it so int() lands on the budget)
    expected_kept: int  # tokens per layer the press keeps (pyramidkv: on average)
    skipped: str | None = None  # why no compression happened, if it did not


def plan_compression(spec: PressSpec, span_tokens: int) -> CompressionPlan:
    """Turn ratio/budget semantics into the ratio the press receives for a span of ``span_tokens``.

    ratio:  remove ``compression_ratio`` of the span at every length; kept = max(1, int(n * (1 - r))).
    budget: a span of at most ``budget`` tokens is not compressed; a longer one keeps exactly ``budget``
            tokens, i.e. effective ratio = 1 - budget / n.
    Presses that need a minimum span (snapkv/pyramidkv: more than window_size tokens; streamingllm and
    expected_attention: more than n_sink) are skipped below it, and the reason is recorded.
    """
    n = span_tokens
    if spec.method == "full":
        return CompressionPlan(0.0, 0.0, n)
    if n <= 0:
        return CompressionPlan(0.0, 0.0, 0, skipped="nothing to compress (empty span)")
    if spec.budget is not None:
        if n <= spec.budget:
            return CompressionPlan(0.0, 0.0, n, skipped=f"span of {n} tokens is within the budget of {spec.budget}")
        effective = 1.0 - spec.budget / n
        # int(n * (1 - r)) must equal the budget exactly: aim half a token above it
        # (pyramidkv spreads the budget over layers with its own rounding: give it the exact ratio)
        press_ratio = effective if spec.method == "pyramidkv" else 1.0 - (spec.budget + 0.5) / n
        plan = CompressionPlan(effective, press_ratio, spec.budget)
    else:
        r = float(spec.compression_ratio or 0.0)
        plan = CompressionPlan(r, r, max(1, int(n * (1 - r))) if r > 0 else n)
    info = spec.info()
    for pname in info.min_tokens_param:
        need = int(spec.params.get(pname, info.params[pname]))
        if n <= need:
            return CompressionPlan(
                0.0, 0.0, n, skipped=f"span of {n} tokens is not longer than {pname}={need}; not compressed"
            )
    if spec.method == "tova" and n < 2:
        return CompressionPlan(0.0, 0.0, n, skipped="tova needs at least 2 tokens")
    if plan.press_ratio <= 0:  # ratio 0: a legitimate request that removes nothing
        return CompressionPlan(0.0, 0.0, n)
    return plan
