"""Validated press tree (presses.Node) → kvpress press objects, plus what the serving loop needs to know
about them (which phase they hook, whether they re-rotate, how to read head-wise masks back).

Kept apart from the serving loop (engine.py): building a press, loading its local artifact, and measuring
what it kept do not depend on how requests are scheduled or batched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from .presses import Node, PressSpecError

NEVER_TOKEN = -1  # finch: no delimiter token in the input (the engine sets the window itself)


class ArtifactError(PressSpecError):
    """A press's local artifact is missing or unreadable (HTTP 400, naming the parameter)."""


def _artifact_dir(path: str, param: str, what: str) -> str:
    if not os.path.isdir(path):
        raise ArtifactError(f"{what}: no such directory {path!r} (download it first; see the engine README)", param)
    return path


def _kvpress_classes():
    import kvpress
    from kvpress.presses.kvzap_press import KVzapModel, KVzapPress
    from kvpress.presses.qfilter_press import QFilterPress, QFilters

    class LocalQFilterPress(QFilterPress):
        """QFilterPress whose filters come from a local directory (QFilters.save_pretrained format)."""

        def __init__(self, compression_ratio: float = 0.0, qfilter_path: str = ""):
            super().__init__(compression_ratio=compression_ratio)
            self.qfilter_path = qfilter_path
            self._loaded = None

        def post_init_from_model(self, model):
            if self._loaded is None:
                try:
                    self._loaded = QFilters.from_pretrained(self.qfilter_path).q_filters
                except Exception as e:  # noqa: BLE001 - any failure to read the artifact is the user's input
                    raise ArtifactError(f"could not load Q-Filters from {self.qfilter_path!r}: {e}",
                                        "qfilter_path") from None
                want = (model.config.num_hidden_layers, model.config.num_key_value_heads)
                if tuple(self._loaded.shape[:2]) != want:
                    raise ArtifactError(f"Q-Filters in {self.qfilter_path!r} have shape {tuple(self._loaded.shape)}, "
                                        f"this model needs ({want[0]}, {want[1]}, head_dim)", "qfilter_path")
            self.q_filters = self._loaded.to(model.dtype)

    class LocalKVzapPress(KVzapPress):
        """KVzapPress whose surrogate model comes from a local directory (KVzapModel.save_pretrained format)."""

        def __init__(self, compression_ratio: float = 0.0, model_type: str = "mlp", kvzap_path: str = ""):
            super().__init__(compression_ratio=compression_ratio, model_type=model_type)
            self.kvzap_path = kvzap_path

        def post_init_from_model(self, model):
            if self.kvzap_model_name != self.kvzap_path:
                try:
                    self.kvzap_model = KVzapModel.from_pretrained(self.kvzap_path)
                except Exception as e:  # noqa: BLE001
                    raise ArtifactError(f"could not load KVzap from {self.kvzap_path!r}: {e}", "kvzap_path") from None
                if len(self.kvzap_model.layers) != model.config.num_hidden_layers:
                    raise ArtifactError(f"KVzap in {self.kvzap_path!r} has {len(self.kvzap_model.layers)} layers, "
                                        f"this model {model.config.num_hidden_layers}", "kvzap_path")
                self.kvzap_model_name = self.kvzap_path

    from kvpress.presses.duo_attention_press import DuoAttentionPress

    class LocalDuoAttentionPress(DuoAttentionPress):
        """DuoAttentionPress whose attention pattern comes from a local directory (the duo-attention repo's
        attn_patterns/<model>/ files) instead of GitHub."""

        def __init__(self, head_compression_ratio: float = 0.0, duo_attention_path: str = ""):
            super().__init__(head_compression_ratio=head_compression_ratio)
            self.duo_attention_path = duo_attention_path

        def load_attention_pattern(self, model):  # kvpress: a staticmethod fetching by model name
            import json

            import numpy as np

            d = self.duo_attention_path
            try:
                cfg = json.loads(open(os.path.join(d, "config.json")).read())
                scores = np.clip(np.loadtxt(os.path.join(d, "full_attention_heads.tsv"), dtype=float,
                                            delimiter="\t", ndmin=2), 0, 1)
                sink, recent = int(cfg["sink_size"]), int(cfg["recent_size"])
            except Exception as e:  # noqa: BLE001
                raise ArtifactError(f"could not load a DuoAttention pattern from {d!r}: {e}",
                                    "duo_attention_path") from None
            want = (model.config.num_hidden_layers, model.config.num_key_value_heads)
            if scores.shape != want:
                raise ArtifactError(f"DuoAttention pattern in {d!r} has shape {scores.shape}, this model needs {want}",
                                    "duo_attention_path")
            return sink, recent, scores

    return kvpress, {"qfilter": LocalQFilterPress, "kvzap": LocalKVzapPress, "duo_attention": LocalDuoAttentionPress}


def build_node(node: Node, ratio: float, where: str = "kv_press") -> Any:
    """One kvpress object for a tree node; ``ratio`` is what the request's ratio/budget became for this node."""
    kvpress, local = _kvpress_classes()
    k = node.kind
    params = dict(node.params)
    if k.artifact:
        _artifact_dir(params[k.artifact], f"{where}.{k.artifact}", f"{node.method} needs {k.artifact}")
    cls = local.get(node.method) or getattr(kvpress, k.press_class)
    if k.inner:
        inner = build_node(node.inner, ratio if k.ratio == "inner" else 0.0, f"{where}.inner")
        if node.method == "critical":  # a plain class with positional press
            return cls(inner, **params)
        if node.method == "per_layer":
            return cls(press=inner, compression_ratios=params["compression_ratios"])
        if k.ratio == "target_compression_ratio":
            return cls(**{k.inner_field: inner}, target_compression_ratio=ratio, **params)
        return cls(**{k.inner_field: inner}, **params)
    if k.children:
        return cls(presses=[build_node(c, ratio, f"{where}.presses[{i}]") for i, c in enumerate(node.presses)])
    if k.slots:
        return cls(prefilling_press=build_node(node.slots["prefill"], ratio, f"{where}.prefill"),
                   decoding_press=build_node(node.slots["decoding"], ratio, f"{where}.decoding"))
    if node.method == "finch":
        press = cls(compression_ratio=ratio, **params)
        press.delimiter_token_id = NEVER_TOKEN  # the window is set from question_start, no delimiter token
        return press
    if k.ratio is not None:  # compression_ratio, or the press's own name for it (head_compression_ratio)
        return cls(**{k.ratio: ratio}, **params)
    return cls(**params)


@dataclass
class BuiltPress:
    press: Any  # the kvpress object (None: nothing to apply)
    node: Node
    prefill: bool  # hook the (context) prefill
    decode: bool  # hook the question prefill and the decoding steps
    rerotates: bool  # decoding continues right after the kept keys (kvpress's pipeline does the same)
    attn: Optional[str]


def build_press(node: Node, press_ratio: float, *, question_tokens: int | None = None,
                n_layers: int | None = None) -> BuiltPress:
    """The press for a resolved tree and the ratio its plan gives (None when nothing is compressed)."""
    k = node.kind
    if node.method == "full" or (node.takes_ratio() and press_ratio <= 0):
        return BuiltPress(None, node, False, False, False, None)
    for n in node.walk():
        if n.method == "per_layer" and n_layers is not None and len(n.params["compression_ratios"]) != n_layers:
            raise PressSpecError(f"compression_ratios has {len(n.params['compression_ratios'])} entries, this model "
                                 f"has {n_layers} layers", "kv_press.compression_ratios")
    press = build_node(node, press_ratio)
    if node.method == "finch":
        if not question_tokens:
            raise PressSpecError("finch needs a non-empty question after question_start", "kv_press.question_start")
        press.window_size = question_tokens
    decode = k.phase in ("decode", "prefill+decode") or (node.method == "dms" and node.params["decoding"])
    return BuiltPress(press, node, k.phase != "decode", decode, k.rerotates and node.params.get("rerotate_keys", True),
                      node.attn())


def masked_per_layer(model) -> list[int] | None:
    """Head-wise masked KV entries per layer (AdaKV-style presses keep full tensors and mask keys at
    attention time via module.masked_key_indices); None when no layer holds a mask."""
    layers = _attn_modules(model)
    counts, any_mask = [], False
    for attn in layers:
        idx = getattr(attn, "masked_key_indices", None)
        if idx is None:
            counts.append(0)
            continue
        any_mask = True
        counts.append(int(idx[0].numel()))
    return counts if any_mask else None


def clear_masks(model) -> None:
    for attn in _attn_modules(model):
        if getattr(attn, "masked_key_indices", None) is not None:
            attn.masked_key_indices = None


def _attn_modules(model) -> list[Any]:
    base = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in base.layers]


def bind_tokenizer(model, tokenizer) -> None:
    """Presses that load the tokenizer by the model's name at request time (KVzip: ``AutoTokenizer.
    from_pretrained(model.config.name_or_path)``) get the engine's loaded tokenizer instead: no disk read per
    request, and the same tokenizer the engine serves (a GGUF-loaded model has no Hub name)."""
    from kvpress.presses import kvzip_press

    real = kvzip_press.AutoTokenizer
    if getattr(real, "_kvt_bound", False):
        real = real._kvt_real
    name = model.config.name_or_path

    class _Bound:
        _kvt_bound = True
        _kvt_real = real

        @staticmethod
        def from_pretrained(path, *args, **kwargs):
            if path == name:
                return tokenizer
            return real.from_pretrained(path, *args, **kwargs)

    kvzip_press.AutoTokenizer = _Bound
