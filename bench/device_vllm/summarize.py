"""Per-cell summary of a study DB: engine, image, status, requests ok, score and relative score per bin, latency,
KV usage, and the attention backend each vLLM instance logged at start.

    python bench/device_vllm/summarize.py runs/device_vllm/kv_transition.sqlite
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
from pathlib import Path

BACKEND = re.compile(r"Using (\w+) (?:attention )?backend")


def main(db: str) -> int:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    cells = c.execute("SELECT cell_id, engine, method, compression_ratio, status, spec_json FROM cells "
                      "ORDER BY engine, cell_id").fetchall()
    print("cell | image | status | ok/all | per bin: mean score (rel to full) @ mean tokens | TTFT p50 ms | TPOT p50 ms")
    for cell_id, engine, method, ratio, status, spec_json in cells:
        image = json.loads(spec_json).get("image_ref", "?")
        ok, n = c.execute("SELECT SUM(status='ok'), COUNT(*) FROM requests WHERE cell_id=?", (cell_id,)).fetchone()
        bins = c.execute("SELECT bin_id, mean, rel, mean_tokens, ttft_p50, tpot_p50, peak_kv_usage FROM analysis_bins "
                         "WHERE cell_id=? ORDER BY bin_id", (cell_id,)).fetchall()
        per_bin = "  ".join(f"{m:.2f}({'-' if r is None else f'{r:.2f}'})@{t:.0f}" for _, m, r, t, *_ in bins
                            if m is not None)
        ttft = [b[4] for b in bins if b[4] is not None]
        tpot = [b[5] for b in bins if b[5] is not None]
        kv = max((b[6] for b in bins if b[6] is not None), default=None)
        print(f"{cell_id} | {image} | {status} | {ok or 0}/{n} | {per_bin} | "
              f"{'/'.join(f'{x * 1e3:.0f}' for x in ttft)} | {'/'.join(f'{x * 1e3:.1f}' for x in tpot)}"
              + (f" | peak KV usage {kv:.4g}" if kv is not None else ""))
    print("\nengine instances: cell, runtime, exit code, attention backend (from the engine log)")
    for cell_id, runtime, code, log_path in c.execute(
            "SELECT cell_id, runtime, exit_code, log_path FROM engine_instances ORDER BY instance_id"):
        backend = "-"
        if log_path and Path(log_path).is_file():
            found = BACKEND.findall(Path(log_path).read_text(errors="replace"))
            backend = ",".join(dict.fromkeys(found)) or "-"
        print(f"  {cell_id} | {runtime} | {code} | {backend}")
    tr = c.execute("SELECT * FROM transitions").fetchall()
    cols = [d[0] for d in c.execute("SELECT * FROM transitions").description]
    print("\ntransitions:")
    for row in tr:
        d = dict(zip(cols, row))
        print("  " + ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("params_json", "computed_at")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
