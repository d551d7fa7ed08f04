"""Batched decoding over sequences whose compressed caches differ in length, per layer too.

Each request is prefilled alone (under its kvpress press, into its own ``DynamicCache``); its compressed cache
then moves into a slot of :class:`SlotCache`, one preallocated buffer per layer of shape
``(slots, kv_heads, capacity, head_dim)``. A decode step runs the model ONCE for all active sequences: the
cache's ``update`` writes each sequence's new key/value at that sequence's own length in that layer, and the
attention function registered here (``kvt_ragged``, through transformers' ``AttentionInterface``) attends
each row to its own valid length per layer (padded SDPA with a key-padding mask, only where lengths differ).
kvpress's presses are untouched: they only ever see one sequence's prefill.

The same attention function also serves one sequence's multi-token "question" prefill over a cache whose
layers hold different lengths (PyramidKV under context_only / kvpress_pipeline scope): a bottom-right
aligned causal mask per layer, so the question goes in one forward pass instead of one token at a time.
"""

from __future__ import annotations

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
                 grouped: bool):
        self.L, self.H, self.D = n_layers, n_kv_heads, head_dim
        self.dtype, self.device, self.max_slots = dtype, torch.device(device), max_slots
        self.grouped = grouped  # GQA as (kv_heads, group) queries: no repeat_kv copy of the cache
        self.n = 0
        self.slots = 0
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
        self._masks: dict[int, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------- membership
    def allocated_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.K if k is not None)

    def held_tokens(self) -> np.ndarray:
        """KV entries held per (layer, row) for the active rows."""
        return self.lens[:, : self.n]

    def _grow(self, slots: int, caps: list[int]) -> None:
        new_slots = self.slots
        while new_slots < slots:
            new_slots = min(self.max_slots, max(1, new_slots * 2))
        for l in range(self.L):
            need = caps[l]
            if new_slots == self.slots and need <= self.cap[l] and self.K[l] is not None:
                continue
            cap = max(need, self.cap[l])
            if need > self.cap[l]:
                cap = max(need, int(self.cap[l] * 1.25))
                cap = -(-cap // 64) * 64
            # zeros, not empty: a masked (padding) position must not hold NaN (0 * NaN in the weighted sum)
            k = torch.zeros((new_slots, self.H, cap, self.D), dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            if self.K[l] is not None and self.n:
                m = int(self.lens[l, : self.n].max())
                k[: self.n, :, :m] = self.K[l][: self.n, :, :m]
                v[: self.n, :, :m] = self.V[l][: self.n, :, :m]
            self.K[l], self.V[l], self.cap[l] = k, v, cap
        if new_slots != self.slots:
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
        caps = [max(self.cap[l], lens[l] + extra) for l in range(self.L)]
        self._grow(self.n + 1, caps)
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
        self.n -= 1
        if self.n == 0:  # give the memory back between bursts
            self.K = [None] * self.L
            self.V = [None] * self.L
            self.cap = [0] * self.L
            self.slots = 0
            self.lens = np.zeros((self.L, 0), dtype=np.int64)
            self.lens_dev = self.lens_dev[:, :0]
            self.tokens, self.pos = self.tokens[:0], self.pos[:0]

    # ---------------------------------------------------------------------------------------- one step
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
        key = layer
        for prev in self._masks:
            if np.array_equal(self.lens[prev, : self.n], self.lens[layer, : self.n]):
                key = prev
                break
        mask = self._masks.get(key)
        if mask is None:
            m = int(self._step_len[layer])
            mask = (self._ar[:m][None, :] <= self.lens_dev[layer, : self.n][:, None])[:, None, None, :]
            self._masks[key] = mask
        return mask

    def attend(self, module, query, key, value, scaling):
        mask = self._mask(module.layer_idx)
        n, hq, q, d = query.shape
        hkv = key.shape[1]
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
