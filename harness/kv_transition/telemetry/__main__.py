"""Standalone sampler: `python -m kv_transition.telemetry [--seconds 5] [--interval 0.25] [--pids P …]
[--gpu-uuid U …] [--metrics-url URL --metric NAME …]` prints every sample (and event) it takes."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kv_transition.telemetry.sampler import ListSink, TelemetrySampler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kv_transition.telemetry")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--pids", type=int, nargs="*", default=[])
    ap.add_argument("--gpu-uuid", nargs="*", default=[])
    ap.add_argument("--gpu-index", type=int, nargs="*", default=[])
    ap.add_argument("--metrics-url")
    ap.add_argument("--metric", nargs="*", default=[])
    ap.add_argument("--no-nvml", action="store_true")
    ap.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    a = ap.parse_args(argv)
    sink = ListSink()
    s = TelemetrySampler(sink, run_id=None, interval_s=a.interval, nvml=not a.no_nvml, gpu_uuids=a.gpu_uuid,
                         gpu_indices=a.gpu_index, pids=a.pids, metrics_url=a.metrics_url, metric_names=a.metric)
    t0 = time.time()
    with s:
        time.sleep(a.seconds)
    if a.json:
        for table, row in sink.rows:
            print(json.dumps({"table": table, **row}))
        return 0
    for e in sink.table("events"):
        print(f"event {e['level']}/{e['kind']}: {e['message']}" + (f" {e['data_json']}" if e["data_json"] else ""))
    gpu = sink.table("telemetry_gpu")
    if gpu:
        print(f"{'t(s)':>6} {'gpu':>3} {'mem used/total MiB':>20} {'util%':>5} {'mem%':>4} {'power W':>8} {'temp C':>6}")
        for r in gpu:
            mem = f"{(r['mem_used'] or 0) / 2**20:.0f}/{(r['mem_total'] or 0) / 2**20:.0f}"
            print(f"{r['t'] - t0:6.2f} {r['gpu_index']!s:>3} {mem:>20} {r['util_gpu']!s:>5} {r['util_mem']!s:>4} "
                  f"{r['power_w'] if r['power_w'] is None else round(r['power_w'], 1)!s:>8} {r['temp_c']!s:>6}")
    host = sink.table("telemetry_host")
    print(f"{'t(s)':>6} {'host cpu%':>9} {'ram used GiB':>12} {'proc cpu%':>9} {'proc rss MiB':>12} {'procs':>5}")
    for r in host:
        rss = f"{r['proc_rss'] / 2**20:.0f}" if r["proc_rss"] is not None else "-"
        print(f"{r['t'] - t0:6.2f} {r['cpu_percent']:9.1f} {r['ram_used'] / 2**30:12.2f} {r['proc_cpu_percent']!s:>9} "
              f"{rss:>12} {r['proc_count']!s:>5}")
    for r in sink.table("telemetry_engine_metric"):
        print(f"{r['t'] - t0:6.2f} {r['metric']}{r['labels_json']} = {r['value']}")
    print(f"{s.n_samples} samples in {a.seconds}s at {a.interval}s; sampling cost {s.sample_s / max(1, s.n_samples) * 1000:.2f} ms/sample"
          + (f"; GPUs: {[(g['gpu_index'], g['gpu_uuid']) for g in {r['gpu_uuid']: r for r in gpu}.values()]}" if gpu else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
