"""Telemetry: Prometheus parsing (pure), psutil on a real child process tree, unavailable sources
recorded once while sampling carries on, rows through the DB writer."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kv_transition.db import connect, rows
from kv_transition.runner import DbWriter
from kv_transition.telemetry import HostSampler, ListSink, TelemetrySampler, parse_prometheus
from kv_transition.telemetry import sampler as sampler_mod
from tests.runner.conftest import seed_requests

VLLM_METRICS = """\
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.4375
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 3.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 17
sglang:token_usage{model_name="m",tp_rank="0"} 1.5e-01 1712345678000
weird{path="C:\\\\tmp",msg="say \\"hi\\"\\nbye"} NaN
gauge_inf +Inf
broken{oops 1
no_value
"""


def test_parse_prometheus_names_labels_values() -> None:
    s = parse_prometheus(VLLM_METRICS)
    by = {x.name: x for x in s}
    assert by["vllm:kv_cache_usage_perc"].value == 0.4375
    assert by["vllm:kv_cache_usage_perc"].labels_dict == {"engine": "0", "model_name": "Qwen/Qwen3-8B"}
    assert by["sglang:token_usage"].value == pytest.approx(0.15)  # trailing timestamp ignored
    assert by["weird"].labels_dict == {"path": "C:\\tmp", "msg": 'say "hi"\nbye'} and math.isnan(by["weird"].value)
    assert by["gauge_inf"].value == math.inf
    assert by["vllm:e2e_request_latency_seconds_bucket"].labels_dict["le"] == "+Inf"
    assert "broken" not in by and "no_value" not in by  # malformed lines skipped, not fatal


def test_parse_prometheus_filters_by_name() -> None:
    s = parse_prometheus(VLLM_METRICS, ["vllm:kv_cache_usage_perc", "sglang:token_usage"])
    assert [x.name for x in s] == ["vllm:kv_cache_usage_perc", "sglang:token_usage"]


def test_psutil_samples_a_real_child_process_tree() -> None:
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']);"
            " x = bytearray(64 << 20); t = time.time()\nwhile time.time() - t < 30: pass")
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        h = HostSampler([p.pid])
        time.sleep(0.5)
        h.sample()
        time.sleep(0.3)
        s = h.sample()
        assert s["proc_count"] == 2                     # the parent and its child
        assert s["proc_rss"] > 64 << 20                 # the 64 MiB buffer
        assert s["proc_cpu_percent"] > 5                # busy loop (100 = one core; the host may be busy)
        assert 0 < s["ram_used"] <= s["ram_total"] and s["cpu_percent"] is not None
    finally:
        for c in __import__("psutil").Process(p.pid).children(recursive=True):
            c.kill()
        p.kill()
        p.wait()
    s = h.sample()  # the tree is gone: zeros, no exception
    assert s["proc_count"] == 0 and s["proc_rss"] == 0


def test_nvml_unavailable_recorded_once_and_sampling_carries_on(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_nvml(*a, **k):
        raise sampler_mod.NvmlUnavailable("NVML init failed: NVML Shared Library Not Found")

    monkeypatch.setattr(sampler_mod, "GpuSampler", no_nvml)
    sink = ListSink()
    with TelemetrySampler(sink, run_id=None, interval_s=0.02, nvml=True, gpu_indices=[0]):
        time.sleep(0.25)
    ev = sink.table("events")
    assert [e["kind"] for e in ev] == ["nvml_unavailable"] and "Shared Library" in ev[0]["message"]
    assert len(sink.table("telemetry_host")) >= 5 and sink.table("telemetry_gpu") == []


class _Metrics(BaseHTTPRequestHandler):
    status = 200
    body = VLLM_METRICS

    def do_GET(self) -> None:  # noqa: N802
        data = self.body.encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a) -> None:
        pass


@pytest.fixture
def metrics_server():
    srvs = []

    def start(status: int = 200, body: str = VLLM_METRICS) -> str:
        h = type("H", (_Metrics,), {"status": status, "body": body})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), h)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        srvs.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/metrics"

    yield start
    for s in srvs:
        s.shutdown()
        s.server_close()


def test_engine_metrics_scraped_into_the_db(tmp_path: Path, metrics_server) -> None:
    url = metrics_server()
    db = tmp_path / "k.sqlite"
    run_id, _ = seed_requests(db, 0)
    with DbWriter(db) as w:
        s = TelemetrySampler(w, run_id=run_id, interval_s=0.02, nvml=False, metrics_url=url,
                             metric_names=["vllm:kv_cache_usage_perc", "sglang:token_usage"]).start()
        deadline = time.monotonic() + 20  # count samples, not wall time: a loaded CI box samples slower
        while s.n_samples < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        s.stop()
    conn = connect(db)
    m = rows(conn, "SELECT * FROM telemetry_engine_metric")
    assert len(m) >= 2 * 5 and {r["metric"] for r in m} == {"vllm:kv_cache_usage_perc", "sglang:token_usage"}
    assert {r["value"] for r in m if r["metric"] == "vllm:kv_cache_usage_perc"} == {0.4375}
    assert rows(conn, "SELECT COUNT(*) n FROM telemetry_host")[0]["n"] >= 5
    assert rows(conn, "SELECT COUNT(*) n FROM events")[0]["n"] == 0


def test_metrics_unreachable_404_and_missing_names_each_recorded_once(metrics_server) -> None:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sk.getsockname()[1]}/metrics"
    cases = {dead: "engine_metrics_unavailable", metrics_server(404, "nope"): "engine_metrics_unavailable",
             metrics_server(200, "other_metric 1\n"): "kv_metric_missing"}
    for url, kind in cases.items():
        sink = ListSink()
        with TelemetrySampler(sink, run_id=None, interval_s=0.02, nvml=False, metrics_url=url,
                              metric_names=["vllm:kv_cache_usage_perc"]):
            time.sleep(0.2)
        assert [e["kind"] for e in sink.table("events")] == [kind], url
        assert len(sink.table("telemetry_host")) >= 5  # carried on
        assert sink.table("telemetry_engine_metric") == []


def test_sampler_cadence(metrics_server) -> None:
    sink = ListSink()
    s = TelemetrySampler(sink, run_id=None, interval_s=0.05, nvml=False)
    with s:
        time.sleep(0.5)
    n = len(sink.table("telemetry_host"))
    assert 8 <= n <= 12 and s.sample_s / s.n_samples < 0.02


def test_shared_telemetry_reads_once_and_records_per_cell() -> None:
    """Interleaved cells of one engine: one sampler (the first attach starts it), every reading recorded
    under each attached run with its cell's events; detaching the last stops it; another engine instance (a
    restart) gets its own."""
    import os

    from kv_transition.telemetry import SharedTelemetry

    hub = SharedTelemetry()
    sinks = {r: ListSink() for r in (1, 2, 3)}

    def make(run):
        return lambda: TelemetrySampler(sinks[run], run, f"cell{run}", interval_s=3600, nvml=True, gpu_indices=[99],
                                        pids=[os.getpid()])

    a = hub.attach("inst-A", make(1), sinks[1], 1, "cell1")
    deadline = time.monotonic() + 10
    while not sinks[1].table("telemetry_host"):  # the thread's first reading; the next one is an hour away
        assert time.monotonic() < deadline
        time.sleep(0.01)
    b = hub.attach("inst-A", make(2), sinks[2], 2, "cell2")
    assert a is b and hub.samplers_started == 1
    a.sample_once()
    for run in (1, 2):
        host = sinks[run].table("telemetry_host")
        assert [h["run_id"] for h in host] == [run] * len(host) and len(host) >= 1
        ev = sinks[run].table("events")  # the sampler's start-up events, replayed to the later cell too
        assert ev and {e["cell_id"] for e in ev} == {f"cell{run}"}
    assert sinks[2].table("telemetry_host")[-1]["t"] == sinks[1].table("telemetry_host")[-1]["t"]  # one reading
    c = hub.attach("inst-B", make(3), sinks[3], 3, "cell3")
    assert c is not a and hub.samplers_started == 2
    hub.detach(1)
    n1, n2 = len(sinks[1].table("telemetry_host")), len(sinks[2].table("telemetry_host"))
    a.sample_once()
    assert len(sinks[1].table("telemetry_host")) == n1 and len(sinks[2].table("telemetry_host")) == n2 + 1
    hub.detach(2)
    hub.detach(3)
    assert hub.samplers == {} and a._thread is None and c._thread is None
