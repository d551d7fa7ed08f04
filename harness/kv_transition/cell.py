"""One cell: config + engine/method/budget → ResolvedSpec → runtime.running(...) → telemetry sampler +
runner over the manifest from the DB → teardown → cell status.

    res = run_cell(cfg, paths, engine="kvpress", method="snapkv", compression_ratio=0.5)
    res.status  # completed | incomplete | failed

Idempotent and resumable: requests are (cell_id, example_id, repeat) UNIQUE; a re-run sends only the
requests without a successful response, and an already complete cell starts no engine at all.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import os
import socket
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

import httpx

from kv_transition import __version__
from kv_transition.config import Config, Paths
from kv_transition.config.secrets import masked_config
from kv_transition.db import connect, dumps, transaction, utcnow
from kv_transition.engines.spec import ResolvedSpec, load_engine, resolve
from kv_transition.errors import ConfigError
from kv_transition.manifest.store import from_db
from kv_transition.runner import DbWriter, Runner, RunnerOptions, RunStats, WorkItem
from kv_transition.runtime.base import CELL_LABEL, GROUP_LABEL, OWNER_LABEL, EngineStartError, Instance, Runtime, get_runtime
from kv_transition.runtime.external import normalize_base_url
from kv_transition.telemetry import TelemetrySampler

KV_CARRIER = "kv_press"  # the per-request method object of request-mode engines
DB_LOCK_WAIT_S = 300.0    # how long a cell's DB writes wait out another process's write lock
LOG_TAIL_LINES = 30       # engine log lines quoted in the reason when the engine dies mid-cell


def _engine_gone(rt: Any, inst: Instance) -> bool:
    """Two failed liveness checks in a row (one slow health probe is not a dead engine)."""
    import time

    for i in range(2):
        try:
            if rt.is_running(inst):
                return False
        except Exception:  # noqa: BLE001 - a flaky check is not a dead engine
            return False
        if i == 0:
            time.sleep(0.2)
    return True


def _log_tail_text(rt: Any, inst: Instance, log_path: Any) -> str:
    """'\nlast N engine log lines (<log>):\n…' or '' — what the engine said before it died."""
    try:
        tail = rt.log_tail(inst, LOG_TAIL_LINES)
    except Exception:  # noqa: BLE001 - a missing log is not a second failure
        tail = ""
    if not tail.strip():
        return ""
    where = inst.log_path or log_path
    return f"\nlast {LOG_TAIL_LINES} engine log lines ({where}):\n{tail}"
GENERIC_ENGINE = "openai"  # engines/openai/engine.yaml: any OpenAI-compatible server
EXTERNAL_READINESS_TIMEOUT_S = 30.0  # runtime external without engine.readiness_timeout_s


@dataclass
class CellResult:
    cell_id: str
    run_id: Optional[int]
    status: str                 # completed | incomplete | failed
    reason: Optional[str]
    n_requests: int
    n_ok: int
    n_failed: int
    n_todo: int                 # without a successful response when this run began
    stats: Optional[RunStats]
    spec: ResolvedSpec
    log_path: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"


# --- identity -----------------------------------------------------------------------------------

def cell_inputs(cfg: Config, spec: ResolvedSpec, dataset_id: str) -> dict[str, Any]:
    """Everything that can change a response (and nothing that cannot: port, concurrency, timeouts,
    telemetry, runtime, repeats — more repeats extend the same cell)."""
    from kv_transition.manifest.tokens import model_source

    return {
        "group_id": cfg.experiment.group_id, "dataset_id": dataset_id,
        "engine": spec.engine, "image": spec.image_ref, "method": spec.method,
        "compression_ratio": spec.compression_ratio, "budget": spec.budget,
        "kv_scope": cfg.kv.scope, "kv_params": cfg.kv.params,
        "model": {"id": cfg.model.id, "source": model_source(cfg.model), "revision": cfg.model.revision,
                  "max_context": cfg.model.max_context},
        "engine_cfg": {"device": cfg.engine.device, "dtype": cfg.engine.dtype, "extra_args": cfg.engine.extra_args},
        "request_extras": spec.request_extras,
        "decoding": {"temperature": cfg.decoding.temperature, "top_p": cfg.decoding.top_p,
                     "stream": cfg.decoding.stream},
        # only when pinned: cells from before the knob existed keep their ids
        **({"attention_backend": spec.attention_backend} if spec.attention_backend is not None else {}),
    }


def cell_id_for(inputs: dict[str, Any]) -> str:
    h = hashlib.sha256(dumps(inputs).encode()).hexdigest()[:10]
    knob = ""
    if inputs.get("compression_ratio") is not None:
        knob = f".r{inputs['compression_ratio']:g}"
    elif inputs.get("budget") is not None:
        knob = f".b{inputs['budget']}"
    return f"{inputs['engine']}.{inputs['method']}{knob}-{h}"


def git_sha() -> Optional[str]:
    """The harness's git commit (+ "-dirty" with uncommitted changes), $KVT_GIT_SHA (set in the harness
    image), or None. Cached per process."""
    global _GIT_SHA
    if _GIT_SHA is None:
        import subprocess
        from pathlib import Path

        sha = os.environ.get("KVT_GIT_SHA") or ""
        if not sha:
            root = Path(__file__).resolve().parents[2]
            try:
                sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                     timeout=5).stdout.strip()
                if sha and subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                          capture_output=True, text=True, timeout=10).stdout.strip():
                    sha += "-dirty"
            except (OSError, subprocess.SubprocessError):
                sha = ""
        _GIT_SHA = sha
    return _GIT_SHA or None


_GIT_SHA: Optional[str] = None


# --- request bodies -----------------------------------------------------------------------------

def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def request_body(entry: dict[str, Any], spec: ResolvedSpec, cfg: Config) -> dict[str, Any]:
    """The /v1/completions body for one manifest entry (the prompt is already fully formatted)."""
    body: dict[str, Any] = {
        "model": spec.served_model, "prompt": entry["prompt"], "max_tokens": int(entry["max_new_tokens"]),
        "temperature": cfg.decoding.temperature, "top_p": cfg.decoding.top_p, "stream": cfg.decoding.stream,
    }
    if cfg.decoding.stream:
        body["stream_options"] = {"include_usage": True}
    _merge(body, spec.request_extras)
    if spec.send_add_special_tokens:
        body["add_special_tokens"] = bool(entry["add_special_tokens"])
    if isinstance(body.get(KV_CARRIER), dict):
        kv = body[KV_CARRIER]
        if cfg.kv.scope in ("context_only", "kvpress_pipeline"):
            kv["scope"] = cfg.kv.scope
            if entry.get("question_start") is not None:
                kv["question_start"] = int(entry["question_start"])
        elif kv.get("method") == "finch" and entry.get("question_start") is not None:
            kv["question_start"] = int(entry["question_start"])  # finch: the question is its window
    return body


# --- spec ---------------------------------------------------------------------------------------

def resolve_cell_spec(cfg: Config, *, engine: Optional[str] = None, method: Optional[str] = None,
                      compression_ratio: Optional[float] = None, budget: Optional[int] = None,
                      runtime: Optional[str] = None, base_url: Optional[str] = None,
                      tensor_parallel: Optional[int] = None, digest: Optional[str] = None,
                      ) -> tuple[ResolvedSpec, str, Optional[str]]:
    """→ (spec, runtime name, external base url). A method given here takes its ratio/budget from the
    arguments only; otherwise kv.method/compression_ratio/budget come from the config.
    `tensor_parallel` fills the engine's {tp}; `digest` pins the image (a lock file's sha256:…)."""
    from kv_transition.manifest.tokens import model_source

    rt = runtime or cfg.engine.runtime
    if method is None:
        method = cfg.kv.method
        if compression_ratio is None and budget is None:
            compression_ratio, budget = cfg.kv.compression_ratio, cfg.kv.budget
    if compression_ratio is not None and budget is not None:
        raise ConfigError("set at most one of --ratio and --budget")
    if compression_ratio is not None and not 0.0 <= compression_ratio < 1.0:
        raise ConfigError(f"kv.compression_ratio: {compression_ratio:g} is outside [0, 1) "
                          "(the fraction of the KV cache evicted, e.g. 0.5)")
    if budget is not None and budget <= 0:
        raise ConfigError(f"kv.budget: {budget} is not a positive token count (the KV tokens kept, e.g. 1024)")
    host, port = cfg.engine.host, cfg.engine.port
    url = base_url or cfg.engine.base_url
    if rt == "external":
        if not url:
            raise ConfigError("engine.base_url: runtime 'external' needs a base URL (--base-url)")
        url = normalize_base_url(url)
        u = urlsplit(url)
        host, port = u.hostname or host, u.port or (443 if u.scheme == "https" else 80)
    from kv_transition.engines.mounts import plan_mounts

    eng = load_engine(engine or default_engine(cfg, rt))
    md = eng.methods.get(method)
    if md is not None and md.supports and not md.baseline and compression_ratio is None and budget is None:
        raise ConfigError(f"kv.method: {eng.name}/{method} needs a compression ratio or a budget "
                          f"(set {' or '.join('kv.' + k for k in md.supports)})")
    model_arg, mounts, mount_env = plan_mounts(eng, rt, model_source(cfg.model) or cfg.model.id,
                                               hf_cache=cfg.engine.hf_cache, extra=cfg.engine.mounts,
                                               host_env=dict(os.environ))
    spec = resolve(
        eng, method, compression_ratio=compression_ratio, budget=budget,
        model_path=model_arg or cfg.model.id, served_model=cfg.model.id, host=host, port=port,
        gpus=cfg.engine.gpus, device=cfg.engine.device, dtype=cfg.engine.dtype, max_context=cfg.model.max_context,
        extra_args=cfg.engine.extra_args, env={**mount_env, **cfg.engine.env}, host_env=dict(os.environ),
        params={"model_file": _in_container(model_file(cfg), mounts), **(cfg.kv.params or {})},
        request_params=cfg.kv.params or None,
        tensor_parallel=tensor_parallel or 1, digest=digest, runtime=rt, tag=cfg.engine.tag, mounts=mounts,
        attention_backend=cfg.engine.attention_backend,
    )
    if cfg.engine.readiness_timeout_s:
        spec = dataclasses.replace(spec, readiness_timeout_s=cfg.engine.readiness_timeout_s)
    elif rt == "external":  # someone else's server: it is up or it is not; no 15-minute model-load wait
        spec = dataclasses.replace(spec, readiness_timeout_s=EXTERNAL_READINESS_TIMEOUT_S)
    return spec, rt, (url if rt == "external" and url else None)


def _in_container(path: str, mounts: list[Any]) -> str:
    """A host path as the engine container sees it (through the model mount), else unchanged."""
    from pathlib import Path

    for m in mounts:
        if m.kind == "model" and Path(path).expanduser().resolve() == Path(m.source):
            return m.target
    return path


def model_file(cfg: Config) -> str:
    """{model_file} in engine args: the model as a file path — a `package:NAME` source (the PyPI model
    wheel) becomes the GGUF inside the installed package (engines such as llama.cpp load only files)."""
    from kv_transition.manifest.tokens import model_source, package_gguf

    src = model_source(cfg.model) or cfg.model.id
    if src.startswith("package:"):
        try:
            return str(package_gguf(src.split(":", 1)[1]))
        except ConfigError:
            return src
    return src


def default_engine(cfg: Config, runtime: str) -> str:
    """The engine when no --engine is given: engine.name, except for an external server that the config
    does not itself describe (runtime external from the command line, or no engine.name in the config):
    that is the generic `openai` engine, labelled as such."""
    if runtime == "external" and not (cfg.engine.runtime == "external" and "name" in cfg.engine.model_fields_set):
        return GENERIC_ENGINE
    return cfg.engine.name


# --- DB bookkeeping -----------------------------------------------------------------------------

def _count(conn: Any, cell_id: str, status: str, repeats: int) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM requests WHERE cell_id=? AND status=? AND repeat<?",
                            (cell_id, status, repeats)).fetchone()[0])


def _prepare_rows(conn: Any, cfg: Config, spec: ResolvedSpec, cell_id: str, inputs: dict[str, Any],
                  dataset_id: str, entries: list[dict[str, Any]], runtime: str) -> tuple[int, list[WorkItem]]:
    cfg_json = dumps(masked_config(cfg))  # never a secret at rest
    cfg_hash = "sha256:" + hashlib.sha256(cfg_json.encode()).hexdigest()
    now = utcnow()
    repeats = cfg.decoding.repeats
    with transaction(conn):
        conn.execute(
            "INSERT INTO cells(cell_id, group_id, dataset_id, engine, method, compression_ratio, budget, kv_scope,"
            " model_id, repeats, inputs_json, config_json, config_hash, spec_json, status, n_requests, created_at,"
            " started_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,'running',?,?,?,?)"
            " ON CONFLICT(cell_id) DO UPDATE SET repeats=excluded.repeats, config_json=excluded.config_json,"
            " config_hash=excluded.config_hash, spec_json=excluded.spec_json, status='running', reason=NULL,"
            " n_requests=excluded.n_requests, started_at=excluded.started_at, finished_at=NULL,"
            " updated_at=excluded.updated_at",
            (cell_id, cfg.experiment.group_id, dataset_id, spec.engine, spec.method, spec.compression_ratio,
             spec.budget, cfg.kv.scope, cfg.model.id, repeats, dumps(inputs), cfg_json, cfg_hash,
             dumps(spec.to_dict(mask=True)), len(entries) * repeats, now, now, now),
        )
        cur = conn.execute(
            "INSERT INTO runs(cell_id, runtime, config_hash, host, pid, harness_version, git_sha, status, started_at)"
            " VALUES (?,?,?,?,?,?,?,'running',?)",
            (cell_id, runtime, cfg_hash, socket.gethostname(), os.getpid(), __version__, git_sha(), now),
        )
        run_id = int(cur.lastrowid)
        conn.executemany(
            "INSERT OR IGNORE INTO requests(cell_id, dataset_id, example_id, repeat, status, created_at, updated_at)"
            " VALUES (?,?,?,?,'pending',?,?)",
            [(cell_id, dataset_id, e["example_id"], r, now, now) for r in range(repeats) for e in entries],
        )
    existing = {
        (row[0], row[1]): (row[2], row[3], row[4])
        for row in conn.execute(
            "SELECT r.example_id, r.repeat, r.request_id, r.status,"
            " COALESCE((SELECT MAX(a.attempt_no) FROM attempts a WHERE a.request_id = r.request_id), 0)"
            " FROM requests r WHERE r.cell_id = ?", (cell_id,))
    }
    items = []
    for r in range(repeats):
        for e in entries:
            rid, status, n_att = existing[(e["example_id"], r)]
            if status != "ok":
                items.append(WorkItem(rid, e["example_id"], r, request_body(e, spec, cfg), n_att,
                                      prompt_tokens=e.get("final_tokens")))
    return run_id, items


def _followup_builder(cfg: Config, paths: Paths, manifest: dict[str, Any]) -> Any:
    """The prompt builder of follow-up requests (the manifest's tokenizer), when the manifest has
    two-request examples (`followups`, e.g. LongBench v2 with cot); else None."""
    fus = manifest.get("followups") or {}
    if not any(e["task"] in fus for e in manifest["entries"]):
        return None
    from kv_transition.manifest.prompts import PromptBuilder
    from kv_transition.manifest.tokens import load_tokenizer

    tok = load_tokenizer(cfg.model.tokenizer, paths.tokenizer_cache)
    if manifest.get("tokenizer") and tok.info() != manifest["tokenizer"]:
        raise ConfigError(f"model.tokenizer: {tok.info()} is not the tokenizer that prepared {paths.dataset_id} "
                          f"({manifest['tokenizer']}); run `kvt prepare` again")
    return PromptBuilder(tok, cfg.model.max_context, use_chat=cfg.model.chat_template)


def _attach_followups(conn: Any, cfg: Config, spec: ResolvedSpec, manifest: dict[str, Any], cell_id: str,
                      items: list[WorkItem], builder: Any) -> None:
    """Give each item of a two-request example its follow-up builder and, when an earlier run recorded
    the first response, that text (only the follow-up is sent then)."""
    from kv_transition.datasets.schema import Example
    from kv_transition.runner.followup import make_followup

    fus = manifest.get("followups") or {}
    entries = {e["example_id"]: e for e in manifest["entries"]}
    todo = [it for it in items if entries[it.example_id]["task"] in fus]
    exs = {e["example_id"]: Example.from_dict(e) for e in manifest["examples"]}
    prior = {r[0]: (r[1], int(r[2])) for r in conn.execute(
        "SELECT q.request_id, p.text, (SELECT COUNT(*) FROM attempts a WHERE a.request_id = q.request_id"
        " AND a.step = 2) FROM requests q LEFT JOIN responses p USING (request_id)"
        " WHERE q.cell_id = ? AND q.status != 'ok'", (cell_id,))}
    for it in todo:
        it.followup = make_followup(it, exs[it.example_id], fus[entries[it.example_id]["task"]], builder,
                                    lambda e: request_body(e, spec, cfg))
        it.first_text, it.followup_attempts_before = prior.get(it.request_id, (None, 0))


def _finish(conn: Any, cell_id: str, run_id: int, status: str, reason: Optional[str], n_todo: int,
            stats: Optional[RunStats], repeats: int, run_status: Optional[str] = None) -> tuple[int, int, int]:
    """Close the cell and the run. The run's counters count what this run STORED (attempts and
    responses rows), not the runner's in-memory tally: an interrupted or crashed run still tells the
    truth."""
    from kv_transition.db.stale import stored_counts

    n_ok = _count(conn, cell_id, "ok", repeats)
    n_failed = _count(conn, cell_id, "failed", repeats)
    c = stored_counts(conn, run_id)
    now = utcnow()
    with transaction(conn):
        n_req = int(conn.execute("SELECT n_requests FROM cells WHERE cell_id=?", (cell_id,)).fetchone()[0])
        conn.execute("UPDATE cells SET status=?, reason=?, n_ok=?, n_failed=?, finished_at=?, updated_at=? WHERE cell_id=?",
                     (status, reason, n_ok, n_failed, now, now, cell_id))
        conn.execute(
            "UPDATE runs SET status=?, reason=?, n_todo=?, n_sent=?, n_ok=?, n_failed=?, finished_at=? WHERE run_id=?",
            (run_status or status, reason, n_todo, c["n_sent"], c["n_ok"], c["n_failed"], now, run_id))
    return n_req, n_ok, n_failed


def _record_instance(conn: Any, run_id: int, cell_id: str, rt_name: str, spec: ResolvedSpec,
                     inst: Optional[Instance], error: Optional[str], log_path: Optional[str]) -> int:
    row = {
        "run_id": run_id, "cell_id": cell_id, "runtime": rt_name,
        "ident": inst.ident if inst else None, "base_url": inst.base_url if inst else spec.base_url,
        "image": spec.image_ref, "image_digest": (inst.image_digest if inst else None) or spec.digest,
        "command_json": json.dumps(spec.command), "args_json": json.dumps(spec.args),
        "env_json": json.dumps(spec.masked_env(), sort_keys=True), "gpus_json": json.dumps(spec.gpus),
        "gpu_uuids_json": json.dumps(inst.gpu_uuids if inst else []), "pids_json": json.dumps(inst.pids if inst else []),
        "started_at": inst.started_at if inst else None, "ready_at": inst.ready_at if inst else None,
        "stopped_at": inst.stopped_at if inst else utcnow(), "exit_code": inst.exit_code if inst else None,
        "log_path": str(inst.log_path) if inst and inst.log_path else log_path, "error": error,
        "mounts_json": json.dumps([dataclasses.asdict(m) for m in spec.mounts]),
        "attention_backend_requested": spec.attention_backend,
    }
    cols = list(row)
    cur = conn.execute(f"INSERT INTO engine_instances({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                       [row[c] for c in cols])
    return int(cur.lastrowid)


def backend_from_log(spec: ResolvedSpec, log_path: Optional[Any]) -> Optional[str]:
    """The attention backend the engine's startup log names (engine.yaml attention_backend.log_patterns)."""
    from pathlib import Path

    from kv_transition.engines.spec import parse_backend

    if not spec.backend_log_patterns or not log_path or not Path(log_path).is_file():
        return None
    try:
        return parse_backend(Path(log_path).read_text(errors="replace"), spec.backend_log_patterns)
    except OSError:
        return None


def _update_instance(conn: Any, instance_id: int, inst: Instance, error: Optional[str]) -> Optional[str]:
    backend = backend_from_log(inst.spec, inst.log_path)
    conn.execute("UPDATE engine_instances SET stopped_at=?, exit_code=?, ready_at=?, pids_json=?, gpu_uuids_json=?,"
                 " image_digest=COALESCE(?, image_digest), error=COALESCE(?, error),"
                 " attention_backend=COALESCE(?, attention_backend) WHERE instance_id=?",
                 (inst.stopped_at or utcnow(), inst.exit_code, inst.ready_at, json.dumps(inst.pids),
                  json.dumps(inst.gpu_uuids), inst.image_digest, error, backend, instance_id))
    if backend is not None:
        row = conn.execute("SELECT cell_id FROM engine_instances WHERE instance_id=?", (instance_id,)).fetchone()
        conn.execute("UPDATE cells SET attention_backend=? WHERE cell_id=?", (backend, row[0]))
    return backend


def _event(conn: Any, run_id: Optional[int], cell_id: str, level: str, kind: str, message: str,
           data: Any = None) -> None:
    import time

    conn.execute("INSERT INTO events(run_id, cell_id, t, level, kind, message, data_json) VALUES (?,?,?,?,?,?,?)",
                 (run_id, cell_id, time.time(), level, kind, message[:8000], json.dumps(data) if data is not None else None))


def _failed_requests_reason(conn: Any, run_id: int, n_failed: int) -> Optional[str]:
    """'N request(s) failed …' saying whether they were retried, with the last error's text."""
    row = conn.execute(
        "SELECT a.error, a.http_status, a.retryable, (SELECT COUNT(*) FROM attempts b WHERE b.run_id = a.run_id"
        " AND b.request_id = a.request_id) AS n FROM attempts a WHERE a.run_id=? AND a.ok=0"
        " ORDER BY a.rowid DESC LIMIT 1", (run_id,)).fetchone()
    if row is None:
        return None
    how = (f"after {row['n']} attempts each" if row["n"] > 1
           else "not retried: the error is not retryable" if not row["retryable"] else "after 1 attempt")
    http = f"HTTP {row['http_status']}: " if row["http_status"] else ""
    return f"{n_failed} request(s) failed ({how}); last error: {http}{(row['error'] or '')[:300]}"


# --- the cell -----------------------------------------------------------------------------------

class _Watchdog(threading.Thread):
    """Aborts the runner when the engine stops running mid-cell (crash, OOM, killed container)."""

    def __init__(self, rt: Runtime, inst: Instance, runner: Runner, interval_s: float = 0.5):
        super().__init__(name="kvt-engine-watchdog", daemon=True)
        self.rt, self.inst, self.runner, self.interval_s = rt, inst, runner, interval_s
        self.stop_ev = threading.Event()
        self.fired: Optional[str] = None

    def run(self) -> None:
        misses = 0
        while not self.stop_ev.wait(self.interval_s):
            try:
                alive = self.rt.is_running(self.inst)
            except Exception:  # a flaky check is not a dead engine
                alive = True
            misses = 0 if alive else misses + 1
            if misses >= 2:  # two in a row: one slow health probe (external runtime) is not a crash
                code = self.inst.exit_code
                self.fired = f"engine stopped mid-cell (exit code {code})" if code is not None else "engine stopped mid-cell"
                self.runner.abort(self.fired)
                return


def _get_runtime(name: str, ext_url: Optional[str]) -> Runtime:
    if name == "external" and ext_url:
        try:
            return get_runtime(name, base_url=ext_url)
        except TypeError:  # an ExternalRuntime that reads spec.base_url (host/port were set from the URL)
            return get_runtime(name)
    return get_runtime(name)


def run_cell(cfg: Config, paths: Paths, *, engine: Optional[str] = None, method: Optional[str] = None,
             compression_ratio: Optional[float] = None, budget: Optional[int] = None,
             runtime: Optional[str] = None, base_url: Optional[str] = None,
             runtime_impl: Optional[Runtime] = None, progress: bool = False, console: Any = None,
             transport: Optional[httpx.AsyncBaseTransport] = None, watchdog_interval_s: float = 0.5,
             tensor_parallel: Optional[int] = None, digest: Optional[str] = None,
             gate: Any = None, gate_key: Optional[str] = None, on_attempt: Any = None,
             telemetry_hub: Any = None) -> CellResult:
    """`runtime_impl` may be a runtime that lends an engine already running (the matrix runner's shared
    request-mode engines): run_cell only calls its `running()` when there is something to send.
    `gate` (runner.gate.ExampleGate, with this cell's `gate_key`): the cell is one of an interleaved group's
    cells running at the same time; its requests go out example-major with theirs (the caller leaves the
    gate when run_cell returns or raises).
    `on_attempt(run_id, request_id, attempt_no, started_at, began)`: told when each attempt begins and ends
    (the Ray backend's record of what was in flight when a node died).
    `telemetry_hub` (telemetry.SharedTelemetry): the interleaved cells of one engine sample through one sampler."""
    spec, rt_name, ext_url = resolve_cell_spec(cfg, engine=engine, method=method, compression_ratio=compression_ratio,
                                               budget=budget, runtime=runtime, base_url=base_url,
                                               tensor_parallel=tensor_parallel, digest=digest)
    from kv_transition.runtime.gpus import require_gpus

    spec = require_gpus(spec, tensor_parallel or 1, runtime=rt_name)  # exit 2 before anything is written
    conn = connect(paths.db, busy_timeout_s=DB_LOCK_WAIT_S)
    try:
        manifest = from_db(conn, paths.dataset_id)
        entries = manifest["entries"]
        inputs = cell_inputs(cfg, spec, paths.dataset_id)
        cell_id = cell_id_for(inputs)
        from kv_transition.db.stale import close_stale_runs

        close_stale_runs(conn)  # runs of killed harnesses end `killed`, never `running` forever
        builder = _followup_builder(cfg, paths, manifest)  # before any row: a wrong tokenizer is exit 2
        run_id, items = _prepare_rows(conn, cfg, spec, cell_id, inputs, paths.dataset_id, entries, rt_name)
        if builder is not None:
            _attach_followups(conn, cfg, spec, manifest, cell_id, items, builder)
        repeats = cfg.decoding.repeats
        n_todo = len(items)
        cell_gate = None
        if gate is not None:
            index = {e["example_id"]: i for i, e in enumerate(entries)}

            def position_of(it: Any) -> tuple[int, int]:
                return (it.repeat, index[it.example_id])

            gate.join(gate_key, [position_of(it) for it in items])
            cell_gate = gate.handle(gate_key, position_of)
            if items:
                _event(conn, run_id, cell_id, "info", "interleaved",
                       f"sent example-major with the other cells of its engine group (window {gate.window}); "
                       "this run's telemetry covers the shared engine while they ran", {"window": gate.window})
        log_path = paths.logs_dir / f"{cell_id}.log"
        if rt_name == "external" and runtime_impl is None:
            log_path = None  # someone else's server: no engine log here (nothing is printed or recorded)
        if not items:
            n_req, n_ok, n_failed = _finish(conn, cell_id, run_id, "completed", None, 0, None, repeats)
            return CellResult(cell_id, run_id, "completed", "nothing to send: every request has a response",
                              n_req, n_ok, n_failed, 0, None, spec, _existing(log_path))
        paths.logs_dir.mkdir(parents=True, exist_ok=True)
        rt = runtime_impl or _get_runtime(rt_name, ext_url)
        labels = {OWNER_LABEL: "kv-transition", GROUP_LABEL: cfg.experiment.group_id, CELL_LABEL: cell_id}
        opts = RunnerOptions(
            concurrency=cfg.engine.concurrency or spec.concurrency, timeout_s=cfg.decoding.request_timeout_s,
            stall_timeout_s=cfg.decoding.stall_timeout_s, max_retries=cfg.decoding.max_retries,
            backoff_s=cfg.decoding.retry_backoff_s, backoff_max_s=cfg.decoding.retry_backoff_max_s,
            stream=cfg.decoding.stream,
        )
        writer = DbWriter(paths.db, lock_wait_s=DB_LOCK_WAIT_S, context=(run_id, cell_id)).start()
        stats: Optional[RunStats] = None
        status, reason, run_status = "failed", None, None
        instance_id: Optional[int] = None
        inst_ref: Optional[Instance] = None
        interrupted: Optional[BaseException] = None
        engine_died = False
        try:
            with rt.running(spec, labels, log_path) as inst:
                inst_ref = inst
                instance_id = _record_instance(conn, run_id, cell_id, rt_name, spec, inst, None, _existing(log_path))
                _after_ready_events(conn, run_id, cell_id, spec, inst, items)
                runner = Runner(inst.base_url, writer, run_id, opts, transport=transport,
                                cache_bust=spec.cache_bust_request, count_tokens=_token_counter(cfg, paths),
                                bust_all=rt_name == "external", server_log=lambda: rt.log_tail(inst, 20),
                                gate=cell_gate, on_attempt=on_attempt)
                sampler = None
                if cfg.telemetry.enabled:
                    want_gpu = cfg.telemetry.nvml and spec.gpu and cfg.engine.device != "cpu"

                    def make_sampler() -> TelemetrySampler:
                        return TelemetrySampler(
                            writer, run_id, cell_id, interval_s=cfg.telemetry.interval_s, nvml=want_gpu,
                            gpu_uuids=inst.gpu_uuids, gpu_indices=spec.gpus, all_gpus_if_none=rt_name != "external",
                            pids=inst.pids,
                            metrics_url=(inst.base_url.rstrip("/") + spec.metrics_path)
                            if cfg.telemetry.engine_metrics and spec.metrics_path else None,
                            metric_names=spec.kv_usage_metrics if cfg.telemetry.engine_metrics else (),
                        )

                    # interleaved cells on one engine share one sampler (one reading, recorded per cell)
                    sampler = (telemetry_hub.attach((inst.base_url, tuple(inst.pids)), make_sampler, writer, run_id,
                                                    cell_id) if telemetry_hub is not None else make_sampler().start())
                dog = _Watchdog(rt, inst, runner, max(watchdog_interval_s, getattr(rt, "liveness_interval_s", None) or 0))
                dog.start()
                try:
                    from kv_transition.runner.progress import cell_progress

                    label = f"{spec.engine}/{spec.method}" + (f" r={spec.compression_ratio:g}" if spec.compression_ratio is not None
                                                              else f" b={spec.budget}" if spec.budget is not None else "")
                    with cell_progress(label, n_todo, enabled=progress, console=console) as tick:
                        runner.on_tick = tick
                        stats = asyncio.run(runner.run(items))
                    if not dog.fired and stats.n_failed:  # requests can fail faster than the watchdog
                        engine_died = _engine_gone(rt, inst)         # notices a dead engine
                finally:
                    dog.stop_ev.set()
                    dog.join(5)
                    if sampler is not None:
                        if telemetry_hub is not None:
                            telemetry_hub.detach(run_id)
                        else:
                            sampler.stop()
            # after teardown: the runtime has recorded the engine's exit code
            assert stats is not None
            if engine_died and not stats.aborted:
                code = inst_ref.exit_code if inst_ref is not None else None
                stats = dataclasses.replace(stats, aborted="engine stopped mid-cell" + (
                    f" (exit code {code})" if code is not None else ""))
            if stats.aborted:
                why = stats.aborted
                if (dog.fired or engine_died) and inst_ref is not None and inst_ref.exit_code is not None \
                        and "exit code" not in why:
                    why = f"{why} (exit code {inst_ref.exit_code})"
                died = dog.fired or engine_died
                tail = _log_tail_text(rt, inst_ref, log_path) if died and inst_ref is not None else ""
                status, reason = "incomplete", (f"{why}; {stats.n_ok + stats.n_failed}/{n_todo} requests finished "
                                                f"in this run{tail}")
            elif stats.n_failed:
                status, reason = "incomplete", f"{stats.n_failed} request(s) failed after retries"
            else:
                status, reason = "completed", None
        except EngineStartError as e:
            status, reason = "failed", f"engine start failed: {e}"
            if instance_id is None:
                instance_id = _record_instance(conn, run_id, cell_id, rt_name, spec, None, str(e), _existing(log_path))
                conn.execute("UPDATE engine_instances SET exit_code=?, attention_backend=? WHERE instance_id=?",
                             (e.returncode, backend_from_log(spec, log_path), instance_id))
        except (KeyboardInterrupt, SystemExit) as e:  # SIGINT / SIGTERM (runtime.signals raises these)
            interrupted = e
            status, run_status = "incomplete", "interrupted"
            reason = "interrupted (SIGINT)" if isinstance(e, KeyboardInterrupt) else f"terminated (exit {e.code})"
        except Exception as e:
            status, reason = "failed", f"{type(e).__name__}: {e}"
        finally:
            try:
                writer.close()
            except Exception as e:  # the DB write failure is the more important message
                status, reason = "failed", f"DB writer: {e}"
            if stats is not None and stats.n_failed and not stats.aborted and status == "incomplete":
                reason = _failed_requests_reason(conn, run_id, stats.n_failed) or reason
            if instance_id is not None and inst_ref is not None:
                _update_instance(conn, instance_id, inst_ref, reason if status == "failed" else None)
            if reason and status != "completed":
                try:
                    _event(conn, run_id, cell_id, "error" if status == "failed" else "warning", f"cell_{status}",
                           reason)
                except sqlite3.Error:  # an event row never decides the cell's fate (the reason is in cells/runs)
                    pass
            n_req, n_ok, n_failed = _finish(conn, cell_id, run_id, status, reason, n_todo, stats, repeats, run_status)
        if interrupted is not None:
            raise interrupted
        if status == "incomplete" and n_ok == n_req:  # e.g. the engine died after the last response
            status, reason = "completed", None
            _finish(conn, cell_id, run_id, status, reason, n_todo, stats, repeats)
        return CellResult(cell_id, run_id, status, reason, n_req, n_ok, n_failed, n_todo, stats, spec,
                          _existing(log_path))
    finally:
        conn.close()


def _existing(log_path: Any) -> Optional[str]:
    """The engine log's path when there is one on disk (an external server has none)."""
    return str(log_path) if log_path is not None and os.path.isfile(log_path) else None


def _token_counter(cfg: Config, paths: Paths) -> Any:
    """count(text) → tokens with the model's tokenizer, loaded on first use (only when a server sends no
    completion token count); None if it cannot be loaded (the count stays NULL)."""
    state: dict[str, Any] = {}

    def count(text: str) -> Optional[int]:
        if "tok" not in state:
            try:
                from kv_transition.manifest.tokens import load_tokenizer

                state["tok"] = load_tokenizer(cfg.model.tokenizer, paths.tokenizer_cache)
            except Exception:  # noqa: BLE001 - a missing tokenizer must not fail the cell
                state["tok"] = None
        return state["tok"].count(text) if state["tok"] is not None else None

    return count


def _after_ready_events(conn: Any, run_id: int, cell_id: str, spec: ResolvedSpec, inst: Instance,
                        items: list[WorkItem]) -> None:
    """Record what the runtime learned after readiness; point the bodies at the served model name."""
    served = inst.served_model or spec.served_model
    if served != spec.served_model:
        for it in items:
            it.body["model"] = served
        _event(conn, run_id, cell_id, "info", "served_model", f"the server serves {served!r}; requests name it",
               {"served_model": served, "model_id": spec.served_model})
    if inst.ready_url and not inst.ready_url.endswith(spec.health_path):
        _event(conn, run_id, cell_id, "info", "readiness_fallback", f"{spec.health_path} has no route; ready by "
               f"{inst.ready_url}", {"url": inst.ready_url})
    if spec.verify:
        if inst.verified is not None:
            _event(conn, run_id, cell_id, "info", "kv_verified", f"the engine log shows {inst.verified}", inst.verified)
        elif not spec.baseline:
            _event(conn, run_id, cell_id, "warning", "kv_unverified",
                   f"{spec.engine}/{spec.method}: not verified (the {inst.runtime} runtime has no engine log): the "
                   "cell's label is what was claimed, not what was checked")
    if not spec.cache_bust_request and any(it.attempts_before or it.repeat for it in items):
        _event(conn, run_id, cell_id, "warning", "cache_unprotected",
               f"{spec.engine} has no request knob against its prefix cache: retries and repeats are flagged "
               "cache_flag='unprotected' unless the server reports cached tokens")


def _pct(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def cell_summary(db_path: Any, res: CellResult) -> dict[str, Any]:
    """What `kvt run` prints: the cell's state plus this run's throughput and latency percentiles."""
    conn = connect(db_path, readonly=True)
    try:
        lat = conn.execute(
            "SELECT p.ttft_s, p.tpot_s, p.e2e_s, p.cache_flag, p.token_source FROM responses p"
            " JOIN requests q USING(request_id) WHERE q.cell_id = ?", (res.cell_id,)).fetchall()
        attempts = conn.execute("SELECT COUNT(*), SUM(ok = 0) FROM attempts WHERE run_id = ?", (res.run_id,)).fetchone()
        n_followups = conn.execute("SELECT COUNT(*) FROM followups f JOIN requests q USING(request_id)"
                                   " WHERE q.cell_id = ?", (res.cell_id,)).fetchone()[0]
    finally:
        conn.close()
    st = res.stats
    out: dict[str, Any] = {
        "cell_id": res.cell_id, "status": res.status, "reason": res.reason,
        "engine": res.spec.engine, "method": res.spec.method,
        "compression_ratio": res.spec.compression_ratio, "budget": res.spec.budget,
        "requests": f"{res.n_ok} ok / {res.n_failed} failed / {res.n_requests} total",
        "this run": f"{res.n_todo} to send, {st.n_ok if st else 0} ok, {st.n_failed if st else 0} failed, "
                    f"{attempts[0] or 0} attempts ({attempts[1] or 0} failed)",
        "elapsed_s": st.elapsed_s if st else None,
        "requests_per_s": (st.n_ok / st.elapsed_s) if st and st.elapsed_s > 0 else None,
        "output_tokens_per_s": (st.completion_tokens / st.elapsed_s) if st and st.elapsed_s > 0 else None,
        "run_id": res.run_id, "log": res.log_path,
    }
    if n_followups:  # two-request examples (LongBench v2 cot): the latencies below are the first request's
        out["follow-up requests"] = f"{n_followups} answered (followups; scored; latencies below: the first requests)"
    flagged = sum(1 for r in lat if r[3])
    if flagged:
        out["cache-served (left out of latency)"] = f"{flagged}/{len(lat)} responses (responses.cache_flag)"
    harness_counted = sum(1 for r in lat if r[4] in ("harness", "mixed"))
    if harness_counted:
        out["token counts"] = f"{harness_counted}/{len(lat)} counted by the harness tokenizer (server sent no usage)"
    for name, i in (("ttft_s", 0), ("tpot_s", 1), ("e2e_s", 2)):
        xs = [r[i] for r in lat if r[i] is not None and not r[3]]
        if xs:
            out[f"{name} p50"] = _pct(xs, 0.5)
            out[f"{name} p95"] = _pct(xs, 0.95)
    return out
