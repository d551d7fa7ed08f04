"""The generation core: tokenize, prefill one request under a kvpress press, then greedy decoding, batched
across requests (batch.py) unless the press hooks the decoding steps."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .batch import ATTN_NAME, SlotCache, StepGraphs, decode_kernels, forward_step, resolve_step_mode, use_attention
from . import fanout
from .build import BuiltPress, bind_tokenizer, build_press, clear_masks, masked_per_layer
from .detok import Detokenizer
from .methods import SPLIT_SCOPES, PressSpec, plan_compression

log = logging.getLogger("kvpress_engine")

QUESTION_MARK = "\u27e6kvt-question-start\u27e7"


class RequestError(ValueError):
    """A request that cannot be served as asked (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass
class Encoded:
    ids: list[int]
    split: int | None  # context_only: number of context tokens (the question starts at this token)


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    applied: dict[str, Any]
    token_ids: list[int] = field(default_factory=list)


def message_text(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts whose text parts are concatenated."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise RequestError("only text content parts are supported", "messages")
        return "".join(out)
    raise RequestError("message content must be a string or a list of text parts", "messages")


class Engine:
    def __init__(self, model, tokenizer, *, device: str, max_model_len: int, attn_implementation: str, name: str,
                 step_mode: str = "auto", static_attn: str = "matmul", fuse: bool | None = None,
                 kv_limit_bytes: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        # how a batched decoding step runs (batch.py): eager | static | graph (auto: graph on CUDA)
        self.step_mode = resolve_step_mode(step_mode, self.device)
        self.static_attn = static_attn
        self.kv_limit_bytes = kv_limit_bytes  # the batch's slot buffers hold at most this (None: free memory)
        # graph steps: the norms, MLPs and rotary embedding compiled (batch.Fused); None = on for graph steps
        self.fuse = (self.step_mode == "graph") if fuse is None else fuse
        self._fused = None
        self.max_model_len = max_model_len
        self.base_attn = attn_implementation
        self.name = name
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_kv_heads = cfg.num_key_value_heads
        bind_tokenizer(model, tokenizer)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elem = torch.tensor([], dtype=model.dtype).element_size()
        # bytes of K+V for one token in all layers
        self.kv_bytes_per_token = 2 * cfg.num_key_value_heads * head_dim * elem * self.n_layers
        stop = model.generation_config.eos_token_id
        stop = list(stop) if isinstance(stop, (list, tuple)) else ([stop] if stop is not None else [])
        if tokenizer.eos_token_id is not None:
            stop.append(tokenizer.eos_token_id)
        self.stop_ids = set(int(s) for s in stop)
        # live state read by /metrics (plain attribute writes; the metrics thread only reads)
        self.live_kv_tokens = 0
        self.live_kv_bytes = 0

    # ------------------------------------------------------------------ tokenization

    def _encode_text(self, text: str, split_char: int | None, separate: bool = False) -> Encoded:
        tok = self.tokenizer
        if split_char is None:
            return Encoded(tok.encode(text, add_special_tokens=False), None)
        if separate:
            # kvpress's pipeline: the context and the question (with the template's closing tokens and any
            # answer prefix) are two tokenizations, so a token never straddles the split
            ctx = tok.encode(text[:split_char], add_special_tokens=False)
            q = tok.encode(text[split_char:], add_special_tokens=False)
            return Encoded(ctx + q, len(ctx))
        if getattr(tok, "is_fast", False):
            # one tokenization of the whole text (identical to query_aware); the question starts at the first
            # token that ends after the split character
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            split = next((i for i, (_, end) in enumerate(offsets) if end > split_char), len(ids))
            return Encoded(list(ids), split)
        ctx = tok.encode(text[:split_char], add_special_tokens=False)
        q = tok.encode(text[split_char:], add_special_tokens=False)
        return Encoded(ctx + q, len(ctx))

    def encode_completion(self, prompt: Any, question_start: int | None, separate: bool = False) -> Encoded:
        """prompt: a string (question_start = character offset) or a list of token ids (token index)."""
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model.config.vocab_size
            if any(t < 0 or t >= vocab for t in prompt):
                raise RequestError(f"token ids must be in [0, {vocab})", "prompt")
            if question_start is not None and question_start > len(prompt):
                raise RequestError(
                    f"question_start {question_start} is past the prompt's {len(prompt)} tokens",
                    "kv_press.question_start",
                )
            return Encoded(list(prompt), question_start)
        assert isinstance(prompt, str)
        if question_start is not None and question_start > len(prompt):
            raise RequestError(
                f"question_start {question_start} is past the prompt's {len(prompt)} characters",
                "kv_press.question_start",
            )
        return self._encode_text(prompt, question_start, separate)

    def render_chat(self, messages: list[dict[str, Any]], question_start: int | None) -> tuple[str, int | None]:
        """Chat template text, and (context_only) the character offset of question_start in it.

        question_start counts characters in the text of the LAST user message.
        """
        msgs = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
        split_char = None
        if question_start is not None:
            users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            if not users:
                raise RequestError("context_only on chat needs a user message", "messages")
            last = users[-1]
            content = msgs[last]["content"]
            if question_start > len(content):
                raise RequestError(
                    f"question_start {question_start} is past the last user message's {len(content)} characters",
                    "kv_press.question_start",
                )
            msgs[last] = {**msgs[last], "content": content[:question_start] + QUESTION_MARK + content[question_start:]}
        tok = self.tokenizer
        if tok.chat_template is not None:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        if question_start is not None:
            split_char = text.find(QUESTION_MARK)
            if split_char < 0 or text.count(QUESTION_MARK) != 1:
                raise RequestError("could not locate question_start in the chat template output", "messages")
            text = text.replace(QUESTION_MARK, "")
        return text, split_char

    def encode_chat(self, messages: list[dict[str, Any]], question_start: int | None,
                    separate: bool = False) -> Encoded:
        text, split_char = self.render_chat(messages, question_start)
        return self._encode_text(text, split_char, separate)

    # ------------------------------------------------------------------ generation

    @contextlib.contextmanager
    def _attention(self, needed: str | None):
        """Switch the attention implementation for one request (observed_attention needs eager weights;
        pyramidkv's per-layer cache lengths need a kernel that does not build a full-size mask: sdpa)."""
        current = self.model.config._attn_implementation
        target = current
        if needed == "eager" and current != "eager":
            target = "eager"
        elif needed == "no_eager" and current == "eager":
            target = "sdpa"
        if target == current:
            yield current
            return
        self.model.set_attn_implementation(target)
        try:
            yield target
        finally:
            self.model.set_attn_implementation(current)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check_length(self, n_prompt: int, max_tokens: int | None, default_max_tokens: int) -> int:
        limit = self.max_model_len
        if n_prompt == 0:
            raise RequestError("the prompt is empty", "prompt")
        if n_prompt >= limit:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens; the prompt has {n_prompt} tokens "
                "(no room to generate). Shorten the prompt.",
                "prompt",
                "context_length_exceeded",
            )
        if max_tokens is None:
            return min(default_max_tokens, limit - n_prompt)
        if n_prompt + max_tokens > limit:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens; the prompt has {n_prompt} tokens and "
                f"max_tokens is {max_tokens} ({n_prompt + max_tokens} in all). Reduce the prompt or max_tokens.",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_tokens

    def _press_ctx(self, built: BuiltPress, phase: str):
        on = built.prefill if phase == "prefill" else built.decode
        return built.press(self.model) if (built.press is not None and on) else contextlib.nullcontext()

    def _kv_state(self, cache) -> dict[str, Any]:
        """What the cache holds now: per-layer lengths, bytes, and head-wise masks (AdaKV-style presses keep
        the full tensors and mask keys at attention time: held != effective)."""
        layer_lens = [cache.get_seq_length(i) for i in range(len(cache))]
        held_bytes = sum(
            (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() for layer in cache.layers
        )
        masked = masked_per_layer(self.model)
        eff = [h - (m / self.n_kv_heads if masked else 0) for h, m in zip(layer_lens, masked or [0] * len(layer_lens))]
        return {"lens": layer_lens, "bytes": held_bytes, "masked": masked, "effective": eff}

    # ------------------------------------------------------------------ one request: prefill

    def batch_policy(self, built: BuiltPress) -> str | None:
        """Why a request cannot decode in the shared batch (None: it can)."""
        if built.press is None:
            return None
        if built.decode:
            return "decoding-time press (it compresses the cache while generating): decoded alone"
        if built.node.memory() == "masks":
            return "head-wise masked keys (kvpress's fake-key attention patch, per sequence): decoded alone"
        return None

    def prefill_key(self, enc: Encoded, spec: PressSpec) -> tuple:
        """Requests with equal keys have the same prefill input (token ids, and the split for split scopes):
        one fan-out pass (fanout.py) can serve them all."""
        return (tuple(enc.ids), enc.split if spec.scope in SPLIT_SCOPES else None)

    def _new_active(self, enc: Encoded, spec: PressSpec, max_new_tokens: int, *, stop: list[str] | None,
                    ignore_eos: bool, on_delta: Callable[[str], None] | None,
                    cancelled: Callable[[], bool] | None) -> "Active":
        """Validate a request and build its press: everything before its prefill."""
        ids = enc.ids
        n = len(ids)
        split_scope = spec.scope in SPLIT_SCOPES
        split = enc.split if split_scope else None
        if split_scope and split is None:
            raise RequestError(f"{spec.scope} needs question_start", "kv_press.question_start")
        if split_scope and split >= n:
            raise RequestError(
                "the question part is empty: question_start must point before the end of the prompt",
                "kv_press.question_start",
            )
        span = split if split_scope else n
        plan = plan_compression(spec, span)
        q_window = (n - enc.split) if enc.split is not None else None  # finch: the question is its window
        built = build_press(spec.tree, plan.press_ratio, question_tokens=q_window, n_layers=self.n_layers)
        timer = PressTimer(self.device)
        if built.press is not None:
            timer.wrap(built.press)
        act = Active(enc=enc, spec=spec, plan=plan, built=built, split_scope=split_scope, span=span,
                     max_new=max_new_tokens, ignore_eos=ignore_eos, cancelled=cancelled, timer=timer,
                     detok=Detokenizer(self.tokenizer, stop, on_delta), batch_reason=self.batch_policy(built))
        act.attn_target = fanout.target_attention(built.attn if built.press is not None else None, self.base_attn)
        return act

    def _input_ids(self, enc: Encoded) -> torch.Tensor:
        return torch.tensor([enc.ids], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(
        self,
        enc: Encoded,
        spec: PressSpec,
        max_new_tokens: int,
        *,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
        on_delta: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> "Active":
        """Tokenized prompt → compressed cache + first token, with a prefill of its own. The returned Active
        either is done already (one token asked, or a stop), or decodes in the batch (``batch_reason is None``)
        or alone."""
        act = self._new_active(enc, spec, max_new_tokens, stop=stop, ignore_eos=ignore_eos, on_delta=on_delta,
                               cancelled=cancelled)
        input_ids = self._input_ids(enc)
        clear_masks(self.model)
        try:
            pf = fanout.prefill_one(self.model, input_ids, act.span, act.built, attn=act.attn_target,
                                    reason="alone")
        finally:
            clear_masks(self.model)
        return self.resume(act, pf, input_ids)

    @torch.inference_mode()
    def prefill_group(self, enc: Encoded, variants: list["Variant"], *,
                      fanout_max: int = fanout.DEFAULT_FANOUT_MAX) -> list[tuple[Any, Any]]:
        """Requests with the same ``prefill_key``: ONE fan-out prefill for all that can share it. Returns per
        request (Active, Prefilled) — each to be continued with ``resume`` one after the other (a request that
        decodes alone before the next resumes) — or (the exception, None) for a request that cannot be served."""
        out: list[tuple[Any, Any]] = [(None, None)] * len(variants)
        acts: list[tuple[int, Active]] = []
        for i, v in enumerate(variants):
            try:
                acts.append((i, self._new_active(enc, v.spec, v.max_new_tokens, stop=v.stop, ignore_eos=v.ignore_eos,
                                                 on_delta=v.on_delta, cancelled=v.cancelled)))
            except Exception as e:  # noqa: BLE001 - this request's error, reported to it alone
                out[i] = (e, None)
        input_ids = self._input_ids(enc)
        by_span: dict[int, list[tuple[int, Active]]] = {}
        for i, act in acts:
            by_span.setdefault(act.span, []).append((i, act))
        for span, group in by_span.items():
            clear_masks(self.model)
            try:
                pfs = fanout.fanout_prefill(self.model, input_ids, span, [a.built for _, a in group],
                                            base_attn=self.base_attn, fanout_max=fanout_max,
                                            kv_bytes_per_token=self.kv_bytes_per_token)
            except Exception as e:  # noqa: BLE001
                for i, _ in group:
                    out[i] = (e, None)
                continue
            finally:
                clear_masks(self.model)
            for (i, act), pf in zip(group, pfs):
                out[i] = (act, pf)
        return out

    @torch.inference_mode()
    def resume(self, act: "Active", pf: fanout.Prefilled, input_ids: torch.Tensor | None = None) -> "Active":
        """After its (own or shared) context prefill: the question pass (split scopes) and the first token,
        under the request's attention implementation, masks and decoding-time press."""
        built, enc = act.built, act.enc
        n = len(enc.ids)
        split = enc.split if act.split_scope else None
        model = self.model
        dev = self.device
        if input_ids is None:
            input_ids = self._input_ids(enc)
        cache = pf.cache
        act.shared_prefill, act.shared_with, act.shared_reason = pf.shared, pf.share, pf.reason
        stack = contextlib.ExitStack()  # attention switch + decoding-time press (closed even on errors)
        try:
            act.attn_used = stack.enter_context(fanout.attention(model, pf.attn))
            fanout.install_masks(model, pf.masks)
            fanout.restore_rng(pf, dev)
            t0 = time.perf_counter()
            if not act.split_scope:
                logits = pf.logits
                after = fanout.kv_state(cache, pf.masks, self.n_kv_heads)
                position = cache.get_seq_length() if built.rerotates else n
                stack.enter_context(self._press_ctx(built, "decode"))
            else:
                after_ctx = fanout.kv_state(cache, pf.masks, self.n_kv_heads)
                # the question continues at the original positions (kvpress's pipeline), or right after the
                # kept keys for presses that re-rotate them
                start = cache.get_seq_length() if (built.rerotates and split > 0) else split
                stack.enter_context(self._press_ctx(built, "decode"))
                q = input_ids[:, split:]
                pos = torch.arange(start, start + q.shape[1], device=dev).unsqueeze(0)
                lens = after_ctx["lens"] if split > 0 else [0]
                ragged = len(set(lens)) > 1
                # per-layer lengths differ (pyramidkv): the question goes in one pass under a per-layer
                # bottom-right causal mask (kvt_ragged attention)
                with (use_attention(model, ATTN_NAME) if ragged else contextlib.nullcontext()):
                    out = model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1)
                logits = out.logits[0, -1]
                after = self._kv_state(cache)
                position = start + q.shape[1]
            first = logits.argmax()
            next_id = int(first)  # the one host sync of the prefill
            act.prefill_s = pf.prefill_s + (time.perf_counter() - t0)
        except BaseException:
            stack.close()
            clear_masks(model)
            raise
        act.after, act.position, act.cache = after, position, cache
        pf.cache = None  # type: ignore[assignment]  # the Active holds it now
        act.t_decode = time.perf_counter()
        if act.batch_reason is None:
            stack.close()  # prefill-only press: its hooks are gone; the batch decodes with kvt_ragged
            clear_masks(model)
        else:
            act.stack = stack  # kept open (press hooks, attention, masks) while it decodes alone
        if self.accept(act, next_id):
            act.final = after
            self._close(act)
            return act
        act.first = first.reshape(1)
        return act

    def accept(self, act: "Active", token: int) -> bool:
        """One generated token for a request; True when the request is finished."""
        act.gen.append(token)
        if not act.ignore_eos and token in self.stop_ids:
            act.finish = "stop"
            act.done = True
        elif act.detok.push(token):
            act.finish = "stop"
            act.done = True
        elif len(act.gen) >= act.max_new or (act.cancelled is not None and act.cancelled()):
            act.done = True
        return act.done

    # ------------------------------------------------------------------ decoding alone (a batch of one)

    @torch.inference_mode()
    def decode_alone(self, act: "Active") -> None:
        """Presses that hook the decoding steps or mask keys per sequence: the plain loop over its own
        DynamicCache, under its press and attention implementation."""
        model, cache = self.model, act.cache
        tok = act.first.view(1, 1)
        pos = torch.tensor([[act.position]], dtype=torch.long, device=self.device)
        try:
            while not act.done:
                with decode_kernels(self.device):
                    out = model(input_ids=tok, past_key_values=cache, position_ids=pos)
                pos += 1
                tok = out.logits[:, -1:].argmax(-1)
                self.live_kv_tokens = cache.get_seq_length()
                self.live_kv_bytes = self.live_kv_tokens * self.kv_bytes_per_token
                self.accept(act, int(tok))
            act.final = self._kv_state(cache)
        finally:
            self._close(act)
            self.live_kv_tokens, self.live_kv_bytes = 0, 0  # the batch's next step sets its own

    def _close(self, act: "Active") -> None:
        if act.stack is not None:
            act.stack.close()
            act.stack = None
            clear_masks(self.model)
        act.cache = None

    # ------------------------------------------------------------------ the shared batch

    def fused(self):
        """The compiled blocks (made once, shared by every batch), or None when not fusing."""
        if self.fuse and self._fused is None:
            from .batch import Fused

            self._fused = Fused(self.model)
        return self._fused if self.fuse else None

    def new_batch(self, max_batch: int) -> "Batch":
        return Batch(self, max_batch, self.step_mode)

    # ------------------------------------------------------------------ results

    def result(self, act: "Active") -> Result:
        self._close(act)
        text = act.detok.finish()
        decode_s = time.perf_counter() - act.t_decode
        spec, plan, built, n = act.spec, act.plan, act.built, len(act.enc.ids)
        split_scope = act.split_scope
        tree = spec.tree
        memory = tree.memory() if built.press is not None else "none"
        after, final = act.after, act.final or act.after
        lens, eff = after["lens"], after["effective"]
        per_tok_layer = self.kv_bytes_per_token / self.n_layers
        applied = {
            "method": spec.method,
            "press": tree.to_dict(),  # the whole validated tree, every parameter (kvpress defaults filled in)
            "recipe": spec.recipe,
            "semantics": spec.semantics,
            "compression_ratio": round(plan.effective_ratio, 6),
            "requested_compression_ratio": spec.compression_ratio if tree.method != "full" else None,
            "budget": spec.budget,
            "scope": spec.scope,
            "question_start": spec.question_start if (split_scope or tree.method == "finch") else None,
            "params": dict(spec.params),
            "compressed_span_tokens": act.span,
            "question_tokens": n - act.enc.split if split_scope else 0,
            "skipped": plan.skipped,
            "phase": tree.phase(),
            "memory": memory,  # frees | masks | zeroes | none
            "masked": memory in ("masks", "zeroes"),  # true: the full tensors are kept ("masked, not freed")
            "kv_tokens_before": n,
            # effective KV entries per layer when decoding starts (masked entries excluded), mean over layers
            "kv_tokens_after": round(sum(eff) / len(eff)),
            "kv_tokens_after_min": round(min(eff)),
            "kv_tokens_after_max": round(max(eff)),
            "kv_tokens_held": round(sum(lens) / len(lens)),  # entries physically held per layer
            "kv_tokens_masked": round(sum(after["masked"]) / self.n_kv_heads / len(lens)) if after["masked"] else 0,
            "kv_tokens_final": round(sum(final["effective"]) / len(final["effective"])),  # after decoding
            "kv_bytes_before": n * self.kv_bytes_per_token,
            "kv_bytes_after": after["bytes"],  # bytes actually held (masked entries included)
            "kv_bytes_effective": round(sum(eff) * per_tok_layer),  # what a cache without the masked entries holds
            "attn_implementation": act.attn_used,
            "prefill_s": round(act.prefill_s, 6),
            "press_s": round(act.timer.seconds(), 6),
            "decode_s": round(decode_s, 6),
            # continuous batching: whether this request decoded in the shared batch, why not, and the largest
            # batch it decoded in (1: alone, or nobody else was decoding)
            "batched": act.batch_reason is None,
            "batched_reason": act.batch_reason,
            "batch_size_max": act.batch_size_max,
            # eager | static | graph (CUDA graph replays) for batched requests; alone for the plain loop
            "decode_step": act.decode_step,
            # fan-out prefill: whether this request's (context) prefill came from a forward pass shared with
            # other requests of the same prompt, how many requests that pass served (1: its own), why not shared
            "shared_prefill": act.shared_prefill,
            "shared_prefill_with": act.shared_with,
            "shared_prefill_reason": act.shared_reason,
        }
        return Result(text, act.finish, n, len(act.gen), applied, act.gen)

    # ------------------------------------------------------------------ convenience: one request end to end

    @torch.inference_mode()
    def generate(
        self,
        enc: Encoded,
        spec: PressSpec,
        max_new_tokens: int,
        *,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
        on_delta: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Result:
        """Prefill + decode of one request with nothing else in flight (warm-up, tools, tests); decodes
        through the same batched step as the server (a batch of one) unless the press must decode alone."""
        act = self.prefill(enc, spec, max_new_tokens, stop=stop, ignore_eos=ignore_eos, on_delta=on_delta,
                           cancelled=cancelled)
        if not act.done:
            if act.batch_reason is None:
                batch = self.new_batch(1)
                batch.join(act)
                while batch.active:
                    batch.step()
            else:
                self.decode_alone(act)
        return self.result(act)


    @torch.inference_mode()
    def generate_many(self, enc: Encoded, variants: list["Variant"], *,
                      fanout_max: int = fanout.DEFAULT_FANOUT_MAX, max_batch: int | None = None) -> list[Any]:
        """Several requests of one prompt end to end with nothing else in flight (tools, bench, tests): one
        fan-out prefill, then the batchable ones decode together in one batch, the others alone. A request
        that cannot be served gets its exception in its slot."""
        results: list[Any] = [None] * len(variants)
        batch = self.new_batch(max_batch or max(1, len(variants)))
        index: dict[int, int] = {}
        for i, (act, pf) in enumerate(self.prefill_group(enc, variants, fanout_max=fanout_max)):
            if pf is None:
                results[i] = act
                continue
            try:
                self.resume(act, pf)
                if act.done:
                    results[i] = self.result(act)
                elif act.batch_reason is not None:
                    self.decode_alone(act)
                    results[i] = self.result(act)
                else:
                    while batch.full():  # more batchable requests than rows: decode until one leaves
                        for done in batch.step():
                            results[index[id(done)]] = self.result(done)
                    index[id(act)] = i
                    batch.join(act)
            except Exception as e:  # noqa: BLE001
                results[i] = e
        while batch.active:
            for act in batch.step():
                results[index[id(act)]] = self.result(act)
        return results


class PressTimer:
    """press_s without host syncs on the hot path: CUDA events around each hook call (read once, when the
    request's result is built); wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.total = 0.0
        self.events: list[tuple[Any, Any]] = []

    def wrap(self, press) -> None:
        inner = press.forward_hook

        def forward_hook(*args, **kwargs):
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = inner(*args, **kwargs)
                e.record()
                self.events.append((s, e))
                return out
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            self.total += time.perf_counter() - t
            return out

        press.forward_hook = forward_hook  # instance attribute: BasePress.__call__ registers self.forward_hook

    def seconds(self) -> float:
        if self.events:
            self.events[-1][1].synchronize()
            self.total += sum(s.elapsed_time(e) for s, e in self.events) / 1000.0
            self.events = []
        return self.total


@dataclass(eq=False)
class Active:
    """One request between its prefill and its result."""

    enc: Encoded
    spec: PressSpec
    plan: Any
    built: BuiltPress
    split_scope: bool
    span: int
    max_new: int
    ignore_eos: bool
    cancelled: Callable[[], bool] | None
    timer: PressTimer
    detok: Detokenizer
    batch_reason: str | None
    attn_used: str = ""
    prefill_s: float = 0.0
    t_decode: float = 0.0
    position: int = 0
    cache: Any = None
    first: Any = None  # next input token (a 1-element tensor on the device)
    stack: Any = None
    after: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] | None = None
    gen: list[int] = field(default_factory=list)
    finish: str = "length"
    done: bool = False
    batch_size_max: int = 1
    decode_step: str = "alone"  # how its decoding steps ran: alone | eager | static | graph
    attn_target: str = ""  # the attention implementation its prefill runs under
    shared_prefill: bool = False
    shared_with: int = 1
    shared_reason: str | None = "alone"
    job: Any = None


class Batch:
    """The sequences decoding together: one forward pass per step over all of them (SlotCache +
    kvt_ragged attention); sequences join after their prefill and leave when done, between steps."""

    def __init__(self, engine: Engine, max_batch: int, step_mode: str = "eager"):
        self.engine = engine
        self.max_batch = max_batch
        cfg = engine.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache = SlotCache(engine.n_layers, engine.n_kv_heads, head_dim, engine.model.dtype, engine.device,
                               max_batch, grouped=engine.device.type == "cuda", static_attn=engine.static_attn,
                               limit_bytes=engine.kv_limit_bytes)
        self.active: list[Active] = []
        self.steps = 0
        self.mode = step_mode
        self.mode_reason: str | None = None  # why a graph batch fell back to static steps
        self.graphs = StepGraphs(engine.model, self.cache, fused=engine.fused()) if step_mode == "graph" else None

    def __len__(self) -> int:
        return len(self.active)

    def full(self) -> bool:
        return len(self.active) >= self.max_batch

    def free_bytes(self) -> int | None:
        """Device memory a join may still allocate (CUDA: free + cached by torch, less a margin of 5% of the
        GPU, at least 1 GiB, for the step's own work and the next prefill); None off CUDA (host memory is not
        probed: --kv-cache-limit-gib bounds it)."""
        dev = self.cache.device
        if dev.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return free + cached - max(1 << 30, total // 20)

    def can_join(self, act: Active) -> bool:
        """Whether ``act`` (prefilled) may join now: a free row, and its slot room fits under
        --kv-cache-limit-gib and in free device memory. An empty batch always takes it (it must run somehow:
        alone it either fits or fails by itself)."""
        if self.full():
            return False
        if not self.active:
            return True
        c = self.cache
        lens = [layer.keys.shape[2] for layer in act.cache.layers]
        after = c.bytes_after_join(lens, act.max_new - len(act.gen) + 1)
        if c.limit_bytes is not None and after > c.limit_bytes:
            return False
        free = self.free_bytes()
        # growing copies the buffers layer by layer: the new ones sit beside the old ones until each is copied
        return free is None or after - c.allocated_bytes() + after // max(1, c.L) <= free

    def join(self, act: Active) -> None:
        layers = [(layer.keys, layer.values) for layer in act.cache.layers]
        remaining = act.max_new - len(act.gen)
        self.cache.add(layers, act.first, act.position, remaining + 1)
        act.cache = None  # the slot holds it now; the DynamicCache can be freed
        self.active.append(act)

    def _leave(self, act: Active) -> None:
        row = self.active.index(act)
        held = [int(x) for x in self.cache.lens[:, row]]
        eng = self.engine
        act.final = {"lens": held, "effective": held, "masked": None,
                     "bytes": sum(held) * eng.kv_bytes_per_token // eng.n_layers}
        self.cache.remove(row)
        last = self.active.pop()
        if last is not act:
            self.active[row] = last

    @torch.inference_mode()
    def step(self) -> list[Active]:
        """One decoding step for every active sequence; returns those that finished (they left the batch)."""
        done = [a for a in self.active if a.cancelled is not None and a.cancelled()]
        for a in done:
            a.done = True
            self._leave(a)
        if not self.active:
            return done
        c, model = self.cache, self.engine.model
        n = c.n
        nxt = None
        if self.mode == "graph":
            try:
                nxt = self.graphs.run(n)
            except Exception as e:  # noqa: BLE001 - a forward that cannot be captured still runs, uncaptured
                log.warning("CUDA graph capture failed, decoding without graphs: %s: %s", type(e).__name__, e)
                if c.device.type == "cuda":
                    torch.cuda.synchronize(c.device)
                self.mode, self.mode_reason = "static", f"capture failed: {type(e).__name__}: {e}"
                self.graphs.reset()
        if nxt is None and self.mode == "static":
            nxt = forward_step(model, c, c.bucket(n), self.engine.fused())[:n]
        elif nxt is None:
            c.prepare_step()
            nxt = forward_step(model, c, n, static=False)
        c.tokens[:n] = nxt
        c.finish_step()
        self.steps += 1
        ids = nxt.tolist()  # the one host sync of the step
        finished = []
        for a, t in zip(list(self.active), ids):
            if n > a.batch_size_max:
                a.batch_size_max = n
            a.decode_step = self.mode
            if self.engine.accept(a, t):
                finished.append(a)
        for a in finished:
            self._leave(a)
        held = c.held_tokens()
        eng = self.engine
        eng.live_kv_tokens = int(held.sum()) // eng.n_layers if c.n else 0
        eng.live_kv_bytes = int(held.sum()) * eng.kv_bytes_per_token // eng.n_layers if c.n else 0
        return done + finished


@dataclass
class Variant:
    """One request of a fan-out group (prefill_group)."""

    spec: PressSpec
    max_new_tokens: int
    stop: list[str] | None = None
    ignore_eos: bool = False
    on_delta: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] | None = None
