"""Method catalog, request-level press specification and budget math.

Pure Python: importing this module must not import torch or kvpress, so the argument parsing,
validation and budget arithmetic can be unit-tested (and used by tools) without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .presses import ALL, KINDS, RECIPES, TOP_KEYS, Node, PressSpecError, parse_node  # noqa: F401

# query_aware: the whole prompt is compressed in one prefill; context_only: the context before question_start
# is compressed, the question prefilled after it (one tokenization, split at a token); kvpress_pipeline:
# exactly kvpress's KVPressTextGenerationPipeline (context and question tokenized separately, the question
# with the chat template's closing tokens and any answer prefix kept out of compression)
SCOPES = ("query_aware", "context_only", "kvpress_pipeline")
SPLIT_SCOPES = ("context_only", "kvpress_pipeline")

# names a request's kv_press may carry (flat parameters of the top press + the request-level knobs)
METHODS = ALL


@dataclass
class PressSpec:
    """What the client (or the server default) asked for, validated."""

    method: str = "full"  # the name asked for (a press or a recipe)
    compression_ratio: float | None = None
    budget: int | None = None
    scope: str = "query_aware"
    question_start: int | None = None
    params: dict[str, Any] = field(default_factory=dict)  # parameters of the top press (server flags: any)
    node: Node | None = None  # the validated press tree (None only for unresolved server defaults)

    @property
    def tree(self) -> Node:
        return self.node if self.node is not None else Node("full")

    @property
    def recipe(self) -> str | None:
        return self.method if self.method in RECIPES else None

    @property
    def semantics(self) -> str:
        if self.tree.method == "full":
            return "none"
        if not self.tree.takes_ratio():
            return "press"  # the press sizes itself from its own parameters
        return "budget" if self.budget is not None else "ratio"


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

    Rules: ``method`` in the request replaces the default method (and its press tree); ``compression_ratio``
    and ``budget`` are mutually exclusive in one request and a request giving either replaces both defaults;
    parameters of the top press given in the request win over the server's flags, which win over kvpress's
    defaults; parameters a press does not take are rejected when given in the request (server flags for other
    methods are ignored). Nested presses (``inner``, ``presses``, ``prefill``/``decoding``) come only from the
    request. Every error names the field (``kv_press.inner.window_size``).
    """
    where = "kv_press"
    if override is None:
        override = {}
    if not isinstance(override, dict):
        raise PressSpecError("kv_press must be an object", where)

    method = override.get("method", default.method)
    if not isinstance(method, str) or method not in ALL:
        raise PressSpecError(f"unknown method {method!r}; known methods: {', '.join(ALL)}", f"{where}.method")

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
    if scope in SPLIT_SCOPES and question_start is None:
        raise PressSpecError(
            f"scope {scope} needs question_start (where the question begins in the prompt)",
            f"{where}.question_start",
        )

    tree_obj = {k: v for k, v in override.items() if k not in TOP_KEYS and v is not None}
    tree_obj["method"] = method
    node = parse_node(tree_obj, where, defaults=default.params)

    explicit_knob = override.get("budget") is not None or bool(override.get("compression_ratio"))
    if node.method == "full":
        if explicit_knob:
            raise PressSpecError(f"method {method!r} takes no compression_ratio or budget", f"{where}.method")
        ratio, budget = None, None
    elif not node.takes_ratio():
        if explicit_knob:
            which = "budget" if override.get("budget") is not None else "compression_ratio"
            raise PressSpecError(
                f"method {method!r} takes no {which}: it sizes itself from its own parameters "
                f"({', '.join(node.kind.params) or 'its inner presses'})", f"{where}.{which}")
        ratio, budget = None, None
    elif budget is not None and not node.takes_budget():
        raise PressSpecError(
            f"method {method!r} cannot hit a token budget exactly (it keeps tokens per chunk/layer/press); "
            "use compression_ratio", f"{where}.budget")
    elif ratio is None and budget is None:
        raise PressSpecError(
            f"method {method!r} needs compression_ratio or budget (none in the request nor the server defaults)",
            f"{where}.compression_ratio",
        )
    if node.kind.needs_question or any(n.kind.needs_question for n in node.walk()):
        if question_start is None:
            raise PressSpecError(f"method {method!r} needs question_start: the question is its observation window",
                                 f"{where}.question_start")
        if scope != "query_aware":
            raise PressSpecError(f"method {method!r} compresses the question with the context: use scope "
                                 "query_aware (with question_start)", f"{where}.scope")
    return PressSpec(method, ratio, budget, scope, question_start, dict(node.params), node)


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
    expected_attention: more than n_sink; also inside wrappers) are skipped below it, and the reason is recorded.
    Presses that size themselves (decoding, per_layer, think, dms, ...) get no ratio: press_ratio is 0 and
    the engine builds them from their parameters.
    """
    n = span_tokens
    tree = spec.tree
    if tree.method == "full":
        return CompressionPlan(0.0, 0.0, n)
    if n <= 0:
        return CompressionPlan(0.0, 0.0, 0, skipped="nothing to compress (empty span)")
    for pname, need in tree.min_tokens():
        if n <= need:
            return CompressionPlan(
                0.0, 0.0, n, skipped=f"span of {n} tokens is not longer than {pname}={need}; not compressed"
            )
    if tree.method == "tova" and n < 2:
        return CompressionPlan(0.0, 0.0, n, skipped="tova needs at least 2 tokens")
    if not tree.takes_ratio():
        return CompressionPlan(0.0, 0.0, n)
    if spec.budget is not None:
        if n <= spec.budget:
            return CompressionPlan(0.0, 0.0, n, skipped=f"span of {n} tokens is within the budget of {spec.budget}")
        effective = 1.0 - spec.budget / n
        # int(n * (1 - r)) must equal the budget exactly: aim half a token above it
        # (pyramidkv spreads the budget over layers with its own rounding: give it the exact ratio)
        press_ratio = effective if tree.per_layer_lengths() else 1.0 - (spec.budget + 0.5) / n
        plan = CompressionPlan(effective, press_ratio, spec.budget)
    else:
        r = float(spec.compression_ratio or 0.0)
        plan = CompressionPlan(r, r, max(1, int(n * (1 - r))) if r > 0 else n)
    if plan.press_ratio <= 0:  # ratio 0: a legitimate request that removes nothing
        return CompressionPlan(0.0, 0.0, n)
    return plan
