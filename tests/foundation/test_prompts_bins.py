"""Prompt building with the real tiny-model tokenizer, exact middle truncation, and binning."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_transition.manifest.binning import Bin, assign, make_bins, quantile_edges, select
from kv_transition.config.schema import BinningCfg
from kv_transition.datasets.schema import Example
from kv_transition.errors import DataError
from kv_transition.manifest.prompts import PromptBuilder, PromptSpec

TEMPLATE = "Read the text and answer.\n\n{context}\n\nQuestion: {input}\nAnswer:"


def _example(n_words: int, seed: int = 0, task: str = "t") -> Example:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "{braces}", "naïve", "東京", "x1", "—", "end."]
    ctx = " ".join(rng.choice(words) for _ in range(n_words))
    return Example(example_id=f"e{seed}", question="What is the key?", context=ctx, answers=["k"],
                   meta={"task": task})


def test_short_prompt_is_untouched_with_chat_template(smol_tokenizer):
    b = PromptBuilder(smol_tokenizer, max_context=8192)
    ex = _example(50)
    bp = b.build(ex, PromptSpec(TEMPLATE, 32, chat=True))
    assert not bp.truncated and bp.original_tokens == bp.final_tokens
    assert bp.prompt.startswith("<|im_start|>") and bp.prompt.endswith("<|im_start|>assistant\n")
    assert ex.context in bp.prompt and "{braces}" in bp.prompt  # no str.format on user text
    assert bp.final_tokens == len(smol_tokenizer.encode(bp.prompt))
    assert bp.chat and not bp.add_special_tokens
    # the question region starts where the text after the context begins
    assert bp.prompt[bp.question_start:].startswith("\n\nQuestion: What is the key?")


def test_no_chat_task_uses_plain_prompt(smol_tokenizer):
    b = PromptBuilder(smol_tokenizer, max_context=8192)
    bp = b.build(_example(20), PromptSpec(TEMPLATE, 32, chat=False))
    assert not bp.chat and bp.add_special_tokens and bp.prompt.startswith("Read the text")


@pytest.mark.parametrize("n_words, max_context, gen", [(3000, 1024, 64), (5000, 2000, 128), (800, 512, 32)])
@pytest.mark.parametrize("chat", [True, False])
def test_middle_truncation_fits_exactly_after_retokenization(smol_tokenizer, n_words, max_context, gen, chat):
    b = PromptBuilder(smol_tokenizer, max_context=max_context)
    ex = _example(n_words, seed=n_words)
    bp = b.build(ex, PromptSpec(TEMPLATE, gen, chat=chat))
    limit = max_context - gen
    assert bp.truncated and bp.original_tokens > limit
    # exact accounting: what is recorded is what the engine will count
    recount = len(smol_tokenizer.encode(bp.prompt, add_special_tokens=not chat))
    assert recount == bp.final_tokens <= limit
    assert bp.final_tokens >= limit - 8  # and it is not needlessly short
    # middle truncation keeps the instruction head and the question tail
    assert "Read the text and answer." in bp.prompt and "Question: What is the key?" in bp.prompt


def test_generation_budget_larger_than_context_is_an_error(smol_tokenizer):
    with pytest.raises(DataError, match="leaves no room"):
        PromptBuilder(smol_tokenizer, max_context=100).build(_example(5), PromptSpec(TEMPLATE, 100, chat=True))


def test_batch_path_equals_single_path(smol_tokenizer):
    b = PromptBuilder(smol_tokenizer, max_context=1024)
    exs = [_example(n, seed=n) for n in (10, 300, 2000)]
    specs = {"t": PromptSpec(TEMPLATE, 16, chat=True)}
    assert b.build_all(exs, specs) == [b.build(e, specs["t"]) for e in exs]
    with pytest.raises(DataError, match="no prompt template"):
        b.build_all([_example(5, task="other")], specs)


# --- binning -----------------------------------------------------------------------------

def test_explicit_edges_half_open_last_unbounded():
    bins = make_bins(BinningCfg(strategy="explicit", edges=[0, 4000, 8000]), [])
    assert [(b.lo, b.hi, b.label) for b in bins] == [(0, 4000, "0-4k"), (4000, 8000, "4k-8k"), (8000, None, "8k+")]
    assert [assign(bins, n) for n in (0, 3999, 4000, 7999, 8000, 10**7)] == [0, 0, 1, 1, 2, 2]


def test_quantile_edges():
    lengths = list(range(1, 1001))
    e = quantile_edges(lengths, 4)
    assert e[0] == 0 and len(e) == 4 and e == sorted(set(e))
    counts = [sum(1 for n in lengths if assign(make_bins(BinningCfg(strategy="quantile", n_bins=4), lengths), n) == i)
              for i in range(4)]
    assert all(240 <= c <= 260 for c in counts)
    assert quantile_edges([5, 5, 5], 4) == [0, 5]  # degenerate lengths collapse, still total


@settings(max_examples=200, deadline=None)
@given(edges=st.lists(st.integers(1, 10**6), min_size=0, max_size=6, unique=True),
       n=st.integers(0, 2 * 10**6))
def test_every_length_lands_in_exactly_one_bin(edges, n):
    bins = make_bins(BinningCfg(strategy="explicit", edges=[0] + sorted(edges)), [])
    hits = [b for b in bins if b.contains(n)]
    assert len(hits) == 1 and hits[0].bin_id == assign(bins, n)


def test_select_is_seeded_deterministic_and_bounded():
    ids = {0: [f"a{i}" for i in range(50)], 1: ["b1", "b0"], 2: []}
    s1 = select(ids, 10, seed=3)
    assert s1 == select({k: list(reversed(v)) for k, v in ids.items()}, 10, seed=3)  # order-independent
    assert len(s1[0]) == 10 and s1[1] == ["b0", "b1"] and s1[2] == []
    assert s1[0] == sorted(s1[0]) and set(s1[0]) <= set(ids[0])
    assert select(ids, 10, seed=4)[0] != s1[0]
    assert select(ids, None, seed=3)[0] == sorted(ids[0])


def test_bin_label_formatting():
    assert Bin(0, 0, 1536).label == "0-1.5k" and Bin(1, 1536, None).label == "1.5k+"


# --- exact chunked counting ---------------------------------------------------------------

_SENTS = ["The grass is green.", "It was 1999!", "Why? Because.", "naïve café, déjà vu.", "x=1; y=2.",
          "東京は大きい。", "  Two  spaces.", "Tabs\tand\nnewlines.", "<|im_start|>user", "Ünïcode Ärger?",
          "He said: 'Hello.' Then left.", "e.g. This one.", "3.14 is pi.", "END"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_SENTS), min_size=1, max_size=30), st.lists(st.sampled_from(["", " ", "\n", "  "]),
                                                                          min_size=30, max_size=30))
def test_chunked_count_equals_full_encode(smol_tokenizer, sents, seps):
    text = "".join(s + sep for s, sep in zip(sents, seps))
    assert smol_tokenizer.chunked_counting
    assert smol_tokenizer.count(text) == len(smol_tokenizer.encode(text))
    chat = smol_tokenizer.chat(text)
    assert smol_tokenizer.count_many([chat, text]) == [len(smol_tokenizer.encode(chat)), len(smol_tokenizer.encode(text))]
