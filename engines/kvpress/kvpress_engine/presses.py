"""The press catalog as data: every kvpress press the engine serves, its parameters (kvpress defaults), its
properties, how wrappers take inner presses, and kvpress's leaderboard recipes by name.

Pure Python (no torch, no kvpress import): the request validation, the engine.yaml catalog and `kvt methods`
all read this table. The engine turns a validated tree into kvpress objects in ``build.py``.

A press spec is a tree: ``{"method": "adakv", "alpha_safeguard": 0.2, "inner": {"method": "snapkv"}}``.
Wrappers take one ``inner`` press (``adakv``, ``chunk``, ``key_rerotation``, ``decoding``, ...); ``composed``
takes a list ``presses``; ``prefill_decoding`` takes ``prefill`` and ``decoding``. A recipe is a name for a
fixed tree (kvpress's leaderboard entries); it takes only the request-level knobs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional


class PressSpecError(ValueError):
    """A kv_press specification that cannot be served (maps to HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Param:
    type: str  # int | float | bool | str | floats | path
    default: Any = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    odd: bool = False
    choices: tuple[str, ...] = ()
    required: bool = False
    nullable: bool = False
    help: str = ""


@dataclass(frozen=True)
class Kind:
    """One servable press (a kvpress class with the engine's name for it)."""

    name: str
    press_class: Optional[str]  # kvpress class; None for "full"
    params: dict[str, Param] = field(default_factory=dict)
    description: str = ""
    # how the request's compression_ratio / budget reach the press: "compression_ratio" (the kvpress
    # field), "inner" (handed to the inner press: adakv, chunk, ...), "children" (composed: every child),
    # or None (the press sizes itself from its own parameters: decoding, per_layer, think, dms, ...)
    ratio: Optional[str] = "compression_ratio"
    budget: bool = True  # kept == int(n * (1 - r)) globally, so a token budget can be hit exactly
    scorer: bool = True  # a kvpress ScorerPress: can be the inner press of a wrapper
    inner: Optional[str] = None  # None | "scorer": the press takes one inner press
    inner_field: str = "press"  # the kvpress constructor field of the inner press
    slots: tuple[str, ...] = ()  # prefill_decoding: named child presses
    children: bool = False  # composed: a list of presses
    attn: Optional[str] = None  # "eager" (needs attention weights) | "no_eager" (kvpress asserts not eager)
    query_aware: bool = False  # scores use the last queries (the question, when it is in the compressed span)
    phase: str = "prefill"  # prefill | decode | prefill+decode
    memory: str = "frees"  # frees (tensors shrink) | masks (full tensors kept, keys masked) | zeroes (channels)
    per_layer_lengths: bool = False  # layers end with different cache lengths
    rerotates: bool = False  # kept keys are re-rotated to consecutive positions (decoding continues there)
    artifact: Optional[str] = None  # the parameter naming a local artifact the press needs (None: none)
    artifact_help: str = ""
    needs_question: bool = False  # the press needs question_start (finch: the question is its window)
    min_tokens: tuple[str, ...] = ()  # the span must be longer than these parameters, else not compressed
    leaderboard: Optional[str] = None  # the kvpress leaderboard entry this name reproduces exactly
    recipe: Optional[dict[str, Any]] = None  # a fixed tree (recipes only)

    @property
    def wrapper(self) -> bool:
        return self.inner is not None or self.children or bool(self.slots)


def _p(type_: str, default: Any = None, **kw: Any) -> Param:
    return Param(type_, default, **kw)


INT0 = dict(min=0)
INT1 = dict(min=1)

_WINDOW = {"window_size": _p("int", 64, **INT1), "kernel_size": _p("int", 5, min=1, odd=True)}
_EA = {
    "n_future_positions": _p("int", 512, **INT1),
    "n_sink": _p("int", 4, **INT0),
    "use_covariance": _p("bool", True),
    "use_vnorm": _p("bool", True),
    "epsilon": _p("float", 0.0, min=0),
}

KINDS_LIST: list[Kind] = [
    Kind("full", None, description="no compression (baseline)", ratio=None, budget=False, scorer=False,
         memory="none"),
    # ---------------------------------------------------------------- scorer presses (prefill, free memory)
    Kind("snapkv", "SnapKVPress", dict(_WINDOW), query_aware=True, min_tokens=("window_size",),
         leaderboard="snapkv", description="SnapKV: attention of the last window_size queries, pooled"),
    Kind("streamingllm", "StreamingLLMPress", {"n_sink": _p("int", 4, **INT0)}, min_tokens=("n_sink",),
         leaderboard="streaming_llm", description="StreamingLLM: keep n_sink first tokens and the most recent"),
    Kind("observed_attention", "ObservedAttentionPress", {}, attn="eager", query_aware=True,
         leaderboard="observed_attention",
         description="H2O-style: average attention each key received during prefill (eager attention)"),
    Kind("pyramidkv", "PyramidKVPress", {**_WINDOW, "beta": _p("int", 20, **INT1)}, attn="no_eager",
         query_aware=True, per_layer_lengths=True, min_tokens=("window_size",), leaderboard="pyramidkv",
         description="PyramidKV: SnapKV scores with per-layer pyramid budgets"),
    Kind("knorm", "KnormPress", {}, leaderboard="knorm", description="keep keys with the smallest L2 norm"),
    Kind("tova", "TOVAPress", {}, query_aware=True, leaderboard="tova",
         description="TOVA: attention of the last token, averaged over heads"),
    Kind("expected_attention", "ExpectedAttentionPress", dict(_EA), min_tokens=("n_sink",),
         description="expected attention of future queries (query statistics + averaged RoPE); the plain "
                     "class (the leaderboard's entry is expected_attention_leaderboard)"),
    Kind("random", "RandomPress", {"seed": _p("int", 0)},
         description="random eviction (control); seeded (the leaderboard's entry is unseeded)"),
    Kind("keydiff", "KeyDiffPress", {}, leaderboard="keydiff",
         description="KeyDiff: evict keys most similar to the mean key direction"),
    Kind("lagkv", "LagKVPress", {"n_sink": _p("int", 4, **INT0), "lag_size": _p("int", 128, **INT1),
                                 "cross_scoring": _p("bool", False)},
         leaderboard="lagkv", description="LagKV: lag-relative key/value statistics per chunk of lag_size"),
    Kind("cur", "CURPress", {"num_sinks": _p("int", 4, **INT0),
                             "leverage_type": _p("str", "kv_product", choices=("key", "value", "kv_avg",
                                                                                "kv_product")),
                             "use_random_leverage": _p("bool", False),
                             "use_local_approximation": _p("bool", True),
                             "local_window_size": _p("int", 16, **INT1)},
         leaderboard="cur", description="CUR decomposition leverage scores of keys and values"),
    Kind("leverage", "LeverageScorePress", {"sketch_dimension": _p("int", 48, **INT1)},
         description="statistical leverage of the pre-RoPE keys (random sketch; seeded per request)"),
    Kind("non_causal_attention", "NonCausalAttnPress", {"chunk_size": _p("int", 256, **INT1)},
         description="chunked non-causal attention mass times value norms"),
    Kind("compactor", "CompactorPress", {"sink_size_start": _p("int", 8, **INT0), "sink_size_end": _p("int", 4, **INT0),
                                         "chunk_size": _p("int", 256, **INT1),
                                         "sketch_dimension": _p("int", 48, **INT1),
                                         "blending": _p("float", None, nullable=True)},
         leaderboard="compactor", description="Compactor: leverage scores blended with non-causal attention"),
    Kind("cap", "CapPress", {"tau": _p("float", 5.0, min=0), "n_future_positions": _p("int", 512, **INT1),
                             "n_sink": _p("int", 4, **INT0), "epsilon": _p("float", 1e-6, min=0)},
         min_tokens=("n_sink",), description="CAPKV: query-anchor aligned value leverage"),
    # ---------------------------------------------------------------- artifact presses (local path)
    Kind("qfilter", "QFilterPress", {"qfilter_path": _p("path", required=True)}, artifact="qfilter_path",
         leaderboard="qfilter",
         artifact_help="a Q-Filters checkpoint directory for this model (the Hub repo nthngdy/<model>_qfilt: "
                       "config.json + model.safetensors, as saved by kvpress's QFilters.save_pretrained)",
         description="Q-Filters: keys projected on trained per-head query directions"),
    Kind("kvzap", "KVzapPress", {"model_type": _p("str", "mlp", choices=("linear", "mlp")),
                                 "kvzap_path": _p("path", required=True)}, artifact="kvzap_path",
         leaderboard="kvzap_mlp_head",
         artifact_help="a KVzap checkpoint directory for this model (the Hub repo nvidia/KVzap-<type>-<model>)",
         description="KVzap: a trained per-layer scorer of the hidden states"),
    Kind("duo_attention", "DuoAttentionPress", {"duo_attention_path": _p("path", required=True)},
         ratio="head_compression_ratio", budget=False, scorer=False, attn="no_eager", memory="masks",
         artifact="duo_attention_path", leaderboard="duo_attention",
         artifact_help="a DuoAttention pattern directory for this model (config.json with sink_size/recent_size + "
                       "full_attention_heads.tsv, one row per layer, one column per KV head: the files under "
                       "attn_patterns/<model>/ of github.com/mit-han-lab/duo-attention)",
         description="DuoAttention: the lowest-scoring heads (compression_ratio of them: kvpress's "
                     "head_compression_ratio) keep only sink + recent tokens; masks keys"),
    # ---------------------------------------------------------------- other prefill presses
    Kind("think", "ThinKPress", {"key_channel_compression_ratio": _p("float", required=True, min=0, max=1,
                                                                      min_exclusive=False),
                                 "window_size": _p("int", 32, **INT1)},
         ratio=None, budget=False, scorer=False, query_aware=True, memory="zeroes", leaderboard="think",
         description="ThinK: zero the key channels least used by the last window_size queries (tokens kept; "
                     "its compression_ratio is key_channel_compression_ratio / 2)"),
    Kind("simlayerkv", "SimLayerKVPress", {"lazy_threshold": _p("float", 1.0, min=0, max=1),
                                           "n_last": _p("int", 1, **INT1), "n_recent": _p("int", 1024, **INT1),
                                           "n_initial": _p("int", 4, **INT0)},
         ratio=None, budget=False, scorer=False, query_aware=True, per_layer_lengths=True,
         description="SimLayerKV: lazy layers (attention mass on initial+recent > lazy_threshold) keep only "
                     "n_initial + n_recent tokens"),
    Kind("finch", "FinchPress", {"chunk_length": _p("int", None, nullable=True, min=1),
                                 "normalize_scores": _p("bool", True), "rerotate_keys": _p("bool", True)},
         scorer=False, query_aware=True, needs_question=True, rerotates=True, leaderboard="finch",
         description="Finch: the question is the observation window (needs question_start); keys re-rotated"),
    Kind("kvzip", "KVzipPress", {"layerwise": _p("bool", False), "n_sink": _p("int", 4, **INT0),
                                 "kvzip_plus_normalization": _p("bool", False),
                                 "chunk_size": _p("int", 2048, **INT1)},
         scorer=False, budget=False, attn="no_eager", memory="masks", leaderboard="kvzip",
         description="KVzip: importance from reconstructing the context (2-3x prefill cost); head-wise masks"),
    # ---------------------------------------------------------------- wrappers (inner: a scorer press)
    Kind("adakv", "AdaKVPress", {"alpha_safeguard": _p("float", 0.2, min=0, max=1)}, ratio="inner",
         scorer=False, inner="scorer", attn="no_eager", memory="masks",
         description="AdaKV: head-wise budgets (top-k over all heads, alpha_safeguard per head); masks keys"),
    Kind("critical", "CriticalKVPress", {"epsilon": _p("float", 1e-4, min=0),
                                         "first_stage_ratio": _p("float", 0.5, min=0, max=1)},
         ratio="inner", inner="scorer",
         description="CriticalKV: two-stage selection re-weighted by the projected value norm"),
    Kind("critical_adakv", "CriticalAdaKVPress", {"alpha_safeguard": _p("float", 0.2, min=0, max=1),
                                                  "epsilon": _p("float", 1e-4, min=0),
                                                  "first_stage_ratio": _p("float", 0.5, min=0, max=1)},
         ratio="inner", scorer=False, inner="scorer", attn="no_eager", memory="masks",
         description="CriticalKV with AdaKV head-wise budgets; masks keys"),
    Kind("key_rerotation", "KeyRerotationPress", {}, ratio="inner", scorer=False, inner="scorer", rerotates=True,
         description="re-rotate the kept keys to consecutive positions (decoding continues after them)"),
    Kind("chunk", "ChunkPress", {"chunk_length": _p("int", 1024, **INT1)}, ratio="inner", budget=False,
         scorer=False, inner="scorer",
         description="apply the inner press per chunk of chunk_length tokens (each chunk keeps its share)"),
    Kind("chunkkv", "ChunkKVPress", {"chunk_length": _p("int", 20, **INT1)}, ratio="inner", budget=False,
         scorer=False, inner="scorer", leaderboard=None,
         description="ChunkKV: keep whole chunks of chunk_length tokens by their summed inner scores"),
    Kind("block", "BlockPress", {"block_size": _p("int", 128, **INT1)}, ratio="inner", scorer=False,
         inner="scorer", description="score block by block against the kept set (block_size tokens)"),
    Kind("per_layer", "PerLayerCompressionPress", {"compression_ratios": _p("floats", required=True)},
         ratio=None, budget=False, scorer=False, inner="scorer", attn="no_eager", per_layer_lengths=True,
         description="one compression ratio per layer for the inner press (compression_ratios, one per layer)"),
    Kind("merging", "MergingPress", {"similarity_threshold": _p("float", 0.0), "merge_fraction":
                                     _p("float", 1.0, min=0, max=1)},
         ratio="inner", scorer=False, inner="scorer",
         description="merge evicted values into their most similar kept neighbours"),
    Kind("dms", "DMSPress", {"threshold": _p("float", required=True), "sliding_window_size": _p("int", 128, **INT0),
                             "decoding": _p("bool", False)},
         ratio=None, budget=False, scorer=False, inner="scorer", attn="no_eager", memory="masks",
         description="DMS-style thresholding: mask keys whose inner score is below threshold once they leave a "
                     "sliding window (decoding: also while generating)"),
    Kind("composed", "ComposedPress", {}, ratio="children", budget=False, scorer=False, children=True,
         description="apply several presses in turn (presses: [..]); a ratio applies to each"),
    # ---------------------------------------------------------------- decoding-time presses
    Kind("decoding", "DecodingPress", {"compression_interval": _p("int", 512, **INT1),
                                       "target_size": _p("int", 2048, **INT1),
                                       "hidden_states_buffer_size": _p("int", 256, **INT0)},
         ratio=None, budget=False, scorer=False, inner="scorer", inner_field="base_press", phase="decode",
         description="compress while generating: every compression_interval steps back to target_size tokens"),
    Kind("compression_ratio_decoding", "CompressionRatioDecodingPress",
         {"compression_interval": _p("int", 512, **INT1), "hidden_states_buffer_size": _p("int", 256, **INT0)},
         ratio="target_compression_ratio", budget=False, scorer=False, inner="scorer", inner_field="base_press",
         phase="decode",
         description="compress while generating, every compression_interval steps, to compression_ratio of all "
                     "tokens seen"),
    Kind("cam", "CAMPress", {"compression_interval": _p("int", 512, **INT1), "target_size": _p("int", 2048, **INT1),
                             "hidden_states_buffer_size": _p("int", 256, **INT0),
                             "merge_budget": _p("int", 32, **INT1)},
         ratio=None, budget=False, scorer=False, inner="scorer", inner_field="base_press", phase="decode",
         description="CaM: decoding-time compression that merges evicted values into kept ones"),
    Kind("prefill_decoding", "PrefillDecodingPress", {}, ratio="slots", budget=False, scorer=False,
         slots=("prefill", "decoding"), phase="prefill+decode",
         description="a prefill press (prefill: {...}, gets the ratio) and a decoding press (decoding: {...})"),
]


def _recipe(name: str, tree: dict[str, Any], description: str, leaderboard: Optional[str] = None) -> Kind:
    return Kind(name, None, {}, description=description, leaderboard=leaderboard or name, recipe=tree,
                scorer=False)


# kvpress's leaderboard entries (evaluation/evaluate_registry.py, PRESS_REGISTRY) that need no downloaded
# artifact, under their leaderboard names; "_leaderboard" is appended where the plain class already owns the
# name with a different recipe. Entries identical to a plain class are that class (see Kind.leaderboard).
RECIPES_LIST: list[Kind] = [
    _recipe("expected_attention_leaderboard",
            {"method": "adakv", "inner": {"method": "expected_attention", "epsilon": 1e-2}},
            "the leaderboard's expected_attention: AdaKV(ExpectedAttention(epsilon=1e-2))", "expected_attention"),
    _recipe("adakv_snapkv", {"method": "adakv", "inner": {"method": "snapkv"}}, "AdaKV(SnapKV)"),
    _recipe("adakv_compactor", {"method": "adakv", "inner": {"method": "compactor"}}, "AdaKV(Compactor)"),
    _recipe("block_keydiff", {"method": "block", "block_size": 128, "inner": {"method": "keydiff"}},
            "Block(KeyDiff, block_size=128)"),
    _recipe("chunkkv_leaderboard", {"method": "chunkkv", "chunk_length": 20, "inner": {"method": "snapkv"}},
            "the leaderboard's chunkkv: ChunkKV(SnapKV, chunk_length=20)", "chunkkv"),
    _recipe("critical_snapkv", {"method": "critical", "inner": {"method": "snapkv"}}, "CriticalKV(SnapKV)"),
    _recipe("critical_expected_attention",
            {"method": "critical", "inner": {"method": "expected_attention", "use_vnorm": False}},
            "CriticalKV(ExpectedAttention(use_vnorm=False))"),
    _recipe("critical_adakv_snapkv", {"method": "critical_adakv", "inner": {"method": "snapkv"}},
            "CriticalAdaKV(SnapKV)"),
    _recipe("critical_adakv_expected_attention",
            {"method": "critical_adakv", "inner": {"method": "expected_attention", "use_vnorm": False}},
            "CriticalAdaKV(ExpectedAttention(use_vnorm=False))"),
    _recipe("kvzip_plus", {"method": "kvzip", "kvzip_plus_normalization": True}, "KVzip+ (normalized scores)"),
    _recipe("streaming_llm", {"method": "streamingllm"}, "StreamingLLM (leaderboard name)"),
    _recipe("no_press", {"method": "full"}, "no compression (leaderboard name)"),
    _recipe("decoding_knorm", {"method": "decoding", "inner": {"method": "knorm"}}, "Decoding(Knorm)"),
    _recipe("decoding_streaming_llm", {"method": "decoding", "inner": {"method": "streamingllm"}},
            "Decoding(StreamingLLM)"),
    _recipe("decoding_tova", {"method": "decoding", "inner": {"method": "tova"}}, "Decoding(TOVA)"),
    _recipe("decoding_keydiff", {"method": "decoding", "inner": {"method": "keydiff"}}, "Decoding(KeyDiff)"),
    _recipe("cam_streaming_llm", {"method": "cam", "inner": {"method": "streamingllm"}}, "CaM(StreamingLLM)"),
    _recipe("cam_knorm", {"method": "cam", "inner": {"method": "knorm"}}, "CaM(Knorm)"),
    _recipe("cam_tova", {"method": "cam", "inner": {"method": "tova"}}, "CaM(TOVA)"),
    _recipe("merging_knorm", {"method": "merging", "inner": {"method": "knorm"}}, "Merging(Knorm)"),
    _recipe("merging_snapkv", {"method": "merging", "inner": {"method": "snapkv"}}, "Merging(SnapKV)"),
    _recipe("merging_expected_attention",
            {"method": "merging", "inner": {"method": "expected_attention", "epsilon": 1e-2}},
            "Merging(ExpectedAttention(epsilon=1e-2))"),
]

# leaderboard entries not served here, and why (for the README and `kvt methods`)
NOT_SERVED = {
    "duo_attention_on_the_fly": "scores heads on the fly from the kmfoda/booksum Hub dataset (duo_attention with "
    "a local pattern directory is served)",
    "fastkvzip": "gate weights from the Hub (Jang-Hyun/Fast-KVzip)",
    "kvzap_linear / kvzap_mlp (DMS(KVzap))": "servable as {method: dms, threshold: T, inner: {method: kvzap, "
    "kvzap_path: DIR}}; the leaderboard's threshold is chosen per run",
    "lukv": "LU-KV budget curves are fetched by URL per (model, press)",
    "RestoreKV / RestoreKV_plus": "restore embeddings from the Hub",
    "kvcompose / kvcompose_unstructured": "runs its own eager forward passes over the whole model; not wired",
    "kvzap_mlp_layer": "servable as {method: adakv, inner: {method: kvzap, kvzap_path: DIR}}",
    "snap_think": "servable as {method: composed, presses: [{method: snapkv}, {method: think, "
    "key_channel_compression_ratio: R}]}",
    "decoding_qfilter, decoding_adakv_*, cam_adakv_snapkv": "decoding wrappers around qfilter/adakv are not wired",
}

KINDS: dict[str, Kind] = {k.name: k for k in KINDS_LIST}
RECIPES: dict[str, Kind] = {k.name: k for k in RECIPES_LIST}
ALL: dict[str, Kind] = {**KINDS, **RECIPES}
assert not set(KINDS) & set(RECIPES)

# every name a node may carry besides its parameters
NODE_KEYS = {"method", "inner", "presses", "prefill", "decoding"}
TOP_KEYS = {"compression_ratio", "budget", "scope", "question_start"}


# ---------------------------------------------------------------------------------------------------- nodes


@dataclass
class Node:
    """A validated press tree node (parameters complete, with kvpress defaults)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    inner: Optional["Node"] = None
    presses: list["Node"] = field(default_factory=list)
    slots: dict[str, "Node"] = field(default_factory=dict)

    @property
    def kind(self) -> Kind:
        return KINDS[self.method]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, **self.params}
        if self.inner is not None:
            d["inner"] = self.inner.to_dict()
        if self.presses:
            d["presses"] = [p.to_dict() for p in self.presses]
        for k, v in self.slots.items():
            d[k] = v.to_dict()
        return d

    def walk(self):
        yield self
        if self.inner is not None:
            yield from self.inner.walk()
        for p in self.presses:
            yield from p.walk()
        for v in self.slots.values():
            yield from v.walk()

    # -- derived properties of the whole tree
    def takes_ratio(self) -> bool:
        k = self.kind
        if k.ratio == "inner":
            return self.inner is not None and self.inner.takes_ratio()
        if k.ratio == "children":
            return any(p.takes_ratio() for p in self.presses)
        if k.ratio == "slots":
            return "prefill" in self.slots and self.slots["prefill"].takes_ratio()
        return k.ratio is not None

    def takes_budget(self) -> bool:
        k = self.kind
        if not k.budget:
            return False
        if k.ratio == "inner":
            return self.inner is not None and self.inner.takes_budget()
        return k.ratio is not None

    def attn(self) -> Optional[str]:
        needs = {n.kind.attn for n in self.walk()} - {None}
        if len(needs) > 1:
            return "conflict"
        return next(iter(needs), None)

    def phase(self) -> str:
        return self.kind.phase

    def memory(self) -> str:
        kinds = [n.kind.memory for n in self.walk()]
        if "masks" in kinds:
            return "masks"
        if self.method == "full":
            return "none"
        if "frees" in kinds:
            return "frees"
        return kinds[0]

    def query_aware(self) -> bool:
        return any(n.kind.query_aware for n in self.walk())

    def per_layer_lengths(self) -> bool:
        return any(n.kind.per_layer_lengths for n in self.walk())

    def min_tokens(self) -> list[tuple[str, int]]:
        out = []
        for n in self.walk():
            for pname in n.kind.min_tokens:
                out.append((f"{n.method}.{pname}" if n is not self else pname, int(n.params[pname])))
        return out

    def artifacts(self) -> list[tuple[str, str]]:
        return [(n.method, n.params[n.kind.artifact]) for n in self.walk() if n.kind.artifact]


def properties(kind: Kind) -> dict[str, Any]:
    """The catalog properties of one name (a recipe: those of its tree)."""
    if kind.recipe is not None:
        node = parse_node(copy.deepcopy(kind.recipe), "recipe", allow_missing_artifacts=True)
        return {
            "recipe": node.to_dict(),
            "leaderboard": kind.leaderboard,
            "attention": node.attn() or "any",
            "query_aware": node.query_aware(),
            "phase": node.phase(),
            "memory": node.memory(),
            "artifact": [a for a, _ in node.artifacts()] or None,
        }
    props: dict[str, Any] = {
        "press_class": kind.press_class,
        "attention": kind.attn or "any",
        "query_aware": kind.query_aware,
        "phase": kind.phase,
        "memory": kind.memory,
    }
    if kind.wrapper:
        props["takes"] = ("inner" if kind.inner else "presses" if kind.children else "+".join(kind.slots))
    if kind.params:
        props["params"] = {k: p.default for k, p in kind.params.items() if not p.required}
        req = [k for k, p in kind.params.items() if p.required]
        if req:
            props["required"] = req
    if kind.artifact:
        props["artifact"] = kind.artifact_help
    if kind.needs_question:
        props["needs"] = "question_start"
    if kind.leaderboard:
        props["leaderboard"] = kind.leaderboard
    return props


def supports(kind: Kind) -> list[str]:
    """Which request knobs a catalog name takes: compression_ratio and/or budget."""
    if kind.recipe is not None:
        node = parse_node(copy.deepcopy(kind.recipe), "recipe", allow_missing_artifacts=True)
        return (["compression_ratio"] if node.takes_ratio() else []) + (["budget"] if node.takes_budget() else [])
    if kind.name == "full" or kind.ratio is None:
        return []
    if kind.wrapper:  # depends on the inner press; with a scorer inner:
        return ["compression_ratio"] + (["budget"] if kind.budget and kind.ratio == "inner" else [])
    return ["compression_ratio"] + (["budget"] if kind.budget else [])


# ---------------------------------------------------------------------------------------------------- parsing


def check_param(name: str, p: Param, value: Any, where: str) -> Any:
    param = f"{where}.{name}"
    if value is None:
        if p.nullable:
            return None
        raise PressSpecError(f"{name} must not be null", param)
    t = p.type
    if t == "bool":
        if not isinstance(value, bool):
            raise PressSpecError(f"{name} must be a boolean", param)
        return value
    if t == "str":
        if not isinstance(value, str) or (p.choices and value not in p.choices):
            raise PressSpecError(f"{name} must be one of {', '.join(p.choices)}", param)
        return value
    if t == "path":
        if not isinstance(value, str) or not value:
            raise PressSpecError(f"{name} must be a local path (a string)", param)
        return value
    if t == "floats":
        if not isinstance(value, list) or not value or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1 for v in value
        ):
            raise PressSpecError(f"{name} must be a non-empty list of numbers in [0, 1)", param)
        return [float(v) for v in value]
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise PressSpecError(f"{name} must be an integer", param)
        if p.odd and (value < 1 or value % 2 == 0):
            raise PressSpecError(f"{name} must be a positive odd integer", param)
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PressSpecError(f"{name} must be a finite number", param)
        value = float(value)
    if p.min is not None and value < p.min:
        raise PressSpecError(f"{name} must be >= {p.min:g}", param)
    if p.max is not None and value > p.max:
        raise PressSpecError(f"{name} must be <= {p.max:g}", param)
    return value


def expand_recipe(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """A recipe name → its tree (a recipe takes no parameters of its own)."""
    rec = RECIPES[obj["method"]]
    extra = sorted(set(obj) - {"method"} - TOP_KEYS)
    if extra:
        raise PressSpecError(
            f"recipe {rec.name!r} is fixed ({rec.description}); it takes no {extra[0]!r} — spell the tree out "
            f"instead", f"{where}.{extra[0]}")
    return copy.deepcopy(rec.recipe)  # type: ignore[arg-type]


def parse_node(obj: Any, where: str, *, top_extras: frozenset[str] = frozenset(),
               defaults: Optional[dict[str, Any]] = None, allow_missing_artifacts: bool = False) -> Node:
    """Validate one press tree (a dict) into a Node. ``defaults``: server-flag parameter values, used
    where the request gives none (top-level node only). Raises PressSpecError naming the field."""
    if not isinstance(obj, dict):
        raise PressSpecError("a press must be an object like {\"method\": \"snapkv\"}", where)
    method = obj.get("method")
    if not isinstance(method, str) or method not in ALL:
        raise PressSpecError(f"unknown method {method!r}; known methods: {', '.join(ALL)}", f"{where}.method")
    if method in RECIPES:
        tree = expand_recipe(obj, where)
        return parse_node(tree, where, allow_missing_artifacts=allow_missing_artifacts)
    kind = KINDS[method]
    allowed = set(kind.params) | {"method"} | set(top_extras)
    if kind.inner:
        allowed.add("inner")
    if kind.children:
        allowed.add("presses")
    allowed |= set(kind.slots)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        u = unknown[0]
        if u in NODE_KEYS:
            raise PressSpecError(f"method {method!r} takes no {u!r} (it is not a wrapper of that kind)", f"{where}.{u}")
        if u in TOP_KEYS:
            raise PressSpecError(f"{u} belongs at the top of kv_press, not inside a nested press", f"{where}.{u}")
        raise PressSpecError(f"method {method!r} takes no parameter {u!r}", f"{where}.{u}")
    params: dict[str, Any] = {}
    for name, p in kind.params.items():
        if name in obj:
            value = obj[name]
        elif defaults and defaults.get(name) is not None:
            value = defaults[name]
        elif p.required:
            if p.type == "path" and allow_missing_artifacts:
                params[name] = None
                continue
            hint = f": {kind.artifact_help}" if kind.artifact == name else ""
            raise PressSpecError(f"method {method!r} needs {name}{hint}", f"{where}.{name}")
        else:
            value = p.default
        params[name] = check_param(name, p, value, where)
    node = Node(method, params)
    if kind.inner:
        if "inner" not in obj:
            raise PressSpecError(
                f"method {method!r} wraps an inner press: give inner, e.g. {{\"method\": \"{method}\", "
                f"\"inner\": {{\"method\": \"snapkv\"}}}}", f"{where}.inner")
        node.inner = parse_node(obj["inner"], f"{where}.inner", allow_missing_artifacts=allow_missing_artifacts)
        if not node.inner.kind.scorer:
            raise PressSpecError(
                f"{method!r} needs a scorer press inside (snapkv, knorm, expected_attention, ...); "
                f"{node.inner.method!r} is not one", f"{where}.inner.method")
    if kind.children:
        ps = obj.get("presses")
        if not isinstance(ps, list) or len(ps) < 1:
            raise PressSpecError("composed needs presses: a non-empty list of presses", f"{where}.presses")
        node.presses = [parse_node(p, f"{where}.presses[{i}]", allow_missing_artifacts=allow_missing_artifacts)
                        for i, p in enumerate(ps)]
        for i, c in enumerate(node.presses):
            masks = [n.method for n in c.walk() if n.kind.memory == "masks"]
            if masks or c.kind.phase != "prefill" or c.kind.children or c.kind.rerotates and c.kind.inner:
                raise PressSpecError(
                    f"composed cannot contain {c.method!r} (kvpress's ComposedPress takes prefill presses without "
                    "head-wise masking)", f"{where}.presses[{i}].method")
    if kind.slots:
        for s in kind.slots:
            if s not in obj:
                raise PressSpecError(f"{method} needs {s}: a press", f"{where}.{s}")
            node.slots[s] = parse_node(obj[s], f"{where}.{s}", allow_missing_artifacts=allow_missing_artifacts)
        if node.slots["prefill"].kind.phase != "prefill":
            raise PressSpecError("prefill must be a prefill-time press", f"{where}.prefill.method")
        if node.slots["decoding"].kind.phase != "decode":
            raise PressSpecError("decoding must be a decoding press (decoding, compression_ratio_decoding, cam)",
                                 f"{where}.decoding.method")
    if node.attn() == "conflict":
        raise PressSpecError(
            f"this press needs eager attention in one part and non-eager in another "
            f"({', '.join(sorted({n.method for n in node.walk() if n.kind.attn}))}); kvpress cannot run it",
            f"{where}.method")
    if method == "think" and params["key_channel_compression_ratio"] >= 1:
        raise PressSpecError("key_channel_compression_ratio must be in [0, 1)", f"{where}.key_channel_compression_ratio")
    return node
