"""The engine tokenizes exactly like the harness (a manifest's token counts are what the engine
prefills) and the real tiny model answers a real passkey prompt with the full cache."""

from __future__ import annotations

import httpx
import pytest

from .conftest import Server

pytestmark = pytest.mark.engine


def test_prompt_tokens_equal_harness_counts(server: Server, smol_tokenizer):
    prompts = [" the river", "The pass key is 71432. Remember it.", "naïve café — 東京 {braces}\n\n\tend",
               smol_tokenizer.chat("What is 2+2?")]
    for p in prompts:
        r = httpx.post(server.api + "/completions", json={"prompt": p, "max_tokens": 1}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(smol_tokenizer.encode(p)), p
    # byte-level BPE: a leading space belongs to the word (transformers 5.2's GGUF conversion got this wrong)
    r = httpx.post(server.api + "/completions", json={"prompt": " the river", "max_tokens": 1}, timeout=120)
    assert r.json()["usage"]["prompt_tokens"] == 2


def test_full_cache_finds_a_passkey(server: Server, smol_tokenizer):
    from kv_transition.config.schema import SyntheticCfg
    from kv_transition.datasets.synthetic import SYNTHETIC_PROMPTS, generate_synthetic

    (ex,) = generate_synthetic(SyntheticCfg(tasks=["passkey"], lengths=[1024], depths=[0.5], seed=0),
                               smol_tokenizer.count)
    prompt = smol_tokenizer.chat(SYNTHETIC_PROMPTS["passkey"].replace("{context}", ex.context)
                                 .replace("{input}", ex.question))
    r = httpx.post(server.api + "/completions", json={"prompt": prompt, "max_tokens": 12}, timeout=300)
    assert r.status_code == 200, r.text
    assert ex.answers[0] in r.json()["choices"][0]["text"]
