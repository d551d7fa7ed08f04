"""The per-cell background sampler: one thread, fixed cadence (default 4 Hz), rows through the
DbWriter (batched). A source that is unavailable (no NVML, no /metrics, metric name absent) is
recorded once as an `events` row and skipped; sampling of the other sources carries on."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Iterable, Optional, Protocol

import httpx

from kv_transition.telemetry.gpu import GpuSampler, NvmlUnavailable
from kv_transition.telemetry.host import HostSampler
from kv_transition.telemetry.prom import parse_prometheus


class RowSink(Protocol):
    def insert(self, table: str, row: dict[str, Any], *, verb: str = "INSERT") -> None: ...


class ListSink:
    """A RowSink that keeps rows in memory (standalone use, tests)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def insert(self, table: str, row: dict[str, Any], *, verb: str = "INSERT") -> None:
        with self._lock:
            self.rows.append((table, row))

    def table(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for t, r in self.rows if t == name]


class TelemetrySampler:
    def __init__(self, sink: RowSink, run_id: Optional[int], cell_id: Optional[str] = None, *,
                 interval_s: float = 0.25, nvml: bool = True, gpu_uuids: Iterable[str] = (),
                 gpu_indices: Iterable[int] = (), all_gpus_if_none: bool = True, pids: Iterable[int] = (),
                 metrics_url: Optional[str] = None, metric_names: Iterable[str] = (),
                 metrics_timeout_s: float = 1.0):
        # where rows go: (sink, run_id, cell_id) per cell sampled; more than one when the cells of an
        # interleaved group share one engine (SharedTelemetry): one reading, one row per cell
        self._targets: list[tuple[RowSink, Optional[int], Optional[str]]] = [(sink, run_id, cell_id)]
        self._tlock = threading.Lock()
        self._event_rows: list[dict[str, Any]] = []  # replayed to a target added later
        self.interval_s = interval_s
        self.want_nvml = nvml
        self.gpu_uuids = list(gpu_uuids)
        self.gpu_indices = list(gpu_indices)
        self.all_gpus_if_none = all_gpus_if_none
        self.pids = list(pids)
        self.metrics_url = metrics_url
        self.metric_names = list(metric_names)
        self.metrics_timeout_s = metrics_timeout_s
        self.gpu: Optional[GpuSampler] = None
        self.host: Optional[HostSampler] = None
        self._http: Optional[httpx.Client] = None
        self._metrics_on = bool(metrics_url and self.metric_names)
        self._seen_metric: set[str] = set()
        self._events: set[str] = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.n_samples = 0
        self.sample_s = 0.0  # time spent sampling (overhead)

    @property
    def run_id(self) -> Optional[int]:
        return self._targets[0][1] if self._targets else None

    # --- targets ---
    def add_target(self, sink: RowSink, run_id: Optional[int], cell_id: Optional[str]) -> None:
        """Also record every later sample for this run (and the events so far, once)."""
        with self._tlock:
            self._targets = [*self._targets, (sink, run_id, cell_id)]
            events = list(self._event_rows)
        for row in events:
            sink.insert("events", {**row, "run_id": run_id, "cell_id": cell_id})

    def remove_target(self, run_id: Optional[int]) -> int:
        """Stop recording for this run; returns how many targets are left."""
        with self._tlock:
            self._targets = [t for t in self._targets if t[1] != run_id]
            return len(self._targets)

    def _insert(self, table: str, row: dict[str, Any], with_cell: bool = False) -> None:
        for sink, run_id, cell_id in self._targets:  # a snapshot: add/remove replace the list
            sink.insert(table, {**row, "run_id": run_id, **({"cell_id": cell_id} if with_cell else {})})

    # --- events (each kind once per sampler) ---
    def event(self, kind: str, message: str, *, level: str = "warning", data: Any = None, once: bool = True) -> None:
        if once and kind in self._events:
            return
        self._events.add(kind)
        row = {"t": time.time(), "level": level, "kind": kind, "message": message,
               "data_json": json.dumps(data) if data is not None else None}
        with self._tlock:
            self._event_rows.append(row)
        self._insert("events", row, with_cell=True)

    # --- setup / teardown ---
    def open(self) -> "TelemetrySampler":
        if self.want_nvml:
            try:
                self.gpu = GpuSampler(self.gpu_uuids, self.gpu_indices, all_if_none=self.all_gpus_if_none)
                for err in self.gpu.errors:
                    self.event("nvml_device_missing", err)
                if not self.gpu.gpus:
                    self.event("nvml_no_devices", "NVML is up but no GPU matched; GPU telemetry off",
                               data={"uuids": self.gpu_uuids, "indices": self.gpu_indices})
                else:
                    self.event("nvml_devices", "GPU telemetry on", level="info",
                               data=[{"uuid": g.uuid, "index": g.index, "name": g.name} for g in self.gpu.gpus])
            except NvmlUnavailable as e:
                self.gpu = None
                self.event("nvml_unavailable", f"{e}; GPU telemetry off")
        self.host = HostSampler(self.pids)
        if self._metrics_on:
            self._http = httpx.Client(timeout=self.metrics_timeout_s)
        elif self.metrics_url is None and self.metric_names:
            self.event("engine_metrics_unavailable", "the engine spec has no metrics path; KV-usage series off")
        return self

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None
        if self._http is not None:
            self._http.close()
            self._http = None

    # --- one sample of every source ---
    def sample_once(self) -> None:
        t0 = time.perf_counter()
        t = time.time()
        if self.gpu is not None and self.gpu.gpus:
            for row in self.gpu.sample():
                self._insert("telemetry_gpu", {"t": t, **row})
        if self.host is not None:
            self._insert("telemetry_host", {"t": t, **self.host.sample()})
        if self._metrics_on and self._http is not None:
            self._scrape(t)
        self.n_samples += 1
        self.sample_s += time.perf_counter() - t0

    def _scrape(self, t: float) -> None:
        assert self._http is not None and self.metrics_url is not None
        try:
            r = self._http.get(self.metrics_url)
        except httpx.HTTPError as e:
            self.event("engine_metrics_unavailable", f"GET {self.metrics_url} failed: {e!r} (will keep trying)")
            return
        if r.status_code == 404:
            self.event("engine_metrics_unavailable", f"GET {self.metrics_url} → 404; KV-usage series off")
            self._metrics_on = False
            return
        if r.status_code >= 400:
            self.event("engine_metrics_unavailable", f"GET {self.metrics_url} → HTTP {r.status_code} (will keep trying)")
            return
        samples = parse_prometheus(r.text, self.metric_names)
        for s in samples:
            self._seen_metric.add(s.name)
            self._insert("telemetry_engine_metric", {
                "t": t, "metric": s.name, "labels_json": json.dumps(dict(s.labels), sort_keys=True), "value": s.value})
        if not samples and "kv_metric_missing" not in self._events and self.n_samples >= 2:
            self.event("kv_metric_missing", f"none of {self.metric_names} in {self.metrics_url}",
                       data={"names": self.metric_names})

    # --- the thread ---
    def start(self) -> "TelemetrySampler":
        if self.host is None:
            self.open()
        self._thread = threading.Thread(target=self._loop, name="kvt-telemetry", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as e:  # a sampler bug must never take the cell down
                self.event("telemetry_error", f"{type(e).__name__}: {e}", level="error")
            nxt += self.interval_s
            delay = nxt - time.monotonic()
            if delay < 0:  # fell behind: skip, do not burst
                nxt = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.close()

    def __enter__(self) -> "TelemetrySampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class SharedTelemetry:
    """One sampler per engine instance for the cells of an interleaved group, which share that engine: the first
    cell to attach starts it, later cells are added as targets (each sample is read once and recorded once per
    cell, under that cell's run), and the last to detach stops it. Without it N interleaved cells read NVML and
    scrape the engine's /metrics N times per interval. ``key`` names the instance: cells resumed on a restarted
    engine (new processes) get a sampler of their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samplers: dict[Any, TelemetrySampler] = {}
        self._of_run: dict[Optional[int], Any] = {}
        self.samplers_started = 0

    def attach(self, key: Any, make: Callable[[], TelemetrySampler], sink: RowSink, run_id: Optional[int],
               cell_id: Optional[str]) -> TelemetrySampler:
        """``make()`` builds this cell's sampler (sink/run/cell as its first target) when none runs for ``key``."""
        with self._lock:
            sampler = self.samplers.get(key)
            if sampler is None:
                sampler = self.samplers[key] = make().start()
                self.samplers_started += 1
            else:
                sampler.add_target(sink, run_id, cell_id)
            self._of_run[run_id] = key
            return sampler

    def detach(self, run_id: Optional[int]) -> None:
        with self._lock:
            key = self._of_run.pop(run_id, None)
            sampler = self.samplers.get(key)
            if sampler is not None and sampler.remove_target(run_id) == 0:
                sampler.stop()
                del self.samplers[key]
