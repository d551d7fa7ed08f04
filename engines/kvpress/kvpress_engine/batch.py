"""Batched decoding over sequences whose compressed caches differ in length, per layer too.

Each request is prefilled alone (under its kvpress press, into its own ``DynamicCache``); its compressed cache
then moves into a slot of :class:`SlotCache`, one preallocated buffer per layer of shape
``(slots, kv_heads, capacity, head_dim)``. A decode step runs the model ONCE for all active sequences: the
cache's ``update`` writes each sequence's new key/value at that sequence's own length in that layer, and the
attention function registered here (``kvt_ragged``, through transformers' ``AttentionInterface``) attends
each row to its own valid length per layer (padded SDPA with a key-padding mask, only where lengths differ).
kvpress's presses are untouched: they only ever see one sequence's prefill.

A step runs in one of three ways (``Batch(step_mode=...)``): ``eager`` slices every layer's buffer to the
longest row and masks only ragged layers (host reads of the lengths decide shapes); ``static`` attends over each
layer's whole capacity with a mask built on the device from the device-side lengths, at a batch size rounded up
to a bucket (padding rows hold length 0), so no shape depends on a host value; ``graph`` is ``static`` captured
once per (bucket, buffer generation) into a CUDA graph and replayed: one launch per step instead of ~30 kernels
per layer. Reallocating a buffer (a longer sequence joins, more rows) starts a new generation: its graphs are
dropped and captured again on first use.

The same attention function also serves one sequence's multi-token "question" prefill over a cache whose
layers hold different lengths (PyramidKV under context_only / kvpress_pipeline scope): a bottom-right
aligned causal mask per layer, so the question goes in one forward pass instead of one token at a time.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTN_NAME = "kvt_ragged"


def ragged_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     kvt_batch: "SlotCache | None" = None, **kwargs):
    if kvt_batch is not None:
        return kvt_batch.attend(module, query, key, value, scaling)
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len > 1 and k_len > q_len:
        # one sequence, several new tokens after a cache of this layer's own length: query i sees keys
        # [0, k_len - q_len + i] (the mask transformers builds is sized for layer 0 only)
        i = torch.arange(q_len, device=query.device)[:, None]
        j = torch.arange(k_len, device=query.device)[None, :]
        attention_mask = (j <= i + (k_len - q_len))[None, None]
    else:
        attention_mask = None
    # kvpress patches "sdpa" (head-wise masked keys): call the patched one
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)


AttentionInterface.register(ATTN_NAME, ragged_attention)


def decode_kernels(device: torch.device):
    """SDPA backends for decoding steps on CUDA: flash / memory-efficient / math, not cuDNN. cuDNN's SDPA builds
    an execution plan per shape, and a decoding step's key length grows by one every step, so it rebuilt one
    per layer per step: ~1.5 ms of host time per call on the H200, 47 ms of a 72 ms step at 8B (the profile in
    engines/kvpress/README.md). Elsewhere: nothing to choose."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class use_attention:
    """Run the model with another attention implementation for the duration of a block (no validation,
    no re-dispatch: transformers reads config._attn_implementation at every attention call)."""

    def __init__(self, model, name: str):
        self.cfg, self.name = model.config, name

    def __enter__(self):
        self.prev = self.cfg._attn_implementation_internal
        self.cfg._attn_implementation_internal = self.name

    def __exit__(self, *exc):
        self.cfg._attn_implementation_internal = self.prev


class SlotCache:
    """Per-layer slot buffers for the active sequences (rows 0..n-1, kept contiguous: a leaving sequence's
    slot is refilled by the last one). Duck-types the part of transformers' Cache a decoder layer calls."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype, device, max_slots: int,
                 grouped: bool, static_attn: str = "sdpa", limit_bytes: int | None = None):
        self.L, self.H, self.D = n_layers, n_kv_heads, head_dim
        self.dtype, self.device, self.max_slots = dtype, torch.device(device), max_slots
        self.elem = torch.tensor([], dtype=dtype).element_size()
        self.limit_bytes = limit_bytes  # --kv-cache-limit-gib: what the slot buffers may hold at most
        self.grouped = grouped  # GQA as (kv_heads, group) queries: no repeat_kv copy of the cache
        self.n = 0
        self.slots = 0
        self.gen = 0  # bumped whenever a buffer is reallocated (captured graphs hold their addresses)
        self.static_rows: int | None = None  # a static step: rows 0..static_rows-1, whole capacity
        if static_attn not in ("sdpa", "matmul"):
            raise ValueError(f"static_attn must be sdpa or matmul, not {static_attn!r}")
        self.static_attn = static_attn
        self.cap = [0] * n_layers
        self.K: list[torch.Tensor | None] = [None] * n_layers
        self.V: list[torch.Tensor | None] = [None] * n_layers
        self.lens = np.zeros((n_layers, 0), dtype=np.int64)  # host mirror: tokens held per (layer, row)
        self.lens_dev = torch.zeros((n_layers, 0), dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # next input token per row
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)  # its position id
        self._rows = torch.arange(max_slots, device=self.device)
        self._ar = torch.zeros(0, dtype=torch.long, device=self.device)
        self._step_len: np.ndarray | None = None
        self._ragged: np.ndarray | None = None
        self._masks: dict[bytes, torch.Tensor] = {}
        self._smasks: torch.Tensor | None = None

    # ---------------------------------------------------------------------------------------- membership
    def allocated_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.K if k is not None)

    def held_tokens(self) -> np.ndarray:
        """KV entries held per (layer, row) for the active rows."""
        return self.lens[:, : self.n]

    def _plan(self, slots: int, caps: list[int], exact: bool = False) -> tuple[int, list[int]]:
        """Rows and per-layer capacities after growing to hold ``slots`` rows and ``caps`` tokens: rows double
        (``exact``: just enough), a capacity that must grow grows by >= 25%, rounded up to 64 tokens."""
        new_slots = self.slots
        if exact:
            new_slots = max(self.slots, slots)
        while new_slots < slots:
            new_slots = min(self.max_slots, max(1, new_slots * 2))
        new_caps = []
        for l in range(self.L):
            need, cap = caps[l], self.cap[l]
            if need > cap or self.K[l] is None:
                cap = -(-max(need, int(cap * 1.25)) // 64) * 64
            new_caps.append(cap)
        return new_slots, new_caps

    def _plan_bytes(self, slots: int, caps: list[int]) -> int:
        return 2 * slots * self.H * self.D * self.elem * sum(caps)

    def _join_plan(self, lens: list[int], extra: int) -> tuple[int, list[int]]:
        caps = [max(self.cap[l], lens[l] + extra) for l in range(self.L)]
        plan = self._plan(self.n + 1, caps)
        if self.limit_bytes is not None and self._plan_bytes(*plan) > self.limit_bytes:
            plan = self._plan(self.n + 1, caps, exact=True)  # doubling the rows would not fit: one more row
        return plan

    def bytes_after_join(self, lens: list[int], extra: int) -> int:
        """What the slot buffers would hold (bytes) with one more row of these per-layer lengths + ``extra``."""
        return self._plan_bytes(*self._join_plan(lens, extra))

    def _grow(self, slots: int, caps: list[int]) -> None:
        self._apply(*self._plan(slots, caps))

    def _apply(self, new_slots: int, new_caps: list[int]) -> None:
        for l in range(self.L):
            cap = new_caps[l]
            if new_slots == self.slots and cap == self.cap[l] and self.K[l] is not None:
                continue
            # zeros, not empty: a masked (padding) position must not hold NaN (0 * NaN in the weighted sum)
            k = torch.zeros((new_slots, self.H, cap, self.D), dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            if self.K[l] is not None and self.n:
                m = int(self.lens[l, : self.n].max())
                k[: self.n, :, :m] = self.K[l][: self.n, :, :m]
                v[: self.n, :, :m] = self.V[l][: self.n, :, :m]
            self.K[l], self.V[l], self.cap[l] = k, v, cap
            self.gen += 1
        if new_slots != self.slots:
            self.gen += 1

            def widen(t, fill=0):
                out = torch.full((*t.shape[:-1], new_slots), fill, dtype=t.dtype, device=t.device)
                out[..., : t.shape[-1]] = t
                return out

            self.lens_dev = widen(self.lens_dev)
            self.tokens, self.pos = widen(self.tokens), widen(self.pos)
            lens = np.zeros((self.L, new_slots), dtype=np.int64)
            lens[:, : self.slots] = self.lens
            self.lens = lens
            self.slots = new_slots

    def add(self, layers: list[tuple[torch.Tensor, torch.Tensor]], token: torch.Tensor, position: int,
            extra: int) -> int:
        """Move one sequence's cache (per layer (1, H, len, D) keys and values) into a new row; room for
        ``extra`` more tokens. ``token``: its next input (a 0-d/1-element tensor on the device). Returns the row."""
        assert self.n < self.max_slots
        lens = [k.shape[2] for k, _ in layers]
        self._apply(*self._join_plan(lens, extra))
        r = self.n
        for l, (k, v) in enumerate(layers):
            if lens[l]:
                self.K[l][r, :, : lens[l]] = k[0]
                self.V[l][r, :, : lens[l]] = v[0]
        self.lens[:, r] = lens
        self.lens_dev[:, r] = torch.as_tensor(lens, dtype=torch.long).to(self.device, non_blocking=True)
        self.tokens[r] = token.reshape(())
        self.pos[r] = position
        self.n += 1
        return r

    def reserve(self, row: int, extra: int) -> None:
        """Make sure the row can grow ``extra`` more tokens in every layer."""
        caps = [max(self.cap[l], int(self.lens[l, row]) + extra) for l in range(self.L)]
        self._grow(self.n, caps)

    def remove(self, row: int) -> None:
        last = self.n - 1
        if row != last:
            for l in range(self.L):
                m = int(self.lens[l, last])
                if m:
                    self.K[l][row, :, :m] = self.K[l][last, :, :m]
                    self.V[l][row, :, :m] = self.V[l][last, :, :m]
            self.lens[:, row] = self.lens[:, last]
            self.lens_dev[:, row] = self.lens_dev[:, last]
            self.tokens[row] = self.tokens[last]
            self.pos[row] = self.pos[last]
        # the vacated row becomes padding for a static step: length 0, token 0, position 0
        self.lens[:, last] = 0
        self.lens_dev[:, last] = 0
        self.tokens[last] = 0
        self.pos[last] = 0
        self.n -= 1
        if self.n == 0:  # give the memory back between bursts
            self.gen += 1
            self.K = [None] * self.L
            self.V = [None] * self.L
            self.cap = [0] * self.L
            self.slots = 0
            self.lens = np.zeros((self.L, 0), dtype=np.int64)
            self.lens_dev = self.lens_dev[:, :0]
            self.tokens, self.pos = self.tokens[:0], self.pos[:0]

    # ---------------------------------------------------------------------------------------- one step
    def bucket(self, n: int) -> int:
        """The static batch size serving ``n`` rows: 1, 2, 4, then the next multiple of 4, at most the rows
        allocated. Padding rows cost a whole row of attention reads each (their slot's full capacity), so the
        buckets stay close above 4 (vLLM's graph sizes go 1, 2, 4, 8, 16, 24, ...); each bucket is one capture."""
        b = n if n <= 2 else (4 if n <= 4 else -(-n // 4) * 4)
        return min(b, self.slots)

    def prepare_step(self) -> None:
        n = self.n
        held = self.lens[:, :n]
        self._step_len = held.max(axis=1) + 1  # key length per layer after this step's write
        self._ragged = held.min(axis=1) + 1 != self._step_len  # rows differ: a key-padding mask is needed
        need = int(self._step_len.max())
        if self._ar.numel() < need:
            self._ar = torch.arange(max(need, 2 * self._ar.numel()), device=self.device)
        self._masks = {}

    def finish_step(self) -> None:
        n = self.n
        self.lens[:, :n] += 1
        self.lens_dev[:, :n] += 1
        self.pos[:n] += 1

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs: Any = None):
        if self.static_rows is not None:
            b = self.static_rows
            rows, at = self._rows[:b], self.lens_dev[layer_idx, :b]
            K, V = self.K[layer_idx], self.V[layer_idx]
            K[rows, :, at] = key_states[:, :, 0]
            V[rows, :, at] = value_states[:, :, 0]
            return K[:b], V[:b]
        n = self.n
        rows = self._rows[:n]
        at = self.lens_dev[layer_idx, :n]
        K, V = self.K[layer_idx], self.V[layer_idx]
        K[rows, :, at] = key_states[:, :, 0]
        V[rows, :, at] = value_states[:, :, 0]
        m = int(self._step_len[layer_idx])
        return K[:n, :, :m], V[:n, :, :m]

    def _mask(self, layer: int) -> torch.Tensor | None:
        if not self._ragged[layer]:
            return None
        # layers with the same per-row lengths share one mask (all of them, unless the press is per-layer)
        key = self.lens[layer, : self.n].tobytes()
        mask = self._masks.get(key)
        if mask is None:
            m = int(self._step_len[layer])
            mask = (self._ar[:m][None, :] <= self.lens_dev[layer, : self.n][:, None])[:, None, None, :]
            self._masks[key] = mask
        return mask

    def _static_masks(self) -> None:
        # every layer's valid keys after this step's write, one kernel for all layers: positions 0..len of each
        # row (its new key sits at len); layer l uses the first cap[l] columns
        b = self.static_rows
        self._smasks = torch.arange(max(self.cap), device=self.device)[None, None, :] <= self.lens_dev[:, :b, None]

    def attend(self, module, query, key, value, scaling):
        n, hq, q, d = query.shape
        hkv = key.shape[1]
        if self.static_rows is not None:
            if module.layer_idx == 0 or self._smasks is None:
                self._static_masks()
            mask = self._smasks[module.layer_idx, :, None, None, : key.shape[2]]
            if self.static_attn == "matmul":
                # decoding attention as two batched matmuls: reads K and V once at any batch size (the
                # memory-efficient SDPA kernel parallelizes over batch x heads only: few blocks at batch 1).
                # Scores in float32 as flash attention keeps them (bmm with out_dtype on CUDA), the weights
                # back in the cache dtype for the product with V, as flash attention does too
                g, cap = hq // hkv, key.shape[2]
                scale = scaling if scaling is not None else d ** -0.5
                qg = (query * scale).reshape(n * hkv, g * q, d)
                kt = key.reshape(n * hkv, cap, d).transpose(1, 2)
                if query.is_cuda and query.dtype != torch.float32:
                    w = torch.bmm(qg, kt, out_dtype=torch.float32)
                else:
                    w = torch.bmm(qg.float(), kt.float())
                w = w.view(n, hkv, g * q, cap).masked_fill(~mask, float("-inf")).softmax(-1)
                out = torch.bmm(w.to(value.dtype).view(n * hkv, g * q, cap), value.reshape(n * hkv, cap, d))
                return out.view(n, hq, q, d).transpose(1, 2).contiguous(), None
        else:
            mask = self._mask(module.layer_idx)
        if self.grouped and hq != hkv:
            out = torch.nn.functional.scaled_dot_product_attention(
                query.reshape(n, hkv, (hq // hkv) * q, d), key, value, attn_mask=mask, scale=scaling)
            return out.reshape(n, hq, q, d).transpose(1, 2).contiguous(), None
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, dropout=0.0, scaling=scaling)

    # what the rest of transformers may ask a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lens[layer_idx, : self.n].max()) if self.n else 0

    def __len__(self) -> int:
        return self.L

    is_compileable = False


# -------------------------------------------------------------------------------------------- static steps
STEP_MODES = ("auto", "eager", "static", "graph")


def resolve_step_mode(mode: str, device: torch.device) -> str:
    """``auto``: CUDA graphs on CUDA, eager elsewhere (a graph needs CUDA; ``static`` without capture is the
    same computation, kept for tests and for a model whose forward cannot be captured)."""
    if mode not in STEP_MODES:
        raise ValueError(f"step mode must be one of {', '.join(STEP_MODES)}, not {mode!r}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise ValueError("step mode 'graph' needs a CUDA device")
    return mode


def forward_step(model, c: SlotCache, b: int, fused: "Fused | None" = None, static: bool = True) -> torch.Tensor:
    """One decoding step over rows 0..b-1 of ``c``; returns the greedy next token of every row, (b,) on the
    device. ``static``: rows >= c.n are padding and every shape depends on ``b`` and the buffers only (what a
    CUDA graph captures); otherwise ``b`` is c.n and the shapes come from the lengths (c.prepare_step first)."""
    if static:
        c.static_rows, c._smasks = b, None
    try:
        with use_attention(model, ATTN_NAME), decode_kernels(c.device), (fused or contextlib.nullcontext()):
            out = model(input_ids=c.tokens[:b, None], position_ids=c.pos[:b, None], past_key_values=c,
                        cache_position=c.pos[:1], use_cache=True, kvt_batch=c, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1)
    finally:
        c.static_rows, c._smasks = None, None


class Fused:
    """The model's elementwise blocks compiled (torch.compile / inductor) for static steps only: every
    ``*RMSNorm`` and ``*MLP`` module's class forward and the modeling module's ``apply_rotary_pos_emb``, swapped
    in for the duration of a step (prefill, presses and eager steps keep transformers' own code). Fusing them
    cuts a Llama layer's ~50 kernels to ~20; inside a CUDA graph that is what is left of a step's overhead.
    One compiled function per class, shared by its instances; the batch size becomes dynamic after the
    second bucket (dynamo's automatic dynamic shapes), so later buckets do not compile again."""

    def __init__(self, model):
        import functools
        import sys

        self.swaps: list[tuple[Any, str, Any]] = []
        compiled: dict[Any, Any] = {}
        modeling = set()
        for mod in model.modules():
            cls = type(mod)
            if cls.__name__.endswith(("RMSNorm", "MLP")):
                if cls not in compiled:
                    compiled[cls] = torch.compile(cls.forward)
                self.swaps.append((mod, "forward", functools.partial(compiled[cls], mod)))
            if hasattr(mod, "layer_idx") and hasattr(mod, "q_proj"):
                modeling.add(sys.modules[cls.__module__])
        for m in modeling:
            if callable(getattr(m, "apply_rotary_pos_emb", None)):
                self.swaps.append((m, "apply_rotary_pos_emb", torch.compile(m.apply_rotary_pos_emb)))
        self.kept: list[Any] = []

    def __bool__(self) -> bool:
        return bool(self.swaps)

    def __enter__(self):
        self.kept = []
        for obj, attr, new in self.swaps:
            self.kept.append(obj.__dict__.get(attr, _MISSING))
            setattr(obj, attr, new)
        return self

    def __exit__(self, *exc):
        for (obj, attr, _), old in zip(self.swaps, self.kept):
            if old is _MISSING:
                delattr(obj, attr)  # back to the class's method
            else:
                setattr(obj, attr, old)
        self.kept = []


_MISSING = object()


class StepGraphs:
    """CUDA graphs of :func:`forward_step`, one per bucket of the current buffer generation.

    Capturing runs the step (twice on a side stream to warm up, once under capture): each run writes this
    step's keys and values at every row's next free position, which the replay then overwrites with the same
    values, and padding rows write at their position 0 — so capturing never changes a sequence's cache."""

    def __init__(self, model, cache: SlotCache, warmup: int = 2, fused: "Fused | None" = None):
        self.model, self.cache, self.warmup = model, cache, warmup
        self.fused = fused if fused else None
        self.fuse_reason: str | None = None  # why fusing was given up (its compile failed)
        self.gen = -1
        self.graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self.pool = None  # one memory pool for every bucket's graph (made at the first capture)
        self.captures = 0
        self.capture_s = 0.0
        self.replays = 0

    def run(self, n: int) -> torch.Tensor:
        """The next token of rows 0..n-1 ((n,) on the device), by replaying (capturing first if needed)."""
        c = self.cache
        if c.gen != self.gen:  # the buffers moved: the old graphs point at freed memory
            self.graphs.clear()
            self.gen = c.gen
        b = c.bucket(n)
        entry = self.graphs.get(b)
        if entry is None:
            entry = self.graphs[b] = self._capture(b)
        entry[0].replay()
        self.replays += 1
        return entry[1][:n]

    def _capture(self, b: int):
        import time

        t = time.perf_counter()
        model, c = self.model, self.cache
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=c.device)
        side.wait_stream(torch.cuda.current_stream(c.device))
        with torch.cuda.stream(side):
            for i in range(self.warmup):
                try:
                    forward_step(model, c, b, self.fused)
                except Exception as e:  # noqa: BLE001 - the compiled blocks failed: capture unfused
                    if self.fused is None:
                        raise
                    import logging

                    logging.getLogger("kvpress_engine").warning(
                        "compiling the decoding step's blocks failed, capturing them unfused: %s: %s",
                        type(e).__name__, e)
                    self.fused, self.fuse_reason = None, f"{type(e).__name__}: {e}"
                    forward_step(model, c, b)
        torch.cuda.current_stream(c.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of another thread (metrics, NVML) does not break this thread's capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = forward_step(model, c, b, self.fused)
        self.captures += 1
        self.capture_s += time.perf_counter() - t
        return graph, out

    def reset(self) -> None:
        self.graphs.clear()
        self.gen = -1
