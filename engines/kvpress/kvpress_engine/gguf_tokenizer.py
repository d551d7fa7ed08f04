"""A correct fast tokenizer for byte-level BPE GGUF files.

transformers 5.2's GGUF tokenizer conversion turns a `tokenizer.ggml.model == "gpt2"` file (SmolLM2,
Qwen, Llama-3 …) into a tokenizer that maps every space to `<|endoftext|>`: token counts double and the
model sees garbage. We rebuild it from the GGUF's own vocab, merges, special tokens and chat template
with the `tokenizers` library. (The harness has the same fix for its token counting; the two are
separate deployables and share no code.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

# llama.cpp pre-tokenizer names whose HF originals split digits one by one before the byte-level regex
_DIGITS_INDIVIDUAL = {"smollm", "qwen2", "deepseek-llm", "deepseek-coder", "starcoder", "refact"}


def gguf_tokenizer_model(gguf: Path) -> Optional[str]:
    import gguf as gguf_lib

    f = gguf_lib.GGUFReader(str(gguf)).fields.get("tokenizer.ggml.model")
    return f.contents() if f is not None else None


def byte_level_tokenizer(gguf: Path) -> Any:
    import gguf as gguf_lib
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    r = gguf_lib.GGUFReader(str(gguf))

    def field(name: str, default: Any = None) -> Any:
        f = r.fields.get(name)
        return f.contents() if f is not None else default

    tokens: list[str] = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
    raw = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if field("tokenizer.ggml.pre", "") in _DIGITS_INDIVIDUAL:
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    raw.pre_tokenizer = pre_tokenizers.Sequence(pre)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([t for t, ty in zip(tokens, types) if ty == 3])  # CONTROL tokens

    def tok_at(key: str) -> Optional[str]:
        i = field(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=tok_at("tokenizer.ggml.bos_token_id"),
        eos_token=tok_at("tokenizer.ggml.eos_token_id"), unk_token=tok_at("tokenizer.ggml.unknown_token_id"),
        pad_token=tok_at("tokenizer.ggml.padding_token_id"), clean_up_tokenization_spaces=False,
    )
    template = field("tokenizer.chat_template")
    if template:
        hf.chat_template = template
    return hf


def load_gguf_tokenizer(directory: Path, gguf_file: str) -> Any:
    path = Path(directory) / gguf_file
    if gguf_tokenizer_model(path) == "gpt2":
        return byte_level_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
