"""The generation core: tokenize, prefill under a kvpress press, greedy decode. One request at a time."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache

from .build import BuiltPress, bind_tokenizer, build_press, clear_masks, masked_per_layer
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
    def __init__(self, model, tokenizer, *, device: str, max_model_len: int, attn_implementation: str, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
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

    def _timed_press(self, press, acc: list[float]):
        inner = press.forward_hook

        def forward_hook(*args, **kwargs):
            self._sync()
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            self._sync()
            acc[0] += time.perf_counter() - t
            return out

        press.forward_hook = forward_hook  # instance attribute: BasePress.__call__ registers self.forward_hook
        return press

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
        press_s = [0.0]
        if built.press is not None:
            self._timed_press(built.press, press_s)
        needed = built.attn if built.press is not None else None

        model = self.model
        dev = self.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        cache = DynamicCache()
        torch.manual_seed(0)  # presses with random sketches (leverage, compactor, cur) are reproducible
        clear_masks(model)
        stack = contextlib.ExitStack()  # the decoding-time press context (closed even on errors)
        try:
            with self._attention(needed) as attn_used:
                self._sync()
                t0 = time.perf_counter()
                if not split_scope:
                    with self._press_ctx(built, "prefill"):
                        out = model(input_ids=input_ids, past_key_values=cache, logits_to_keep=1)
                    logits = out.logits[0, -1]
                    after = self._kv_state(cache)
                    position = cache.get_seq_length() if built.rerotates else n
                    stack.enter_context(self._press_ctx(built, "decode"))
                else:
                    if split > 0:
                        with self._press_ctx(built, "prefill"):
                            model.model(input_ids=input_ids[:, :split], past_key_values=cache)
                    after_ctx = self._kv_state(cache)
                    # the question continues at the original positions (kvpress's pipeline), or right after the
                    # kept keys for presses that re-rotate them
                    start = cache.get_seq_length() if (built.rerotates and split > 0) else split
                    stack.enter_context(self._press_ctx(built, "decode"))
                    q = input_ids[:, split:]
                    pos = torch.arange(start, start + q.shape[1], device=dev).unsqueeze(0)
                    lens = after_ctx["lens"] if split > 0 else [0]
                    if len(set(lens)) <= 1:
                        out = model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1)
                    else:
                        # per-layer lengths differ (pyramidkv): a multi-token step would need per-layer masks;
                        # feed the question one token at a time (each step attends to everything before it)
                        for j in range(q.shape[1]):
                            out = model(input_ids=q[:, j : j + 1], past_key_values=cache,
                                        position_ids=pos[:, j : j + 1])
                    logits = out.logits[0, -1]
                    after = self._kv_state(cache)
                    position = start + q.shape[1]
                next_id = int(logits.argmax())
                self._sync()
                prefill_s = time.perf_counter() - t0
                self.live_kv_tokens = round(sum(after["lens"]) / len(after["lens"]))
                self.live_kv_bytes = after["bytes"]

                # greedy decoding (under the press when it compresses while generating)
                t1 = time.perf_counter()
                gen: list[int] = []
                text, emitted = "", 0
                stops = [s for s in (stop or []) if s]
                hold = max((len(s) for s in stops), default=1) - 1
                finish = "length"
                while True:
                    gen.append(next_id)
                    if not ignore_eos and next_id in self.stop_ids:
                        finish = "stop"
                        break
                    text = self.tokenizer.decode(gen, skip_special_tokens=True)
                    if stops:
                        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                        if cut >= 0:
                            text, finish = text[:cut], "stop"
                            break
                    if on_delta is not None and not text.endswith("\ufffd"):
                        safe = len(text) - hold
                        if safe > emitted:
                            on_delta(text[emitted:safe])
                            emitted = safe
                    if len(gen) >= max_new_tokens or (cancelled is not None and cancelled()):
                        break
                    out = model(
                        input_ids=torch.tensor([[next_id]], device=dev),
                        past_key_values=cache,
                        position_ids=torch.tensor([[position]], device=dev),
                    )
                    position += 1
                    next_id = int(out.logits[0, -1].argmax())
                    self.live_kv_tokens = cache.get_seq_length()
                final = self._kv_state(cache)
                stack.close()
                if finish == "stop" and not stops:
                    text = self.tokenizer.decode(gen, skip_special_tokens=True)
                if on_delta is not None and len(text) > emitted:
                    on_delta(text[emitted:])
                self._sync()
                decode_s = time.perf_counter() - t1
        finally:
            stack.close()
            clear_masks(model)
            self.live_kv_tokens, self.live_kv_bytes = 0, 0

        tree = spec.tree
        memory = tree.memory() if built.press is not None else "none"
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
            "compressed_span_tokens": span,
            "question_tokens": n - split if split_scope else 0,
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
            "attn_implementation": attn_used,
            "prefill_s": round(prefill_s, 6),
            "press_s": round(press_s[0], 6),
            "decode_s": round(decode_s, 6),
        }
        return Result(text, finish, n, len(gen), applied, gen)
