"""Serving anchor: vLLM at a real model shape, started through the harness's own spec + process runtime.

    python bench/vllm_anchor.py --model DIR --vllm-site SITE --tag 0.26.0 [--prompt-tokens 16384] [--max-tokens 64]
        [--concurrency 1 32] [--methods full fp8_e4m3] [--json out.json]

DIR holds a config.json (e.g. Llama-3.1-8B's) and a tokenizer; the engine runs with `--load-format dummy`
(random weights: throughput does not depend on their values with `ignore_eos` and a fixed `max_tokens`) and
prefix caching off. Each prompt is a list of random token ids (no two share a prefix), sent to /v1/completions
with streaming: TTFT = first content chunk, TPOT = (last − first) / (tokens − 1), aggregate output tok/s = all
completion tokens / wall time of the batch. At concurrency c, c requests are in flight at once; c=1 sends
--n1 requests one after another. This is the anchor the kvpress engine's speed is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))

from kv_transition.engines.spec import load_engine, resolve  # noqa: E402
from kv_transition.runtime.process import ProcessRuntime  # noqa: E402


async def one(client: httpx.AsyncClient, model: str, ids: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            if d.get("choices") and d["choices"][0].get("text"):
                times.append(time.perf_counter())
    n = (usage or {}).get("completion_tokens") or len(times)
    ttft = times[0] - t0 if times else float("nan")
    tpot = (times[-1] - times[0]) / (n - 1) if len(times) > 1 and n > 1 else float("nan")
    return {"ttft": ttft, "tpot": tpot, "tokens": n, "e2e": time.perf_counter() - t0,
            "prompt_tokens": (usage or {}).get("prompt_tokens")}


async def batch(base: str, model: str, prompts: list[list[int]], conc: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits) as client:
        await one(client, model, prompts[0][:512], 4)  # warm-up (not counted)
        sem = asyncio.Semaphore(conc)

        async def run(p: list[int]) -> dict:
            async with sem:
                return await one(client, model, p, max_tokens)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(run(p) for p in prompts))
        wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in res)
    med = lambda k: statistics.median(r[k] for r in res)  # noqa: E731
    return {"concurrency": conc, "requests": len(res), "wall_s": wall, "ttft_p50_s": med("ttft"),
            "ttft_max_s": max(r["ttft"] for r in res), "tpot_p50_ms": med("tpot") * 1e3,
            "output_tok_s": toks / wall, "prompt_tokens": res[0]["prompt_tokens"],
            "completion_tokens": toks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--vllm-site", default="", help="PYTHONPATH for the engine process (a --target install)")
    ap.add_argument("--tag", required=True, help="the installed vLLM version (checked against /version)")
    ap.add_argument("--prompt-tokens", type=int, default=16384)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--n1", type=int, default=4, help="requests at concurrency 1")
    ap.add_argument("--methods", nargs="+", default=["full"])
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rng = random.Random(0)
    vocab = 49152  # token ids valid for the tokenizer shipped with the dummy model (and < the model's vocab)
    n = max(max(a.concurrency), a.n1)
    prompts = [[rng.randrange(100, vocab) for _ in range(a.prompt_tokens)] for _ in range(n)]
    eng = load_engine("vllm")
    out = []
    for method in a.methods:
        spec = resolve(eng, method, model_path=a.model, served_model="anchor", port=a.port, gpus=[a.gpu],
                       device="cuda", dtype="bfloat16", max_context=a.prompt_tokens + a.max_tokens + 64,
                       extra_args=["--load-format", "dummy", "--no-enable-prefix-caching",
                                   "--gpu-memory-utilization", "0.9"],
                       env={"PYTHONPATH": a.vllm_site} if a.vllm_site else None, runtime="process", tag=a.tag)
        log = Path(f"/tmp/anchor-{method}.log")
        t0 = time.perf_counter()
        with ProcessRuntime().running(spec, {"group": "anchor", "cell": method}, log):
            start_s = time.perf_counter() - t0
            for conc in a.concurrency:
                ps = prompts[:a.n1] if conc == 1 else prompts[:conc]
                r = asyncio.run(batch(spec.base_url, "anchor", ps, conc, a.max_tokens))
                r.update(method=method, engine_start_s=start_s, image=spec.image_ref)
                out.append(r)
                print(json.dumps(r), flush=True)
    print("\n| method | concurrency | requests | TTFT p50 s | TPOT p50 ms | output tok/s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['method']} | {r['concurrency']} | {r['requests']} | {r['ttft_p50_s']:.3f} | "
              f"{r['tpot_p50_ms']:.2f} | {r['output_tok_s']:.0f} | {r['wall_s']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
