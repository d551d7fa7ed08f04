"""Fan-out prefill: one forward pass over a prompt feeds every request's press its own copy of each layer's KV.

Why it is exact: a kvpress press acts in a forward hook AFTER an attention layer has computed its output from
the full keys and values (kvpress ``BasePress.forward_hook``) and only rewrites that layer's cache entry. The
hidden states flowing to the next layer are the same whatever the press, so a single pass can, at each
attention layer, hand every variant (one request's built press) a fresh copy of the layer's full keys/values in
the variant's own cache and run the variant's hook on it, with the same hidden states, position embeddings,
attention weights and kwargs a separate prefill would have given it. What a press keeps on the attention
module (AdaKV-style ``masked_key_indices``) is snapshotted per variant and re-installed before that variant
continues; the global RNG (leverage, compactor, cur sketches) is forked per variant from the same seed, so each
variant draws the numbers a separate prefill draws.

Not every press's prefill is a plain hooked forward. Those get their own prefill (the separate path, the same
as without fan-out), and the reason is reported per variant (``Prefilled.reason``; the engine README has the
table):

* ``own_passes``: the press overrides kvpress's ``__call__`` to run passes of its own (KVzip's context
  reconstruction: the score of each key comes from extra forward passes over the compressed cache).
* ``attention``: the press needs another attention implementation than the others (eager for observed
  attention, non-eager for AdaKV/pyramidkv on an eager engine): the hidden states of an eager pass differ in
  the last bits from an sdpa one. Variants with the same implementation still share among themselves.
* ``alone``: no other variant to share the pass with.
* ``memory``: the variants' caches would not fit next to each other (CUDA free memory); the group is cut into
  passes that fit, and a variant that fits with no other runs alone.
* ``oom``: the shared pass ran out of memory anyway; every variant of that pass is prefilled on its own.
* ``empty_context``: a split scope with question_start 0: there is no context pass to share.

Decoding-time presses (``decoding``, ``cam``, ...) and requests that compress nothing (``full``, ratio 0, a
span below the press's minimum) have a plain prefill: they share it (their cache is a copy of the full one).

This module does not depend on the server or the scheduler: it takes the model, one prompt's token ids and the
variants, and returns per variant what a separate prefill would have produced.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from transformers import DynamicCache

from .build import BuiltPress, _attn_modules

DEFAULT_FANOUT_MAX = 32  # variants in one shared pass (each holds its own cache; see --fanout-max)
MEMORY_HEADROOM = 0.8  # fraction of the free device memory the variants' caches may take

REASONS = {
    "own_passes": "the press runs forward passes of its own (KVzip's context reconstruction)",
    "attention": "the press needs another attention implementation than the requests it arrived with",
    "alone": "no other request with the same prefill input to share the pass with",
    "memory": "the variants' caches would not fit in device memory next to each other",
    "oom": "the shared pass ran out of device memory; prefilled on its own",
    "empty_context": "question_start is 0: no context pass to share",
    "disabled": "fan-out is off (--fanout-max 1)",
}


@dataclass
class Prefilled:
    """One variant after its (context) prefill: what a separate prefill would have left."""

    cache: DynamicCache
    logits: Optional[torch.Tensor]  # first-token logits (query_aware); None: the question pass is still to run
    masks: Optional[list[Any]]  # per attention module: masked_key_indices after the prefill (None: no masks)
    rng: tuple[torch.Tensor, Optional[torch.Tensor]]  # the global RNG state a separate prefill leaves
    attn: str  # the attention implementation this variant runs under (prefill and everything after)
    shared: bool  # its prefill came from a pass shared with other variants
    reason: Optional[str]  # why not shared (a key of REASONS), None when shared
    share: int  # how many variants the pass that produced it served (1: its own pass)
    prefill_s: float  # wall time of that pass
    press_s: float  # time in this variant's press hooks


def target_attention(needed: Optional[str], current: str) -> str:
    """The attention implementation a request runs under: eager for presses that need attention weights,
    sdpa for presses kvpress refuses under eager, the engine's otherwise (engine.py `_attention`)."""
    if needed == "eager" and current != "eager":
        return "eager"
    if needed == "no_eager" and current == "eager":
        return "sdpa"
    return current


@contextlib.contextmanager
def attention(model, target: str):
    current = model.config._attn_implementation
    if target == current:
        yield current
        return
    model.set_attn_implementation(target)
    try:
        yield target
    finally:
        model.set_attn_implementation(current)


def _plain_call_classes() -> tuple[Any, ...]:
    from kvpress.presses.base_press import BasePress
    from kvpress.presses.decoding_press import DecodingPress
    from kvpress.presses.finch_press import FinchPress
    from kvpress.presses.prefill_decoding_press import PrefillDecodingPress

    # __call__ = register self.forward_hook on every attention layer (+ state resets on exit, and finch's
    # delimiter hook on the embeddings, a no-op here: the engine sets the window itself, build.NEVER_TOKEN)
    return (BasePress.__call__, DecodingPress.__call__, FinchPress.__call__, PrefillDecodingPress.__call__)


def share_blocker(built: BuiltPress) -> Optional[str]:
    """None when the variant's prefill can come from a shared pass, else the reason (a key of REASONS)."""
    if built.press is None or not built.prefill:
        return None  # a plain forward (no press, or a press that only acts while decoding)
    if type(built.press).__call__ not in _plain_call_classes():
        return "own_passes"
    return None


def masks_of(model) -> Optional[list[Any]]:
    got = [getattr(m, "masked_key_indices", None) for m in _attn_modules(model)]
    return got if any(g is not None for g in got) else None


def install_masks(model, masks: Optional[list[Any]]) -> None:
    """Put a variant's head-wise masks back on the attention modules (None: clear them)."""
    for i, m in enumerate(_attn_modules(model)):
        want = masks[i] if masks is not None else None
        if want is not None or getattr(m, "masked_key_indices", None) is not None:
            m.masked_key_indices = want


def kv_state(cache, masks: Optional[list[Any]], n_kv_heads: int) -> dict[str, Any]:
    """What a cache holds: per-layer lengths, bytes, head-wise masked entries and effective lengths."""
    lens = [cache.get_seq_length(i) for i in range(len(cache))]
    held = sum((layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() for layer in cache.layers)
    masked = None
    if masks is not None:
        masked = [int(m[0].numel()) if m is not None else 0 for m in masks]
    eff = [h - (m / n_kv_heads if masked else 0) for h, m in zip(lens, masked or [0] * len(lens))]
    return {"lens": lens, "bytes": held, "masked": masked, "effective": eff}


def _rng_state(device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng(state: tuple[torch.Tensor, Optional[torch.Tensor]], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def restore_rng(pf: Prefilled, device: torch.device) -> None:
    """Continue a variant with the RNG state its separate prefill would have left."""
    _set_rng(pf.rng, device)


def _no_sync() -> None:
    return None


def _forward(model, input_ids: torch.Tensor, span: int, cache) -> Optional[torch.Tensor]:
    """The prefill forward: the whole prompt (first-token logits) or the context before a split (none)."""
    if span >= input_ids.shape[1]:
        out = model(input_ids=input_ids, past_key_values=cache, logits_to_keep=1)
        return out.logits[0, -1]
    model.model(input_ids=input_ids[:, :span], past_key_values=cache)
    return None


@torch.inference_mode()
def prefill_one(model, input_ids: torch.Tensor, span: int, built: BuiltPress, *, attn: str,
                sync: Callable[[], None] = _no_sync, reason: Optional[str] = None) -> Prefilled:
    """The separate prefill of one request (the press's own context manager, as without fan-out)."""
    device = input_ids.device
    press_s = [0.0]
    cache = DynamicCache()
    install_masks(model, None)
    torch.manual_seed(0)  # presses with random sketches are reproducible (and equal to a shared pass)
    with attention(model, attn):
        sync()
        t0 = time.perf_counter()
        if span > 0:
            if built.press is not None and built.prefill:
                press = built.press
                inner = press.forward_hook

                def timed(*args, **kwargs):
                    sync()
                    t = time.perf_counter()
                    out = inner(*args, **kwargs)
                    sync()
                    press_s[0] += time.perf_counter() - t
                    return out

                prev = vars(press).get("forward_hook")  # the engine's own timing wrapper, if any
                press.forward_hook = timed  # BasePress.__call__ registers self.forward_hook
                try:
                    with press(model):
                        logits = _forward(model, input_ids, span, cache)
                finally:
                    if prev is None:
                        del press.forward_hook
                    else:
                        press.forward_hook = prev
            else:
                logits = _forward(model, input_ids, span, cache)
        else:
            logits = None
        sync()
        prefill_s = time.perf_counter() - t0
    masks = masks_of(model)
    install_masks(model, None)
    return Prefilled(cache, logits, masks, _rng_state(device), attn, False, reason, 1, prefill_s, press_s[0])


class _Slot:
    """A variant inside a shared pass."""

    def __init__(self, built: BuiltPress, n_layers: int, rng):
        self.built = built
        self.cache = DynamicCache()
        self.hook = built.press.forward_hook if (built.press is not None and built.prefill) else None
        self.masks: list[Any] = [None] * n_layers
        self.rng = rng
        self.press_s = 0.0


@torch.inference_mode()
def prefill_shared(model, input_ids: torch.Tensor, span: int, builts: list[BuiltPress], *, attn: str,
                   sync: Callable[[], None] = _no_sync) -> list[Prefilled]:
    """One forward pass for all ``builts`` (each shareable: ``share_blocker`` is None; same attention)."""
    device = input_ids.device
    modules = _attn_modules(model)
    n_layers = len(modules)
    install_masks(model, None)
    torch.manual_seed(0)
    rng0 = _rng_state(device)
    slots = [_Slot(b, n_layers, rng0) for b in builts]
    primary = DynamicCache()

    def fan_out(module, args, kwargs, output):
        li = module.layer_idx
        layer = primary.layers[li]
        keys, values = layer.keys, layer.values
        for s in slots:
            # the variant's own copy of this layer's full KV, made the way the attention's own cache.update
            # makes it in a separate prefill (cat onto an empty layer)
            s.cache.update(keys, values, li)
            if s.hook is None:
                continue
            module.masked_key_indices = None  # what kvpress's attention patch leaves during a prefill
            _set_rng(s.rng, device)
            kw = dict(kwargs)
            kw["past_key_values"] = s.cache
            sync()
            t = time.perf_counter()
            s.hook(module, args, kw, output)
            sync()
            s.press_s += time.perf_counter() - t
            s.rng = _rng_state(device)
            s.masks[li] = getattr(module, "masked_key_indices", None)
        if getattr(module, "masked_key_indices", None) is not None:
            module.masked_key_indices = None
        # nothing reads the full layer again: free it (the pass holds one full layer at a time)
        layer.keys, layer.values = keys[..., :0, :], values[..., :0, :]
        return output

    with attention(model, attn):
        for s in slots:  # what each press's __call__ does before registering its hook
            if s.hook is not None:
                s.built.press.post_init_from_model(model)
        base = model.model.language_model if hasattr(model.model, "language_model") else model.model
        hooks = []
        try:
            for m in modules:
                m.rotary_emb = base.rotary_emb
                hooks.append(m.register_forward_hook(fan_out, with_kwargs=True))
            sync()
            t0 = time.perf_counter()
            logits = _forward(model, input_ids, span, primary)
            sync()
            prefill_s = time.perf_counter() - t0
        finally:
            for h in hooks:
                h.remove()
            install_masks(model, None)
    out = []
    for s in slots:
        masks = s.masks if any(m is not None for m in s.masks) else None
        out.append(Prefilled(s.cache, logits, masks, s.rng, attn, True, None, len(slots), prefill_s, s.press_s))
    return out


def fanout_prefill(model, input_ids: torch.Tensor, span: int, builts: list[BuiltPress], *, base_attn: str,
                   fanout_max: int = DEFAULT_FANOUT_MAX, kv_bytes_per_token: int = 0,
                   mem_free: Optional[Callable[[], Optional[int]]] = None,
                   sync: Callable[[], None] = _no_sync) -> list[Prefilled]:
    """Prefill every variant of one prompt (same token ids, same span) with as few forward passes as exact
    sharing allows; returns one Prefilled per variant, in order.

    ``span``: tokens the press compresses in the pass (the whole prompt for query_aware; the context before
    the split for split scopes, whose question pass each variant then runs on its own cache: ``finish``).
    ``mem_free``: bytes the variants' caches may use (default: CUDA free memory; None on CPU: no bound).
    """
    device = input_ids.device
    results: list[Optional[Prefilled]] = [None] * len(builts)
    targets = [target_attention(b.attn if b.press is not None else None, base_attn) for b in builts]

    def alone(i: int, reason: str) -> None:
        results[i] = prefill_one(model, input_ids, span, builts[i], attn=targets[i], sync=sync, reason=reason)

    if span <= 0:
        for i in range(len(builts)):
            alone(i, "empty_context")
        return results  # type: ignore[return-value]
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(builts):
        why = share_blocker(b)
        if why is not None:
            alone(i, why)
        else:
            groups.setdefault(targets[i], []).append(i)
    # how many full-size caches fit next to each other (an upper bound: compressing presses keep less)
    if mem_free is None and device.type == "cuda":
        mem_free = lambda: torch.cuda.mem_get_info(device)[0]  # noqa: E731
    free = mem_free() if mem_free is not None else None
    cap = max(1, int(fanout_max))
    if free is not None and kv_bytes_per_token > 0:
        cap = min(cap, max(1, int(free * MEMORY_HEADROOM // max(1, span * kv_bytes_per_token))))
    for attn, idx in groups.items():
        if len(idx) == 1:
            other_attn = any(t != attn for j, t in enumerate(targets) if j != idx[0])
            alone(idx[0], "attention" if other_attn else ("disabled" if fanout_max <= 1 else "alone"))
            continue
        for c in range(0, len(idx), cap):
            chunk = idx[c : c + cap]
            if len(chunk) == 1:
                alone(chunk[0], "disabled" if fanout_max <= 1 else ("memory" if cap < fanout_max else "alone"))
                continue
            try:
                got = prefill_shared(model, input_ids, span, [builts[i] for i in chunk], attn=attn, sync=sync)
            except torch.OutOfMemoryError:
                got = None
            if got is None:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                for i in chunk:
                    alone(i, "oom")
                continue
            for i, pf in zip(chunk, got):
                results[i] = pf
    return results  # type: ignore[return-value]


@dataclass
class Continued:
    """A variant ready to decode: the first token's logits, the next position, the cache state."""

    logits: torch.Tensor
    position: int
    after: dict[str, Any]
    question_s: float = 0.0
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the decoding-time press context


def press_context(model, built: BuiltPress, phase: str):
    on = built.prefill if phase == "prefill" else built.decode
    return built.press(model) if (built.press is not None and on) else contextlib.nullcontext()


@torch.inference_mode()
def finish(model, pf: Prefilled, built: BuiltPress, input_ids: torch.Tensor, split: Optional[int],
           n_kv_heads: int, sync: Callable[[], None] = _no_sync) -> Continued:
    """After the (context) prefill, what engine.generate does before its decoding loop: enter the decoding-time
    press context and, for split scopes, prefill the question on the variant's compressed cache. Call it under
    ``attention(model, pf.attn)`` with the variant's masks installed (``install_masks(model, pf.masks)``); the
    returned ``stack`` must be closed after decoding."""
    n = input_ids.shape[1]
    cache = pf.cache
    stack = contextlib.ExitStack()
    if split is None:
        after = kv_state(cache, pf.masks, n_kv_heads)
        position = cache.get_seq_length() if built.rerotates else n
        stack.enter_context(press_context(model, built, "decode"))
        return Continued(pf.logits, position, after, 0.0, stack)  # type: ignore[arg-type]
    sync()
    t = time.perf_counter()
    after_ctx = kv_state(cache, pf.masks, n_kv_heads)
    start = cache.get_seq_length() if (built.rerotates and split > 0) else split
    stack.enter_context(press_context(model, built, "decode"))
    q = input_ids[:, split:]
    pos = torch.arange(start, start + q.shape[1], device=input_ids.device).unsqueeze(0)
    lens = after_ctx["lens"] if split > 0 else [0]
    if len(set(lens)) <= 1:
        out = model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1)
    else:  # per-layer lengths differ (pyramidkv): one question token at a time (engine.generate does the same)
        for j in range(q.shape[1]):
            out = model(input_ids=q[:, j : j + 1], past_key_values=cache, position_ids=pos[:, j : j + 1])
    after = kv_state(cache, masks_of(model), n_kv_heads)
    sync()
    return Continued(out.logits[0, -1], start + q.shape[1], after, time.perf_counter() - t, stack)


@torch.inference_mode()
def greedy(model, cont: Continued, cache, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Plain greedy decoding from a Continued (stops after an end-of-sequence id or max_new_tokens)."""
    dev = cont.logits.device
    gen: list[int] = []
    next_id = int(cont.logits.argmax())
    position = cont.position
    while True:
        gen.append(next_id)
        if next_id in stop_ids or len(gen) >= max_new_tokens:
            return gen
        out = model(input_ids=torch.tensor([[next_id]], device=dev), past_key_values=cache,
                    position_ids=torch.tensor([[position]], device=dev))
        position += 1
        next_id = int(out.logits[0, -1].argmax())
