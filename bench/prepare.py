"""Benchmark: tokenize + bin 5,000 synthetic examples averaging 8k tokens with the tiny model's
tokenizer (the whole `prepare` stage: generate, format, count, bin, write manifest + SQLite).

    .venv/bin/python bench/prepare.py [--n 5000] [--keep]

Prints wall seconds per stage and peak RSS. Goal: < 60 s and < 2 GiB on 2 cores.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kv_transition.config import load_config, resolve_paths
from kv_transition.manifest.prepare import prepare
from kv_transition.manifest.tokens import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--keep", action="store_true", help="keep the temp project dir")
    args = ap.parse_args()
    lengths = [4000, 6000, 8000, 10000, 12000]  # mean 8000
    tasks = ["passkey", "niah_single", "niah_multikey", "niah_multivalue"]
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    per = max(1, round(args.n / (len(lengths) * len(tasks) * len(depths))))
    work = Path(tempfile.mkdtemp(prefix="kvt-bench-prepare-"))
    overrides = [
        "experiment.group_id=bench_prepare",
        f"output.runs_root={work / 'runs'}", f"output.data_root={work / 'data'}",
        f"dataset.synthetic.tasks={tasks}", f"dataset.synthetic.lengths={lengths}",
        f"dataset.synthetic.depths={depths}", f"dataset.synthetic.n_per_length={per}",
        "model.max_context=32768", "binning.edges=[0, 5000, 7000, 9000, 11000]",
    ]
    cfg = load_config(REPO / "config" / "default.yaml", overrides)
    paths = resolve_paths(cfg, cwd=work)
    # the tokenizer conversion is a one-off per machine (cached); keep it out of the timed part
    cache = REPO / "data" / "tokenizers"
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.model.tokenizer, cache)
    t_tok = time.perf_counter() - t0

    stages: dict[str, float] = {}
    last = [time.perf_counter()]

    def progress(stage: str, advance: int, total: int | None) -> None:
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + (now - last[0])
        last[0] = now

    t0 = time.perf_counter()
    last[0] = t0
    res = prepare(cfg, paths, progress, tok=tok)
    wall = time.perf_counter() - t0
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 ** 2)
    entries = res.manifest["entries"]
    mean_tok = sum(e["final_tokens"] for e in entries) / len(entries)
    print(f"examples: {res.n_loaded}  entries: {len(entries)}  mean tokens/prompt: {mean_tok:.0f}  "
          f"total tokens: {sum(e['final_tokens'] for e in entries):,}")
    print(f"tokenizer load (cached): {t_tok:.2f} s")
    print(f"prepare wall: {wall:.1f} s   peak RSS: {rss_gib:.2f} GiB   (goal < 60 s, < 2 GiB)")
    print(f"manifest: {paths.manifest.stat().st_size / 2**20:.0f} MiB   db: {paths.db.stat().st_size / 2**20:.0f} MiB")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept: {work}")
    return 0 if wall < 60 and rss_gib < 2 else 1


if __name__ == "__main__":
    sys.exit(main())
