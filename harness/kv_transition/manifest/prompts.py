"""Prompt building: per-task template + generation budget + chat template, middle truncation on
token ids with exact accounting (the final prompt re-tokenizes within the limit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from kv_transition.datasets.schema import Example
from kv_transition.errors import DataError
from kv_transition.manifest.tokens import Tokenizer

_MAX_FIT_ROUNDS = 16
_QUESTION_MARK = "\ue000kvt-question\ue000"  # a private-use sentinel where the question goes


@dataclass(frozen=True)
class PromptSpec:
    template: str          # uses {context} and (usually) {input}; multiple-choice: {choice_A}…{choice_D}
    max_new_tokens: int
    chat: bool             # apply the model's chat template
    # text after the (chat-templated) prompt, where the model's answer starts (kvpress's answer_prefix,
    # placed after the assistant header); never truncated
    answer_prefix: str = ""
    # kvpress's placement (KVPressTextGenerationPipeline.preprocess): the chat template is applied to the
    # context alone and the question is put, untouched, where the user turn's content ends — so a
    # template that trims its content (Llama 3's `| trim`) trims the context's edges, never the question's
    question_after_template: bool = False


@dataclass(frozen=True)
class BuiltPrompt:
    prompt: str
    chat: bool
    add_special_tokens: bool
    original_tokens: int
    final_tokens: int
    truncated: bool
    max_new_tokens: int
    question_start: Optional[int]  # char offset in prompt where the text after the context begins


CHOICE_KEYS = ("A", "B", "C", "D")


def _choices(text: str, ex: Example) -> str:
    choices = ex.meta.get("choices")
    if isinstance(choices, dict):
        for k in CHOICE_KEYS:
            text = text.replace("{choice_" + k + "}", str(choices.get(k, "")))
    return text


def fill(template: str, ex: Example) -> str:
    """str.format-free filling (contexts contain braces): replace the placeholders only, in order
    (context, input, then a multiple-choice example's choices, like LongBench v2's pred.py)."""
    return _choices(template.replace("{context}", ex.context).replace("{input}", ex.question), ex)


def _post_context_suffix(template: str, ex: Example) -> str:
    i = template.find("{context}")
    if i < 0:
        return ""
    return _choices(
        template[i + len("{context}"):].replace("{input}", ex.question).replace("{context}", ex.context), ex
    )


class PromptBuilder:
    """Builds the exact prompt an engine receives for one example, within max_context."""

    def __init__(self, tokenizer: Tokenizer, max_context: int, use_chat: bool = True):
        self.tok = tokenizer
        self.max_context = max_context
        self.use_chat = use_chat and tokenizer.has_chat_template

    def _final(self, raw: str, chat: bool, answer_prefix: str = "", question: Optional[str] = None) -> str:
        if chat and question and raw.endswith(question):
            context = raw[: len(raw) - len(question)]
            marker = _QUESTION_MARK
            while marker in context:
                marker += _QUESTION_MARK
            templated = self.tok.chat(context + marker)
            if templated.count(marker) == 1:
                head, tail = templated.split(marker)
                return head + question + tail + answer_prefix
        return (self.tok.chat(raw) if chat else raw) + answer_prefix

    def _count(self, text: str, chat: bool) -> int:
        # with a chat template the template's own special tokens are in the text already
        return len(self.tok.encode(text, add_special_tokens=not chat))

    def build(self, ex: Example, spec: PromptSpec, *, counted: Optional[int] = None) -> BuiltPrompt:
        chat = spec.chat and self.use_chat
        limit = self.max_context - spec.max_new_tokens
        if limit <= 0:
            raise DataError(
                f"task {ex.task}: max_new_tokens {spec.max_new_tokens} leaves no room in max_context {self.max_context}"
            )
        raw = fill(spec.template, ex)
        question = ex.question if spec.question_after_template else None
        prompt = self._final(raw, chat, spec.answer_prefix, question)
        n = counted if counted is not None else self._count(prompt, chat)
        original = n
        truncated = False
        if n > limit:
            prompt, n = self._truncate(raw, chat, n, limit, ex, spec.answer_prefix, question)
            truncated = True
        suffix = _post_context_suffix(spec.template, ex)
        qs = prompt.rfind(suffix) if suffix.strip() else -1
        return BuiltPrompt(
            prompt=prompt,
            chat=chat,
            add_special_tokens=not chat,
            original_tokens=original,
            final_tokens=n,
            truncated=truncated,
            max_new_tokens=spec.max_new_tokens,
            question_start=qs if qs >= 0 else None,
        )

    def _truncate(
        self, raw: str, chat: bool, n_full: int, limit: int, ex: Example, answer_prefix: str = "",
        question: Optional[str] = None,
    ) -> tuple[str, int]:
        ids = self.tok.encode(raw, add_special_tokens=not chat)
        overhead = n_full - len(ids)  # chat template tokens (and the answer prefix) around the raw prompt
        keep = limit - overhead
        for _ in range(_MAX_FIT_ROUNDS):
            if keep <= 1:
                break
            head = keep // 2
            tail = keep - head
            raw2 = self.tok.decode(ids[:head]) + self.tok.decode(ids[len(ids) - tail:])
            prompt = self._final(raw2, chat, answer_prefix, question)
            n = self._count(prompt, chat)
            if n <= limit:
                return prompt, n
            keep -= n - limit  # decode/re-encode drift: shrink by the overshoot and retry
        raise DataError(f"example {ex.example_id} ({ex.task}): cannot fit the prompt into {limit} tokens")

    def build_followup(self, ex: Example, template: str, first: str, max_new_tokens: int, chat: bool) -> BuiltPrompt:
        """The second request of a two-request example (LongBench v2 --cot): ``template`` filled like the
        first prompt, then ``{cot}`` replaced by the first response (last, as pred.py does, so the response
        goes in verbatim), chat-templated and middle-truncated to max_context like any prompt (pred.py's
        query_llm truncates every prompt). ``question_start``: where the text after ``{context}`` starts,
        or, without a ``{context}`` (the real 0shot_cot_ans), the text after ``{cot}``."""
        spec = PromptSpec(template=template, max_new_tokens=max_new_tokens, chat=chat)
        chat = chat and self.use_chat
        limit = self.max_context - max_new_tokens
        if limit <= 0:
            raise DataError(f"task {ex.task}: max_new_tokens {max_new_tokens} leaves no room in max_context "
                            f"{self.max_context}")
        raw = fill(template, ex).replace("{cot}", first)
        prompt = self._final(raw, chat)
        n = original = self._count(prompt, chat)
        truncated = n > limit
        if truncated:
            prompt, n = self._truncate(raw, chat, n, limit, ex)
        anchor = "{context}" if "{context}" in template else "{cot}"
        suffix = _choices(template[template.find(anchor) + len(anchor):].replace("{input}", ex.question), ex)
        suffix = suffix.replace("{context}", ex.context).replace("{cot}", first)
        qs = prompt.rfind(suffix) if anchor in template and suffix.strip() else -1
        return BuiltPrompt(prompt=prompt, chat=chat, add_special_tokens=not chat, original_tokens=original,
                           final_tokens=n, truncated=truncated, max_new_tokens=spec.max_new_tokens,
                           question_start=qs if qs >= 0 else None)

    def build_all(self, examples: Sequence[Example], specs: dict[str, PromptSpec]) -> list[BuiltPrompt]:
        """Batch path: one batched tokenization of all untruncated final prompts."""
        finals: list[str] = []
        chats: list[bool] = []
        for ex in examples:
            spec = self.spec_for(ex, specs)
            chat = spec.chat and self.use_chat
            finals.append(self._final(fill(spec.template, ex), chat, spec.answer_prefix,
                                      ex.question if spec.question_after_template else None))
            chats.append(chat)
        counts = [0] * len(finals)
        for flag in (True, False):
            idx = [i for i, c in enumerate(chats) if c == flag]
            if idx:
                for i, n in zip(idx, self.tok.count_many([finals[i] for i in idx], add_special_tokens=not flag)):
                    counts[i] = n
        return [self.build(ex, self.spec_for(ex, specs), counted=c) for ex, c in zip(examples, counts)]

    @staticmethod
    def spec_for(ex: Example, specs: dict[str, PromptSpec]) -> PromptSpec:
        spec = specs.get(ex.task)
        if spec is None:
            raise DataError(f"task {ex.task!r}: no prompt template (known: {', '.join(sorted(specs))})")
        return spec
