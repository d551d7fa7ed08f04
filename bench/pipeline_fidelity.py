"""The engine vs kvpress's own KVPressTextGenerationPipeline on a manifest: same answers, token for token?

    .venv/bin/python bench/pipeline_fidelity.py MANIFEST.json [--methods full,snapkv,streamingllm,knorm]
        [--scopes query_aware,kvpress_pipeline] [--ratio 0.5] [--limit N]

For every (entry, method) the pipeline gets the entry's context and question as kvpress's evaluation passes
them (the user message split at question_start; the pipeline applies the chat template itself), and the
engine gets the manifest prompt with kv_press {method, compression_ratio, scope, question_start}. In-process,
CPU, the tiny model (SmolLM2-135M-Instruct). Prints the matches per scope. Results (2-core shared CPU, 1 torch
thread) are in engines/kvpress/README.md ("Fidelity").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "engines" / "kvpress"))
sys.path.insert(0, str(ROOT))

from tests.engine.pipeline_ref import PIPELINE_PRESSES, load_tiny, pipeline_answer, split_for_pipeline  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("--methods", default="full,snapkv,streamingllm,knorm")
    ap.add_argument("--scopes", default="query_aware,kvpress_pipeline")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    from kvpress_engine.methods import PressSpec, resolve_press_spec

    eng, pipe = load_tiny()
    entries = json.loads(Path(a.manifest).read_text())["entries"][: a.limit]
    methods = a.methods.split(",")
    scopes = a.scopes.split(",")
    match = {s: 0 for s in scopes}
    total = 0
    for e in entries:
        context, question = split_for_pipeline(eng.tokenizer, e["prompt"], e["question_start"])
        for m in methods:
            t = time.time()
            ref = pipeline_answer(pipe, context, question, PIPELINE_PRESSES[m](a.ratio), e["max_new_tokens"])
            total += 1
            line = [f"{e['example_id'][:28]:28} {e['final_tokens']:5} {m:22}"]
            for s in scopes:
                kv = {"method": m, "scope": s}
                if m != "full":
                    kv["compression_ratio"] = a.ratio
                if s != "query_aware":
                    kv["question_start"] = e["question_start"]
                spec = resolve_press_spec(PressSpec(), kv)
                enc = eng.encode_completion(e["prompt"], spec.question_start if s != "query_aware" else None,
                                            separate=s == "kvpress_pipeline")
                res = eng.generate(enc, spec, e["max_new_tokens"])
                ok = res.text == ref
                match[s] += ok
                line.append(f"{s}={'ok' if ok else 'DIFF'}")
                if not ok:
                    line.append(f"[engine {res.text!r} pipeline {ref!r}]")
            print(" ".join(line), f"{time.time() - t:.0f}s", flush=True)
    for s in scopes:
        print(f"{s}: {match[s]}/{total} answers equal to the pipeline's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
