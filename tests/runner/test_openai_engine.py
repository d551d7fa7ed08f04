"""Any OpenAI-compatible server as an engine (issue 11), against the TEST DOUBLE server: URL normalisation,
readiness fallback, served model discovery, config timeouts, TCP liveness, cached-token parsing, cache
busting of retries/repeats and the cache flag, harness-side token counts, KV verification from a log."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.fakes.fake_engine import free_port, serve_in_thread
from .conftest import body, seed_requests

from kv_transition.cli import main
from kv_transition.db import connect, rows, utcnow
from kv_transition.errors import ConfigError
from kv_transition.runner import DbWriter, Runner, RunnerOptions, StreamAccumulator, WorkItem
from kv_transition.runner.stream import AttemptError, cached_tokens_of, parse_completion_body
from kv_transition.runtime.base import EngineStartError, Instance, Runtime, verify_from_log
from kv_transition.runtime.external import ExternalRuntime, normalize_base_url
from kv_transition.runtime.health import wait_healthy

FAST = dict(backoff_s=0.01, backoff_max_s=0.05)


@pytest.fixture
def fake():
    started = []

    def start(*knobs: str) -> tuple[str, object]:
        url, srv, t = serve_in_thread(list(knobs))
        started.append((srv, t))
        return url, srv

    yield start
    for srv, t in started:
        srv.shutdown()
        srv.server_close()
        t.join(5)


# ---- (1) the generic engine ------------------------------------------------------------------------

@pytest.mark.parametrize("given, want", [
    ("http://127.0.0.1:8090", "http://127.0.0.1:8090"),
    ("http://127.0.0.1:8090/", "http://127.0.0.1:8090"),
    ("http://127.0.0.1:8090/v1", "http://127.0.0.1:8090"),
    ("http://127.0.0.1:8090/v1/", "http://127.0.0.1:8090"),
    (" https://gpu-7.lab:443/proxy/llm/v1 ", "https://gpu-7.lab:443/proxy/llm"),
    ("http://127.0.0.1:8090/v10", "http://127.0.0.1:8090/v10"),  # only a whole /v1 segment is dropped
])
def test_base_url_is_normalised_with_or_without_v1(given: str, want: str) -> None:
    assert normalize_base_url(given) == want


@pytest.mark.parametrize("bad", ["127.0.0.1:8090", "ftp://h/v1", "http://h:1/v1?x=1", "http:///v1"])
def test_bad_base_url_is_one_clear_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="engine.base_url"):
        normalize_base_url(bad)


def test_readiness_falls_back_to_models_when_health_has_no_route(fake) -> None:
    url, _ = fake("--no-health")
    used: list[str] = []
    wait_healthy(url + "/health", timeout_s=5, interval_s=0.05, fallback_urls=[url + "/v1/models"], used=used)
    assert used == [url + "/v1/models"]
    with pytest.raises(EngineStartError, match="HTTP 404"):  # no fallback: the 404 is the reason given
        wait_healthy(url + "/health", timeout_s=0.3, interval_s=0.05)


def _cfg_file(tmp_path: Path, cell_env, n: int = 4, **sections) -> str:
    cfg, _ = cell_env(n, **sections)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(p)


def test_kvt_run_external_without_engine_file_is_the_openai_engine(tmp_path, cell_env, fake, capsys) -> None:
    """Like llama-cpp-python's server: no /health, its own model id. `--base-url …/v1` works, the cell is
    openai.full, requests name the server's model, no log path is printed for a log that does not exist."""
    url, srv = fake("--no-health", "--model", "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = _cfg_file(tmp_path, cell_env)
    assert main(["run", "-c", cfg, "--runtime", "external", "--base-url", url + "/v1", "-q", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "completed" and out["cell_id"].startswith("openai.full-")
    assert (out["engine"], out["method"], out["log"]) == ("openai", "full", None)
    conn = connect(tmp_path / "runs" / "rt" / "kv_transition.sqlite")
    kinds = {r["kind"]: json.loads(r["data_json"] or "null") for r in rows(conn, "SELECT * FROM events")}
    assert kinds["served_model"]["served_model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert kinds["readiness_fallback"]["url"] == url + "/v1/models"
    inst = rows(conn, "SELECT runtime, log_path, base_url FROM engine_instances")
    assert inst == [{"runtime": "external", "log_path": None, "base_url": url}]
    # a --method the generic engine does not declare is refused with the way out
    assert main(["run", "-c", cfg, "--runtime", "external", "--base-url", url, "--method", "q8_0", "-q"]) == 2
    assert "engine 'openai' has no method 'q8_0'" in capsys.readouterr().err


def test_external_readiness_timeout_comes_from_the_config(tmp_path, cell_env, capsys) -> None:
    cfg = _cfg_file(tmp_path, cell_env)
    t0 = time.monotonic()
    rc = main(["run", "-c", cfg, "-o", "engine.readiness_timeout_s=0.5", "--runtime", "external",
               "--base-url", f"http://127.0.0.1:{free_port()}", "-q", "--json"])
    assert rc == 1 and time.monotonic() - t0 < 10  # not the 30 s default, nor the engine's 900 s
    out = json.loads(capsys.readouterr().out)
    assert "not healthy after 0.5s" in out["reason"]


def test_external_liveness_sends_no_http_request() -> None:
    """The watchdog's check must not reach the HTTP layer (llama-cpp-python aborts a stream on any new
    request): a TCP connect only — the listener receives zero bytes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    got: list[bytes] = []

    def accept() -> None:
        srv.settimeout(5)
        try:
            c, _ = srv.accept()
            c.settimeout(0.5)
            try:
                got.append(c.recv(100))
            except OSError:
                got.append(b"")
            c.close()
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    port = srv.getsockname()[1]
    rt = ExternalRuntime(base_url=f"http://127.0.0.1:{port}/v1")
    inst = Instance(runtime="external", base_url=rt.base_url, spec=None)  # type: ignore[arg-type]
    assert rt.is_running(inst) is True
    th.join(5)
    srv.close()
    assert got == [b""]
    assert rt.liveness_interval_s >= 5
    assert rt.is_running(inst) is False  # nothing listens any more


# ---- (2) a broken stream is an attempt, with what the server sent ------------------------------------

def test_done_without_finish_reason_is_an_interrupted_attempt_with_the_partial_text() -> None:
    acc = StreamAccumulator(0.0)
    acc.feed(json.dumps({"choices": [{"text": "The answer", "finish_reason": None}]}), 0.1)
    acc.feed("[DONE]", 0.2)  # llama-cpp-python, interrupt_requests=True, another request arrived
    with pytest.raises(AttemptError) as ei:
        acc.finish()
    assert ei.value.kind == "interrupted" and ei.value.retryable and "The answer" in ei.value.body


# ---- (3) cached tokens, cache busting, the cache flag ------------------------------------------------

@pytest.mark.parametrize("obj, want", [
    ({"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 8}}},
     (8, "usage.prompt_tokens_details.cached_tokens")),                      # vLLM, SGLang, llama-server
    ({"timings": {"cache_n": 1021, "prompt_n": 3}}, (1021, "timings.cache_n")),  # llama-server
    ({"tokens_cached": 5, "content": "x"}, (5, "tokens_cached")),              # llama-server /completion
    ({"meta_info": {"cached_tokens": 4}}, (4, "meta_info.cached_tokens")),     # SGLang /generate
    ({"usage": {"prompt_tokens": 9, "prompt_tokens_details": None}}, (None, None)),
    ({"usage": {"prompt_tokens": 9}}, (None, None)),                           # llama-cpp-python
])
def test_cached_token_counts_of_each_engine_dialect(obj: dict, want: tuple) -> None:
    assert cached_tokens_of(obj) == want


def test_cached_tokens_reach_the_completion_streamed_and_not() -> None:
    acc = StreamAccumulator(0.0)
    acc.feed(json.dumps({"choices": [{"text": "a", "finish_reason": "stop"}]}), 0.1)
    acc.feed(json.dumps({"choices": [], "timings": {"cache_n": 7, "prompt_n": 0}}), 0.2)
    acc.feed("[DONE]", 0.3)
    r = acc.finish()
    assert (r.cached_tokens, r.cached_source) == (7, "timings.cache_n")
    r = parse_completion_body(json.dumps({"choices": [{"text": "a"}], "usage": {
        "prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}}), 0.0, 1.0)
    assert r.cached_tokens == 2


def _repeat_run(db: Path, url: str, *, bust: dict | None, count=None, prompt_tokens=None):
    """One prompt sent as repeat 0 and repeat 1 (one worker, in order)."""
    run_id, ids = seed_requests(db, 1)
    conn = connect(db)
    now = utcnow()
    rid1 = conn.execute("INSERT INTO requests(cell_id, dataset_id, example_id, repeat, status, created_at, updated_at)"
                        " VALUES ('c1','ds','ex0',1,'pending',?,?)", (now, now)).lastrowid
    conn.close()
    items = [WorkItem(ids[0], "ex0", 0, body(0), prompt_tokens=prompt_tokens),
             WorkItem(rid1, "ex0", 1, body(0), prompt_tokens=prompt_tokens)]
    with DbWriter(db) as w:
        asyncio.run(Runner(url, w, run_id, RunnerOptions(concurrency=1, timeout_s=10, **FAST),
                           cache_bust=bust, count_tokens=count).run(items))
    conn = connect(db)
    out = rows(conn, "SELECT q.repeat, p.* FROM responses p JOIN requests q USING(request_id) ORDER BY q.repeat")
    conn.close()
    return out


def test_a_repeat_with_the_engine_knob_is_not_served_from_the_cache(tmp_path: Path, fake) -> None:
    url, srv = fake("--prefix-cache")
    r0, r1 = _repeat_run(tmp_path / "a.sqlite", url, bust={"cache_prompt": False})
    assert (r0["cache_bust"], r0["cached_tokens"], r0["cache_flag"]) == (None, 0, None)
    assert json.loads(r1["cache_bust"]) == {"cache_prompt": False}
    assert (r1["cached_tokens"], r1["cached_source"], r1["cache_flag"]) == (0, "timings.cache_n", None)


def test_a_repeat_without_a_knob_is_flagged_cached_or_unprotected(tmp_path: Path, fake) -> None:
    url, _ = fake("--prefix-cache", "--ttft", "0.2")
    r0, r1 = _repeat_run(tmp_path / "b.sqlite", url, bust=None)
    assert r0["cache_flag"] is None and r0["ttft_s"] >= 0.2
    assert r1["cached_tokens"] == r1["prompt_tokens"] and r1["cache_flag"] == "cached" and r1["ttft_s"] < 0.2
    url2, _ = fake()  # reports no cached tokens at all (llama-cpp-python): nothing can clear the repeat
    r0, r1 = _repeat_run(tmp_path / "c.sqlite", url2, bust=None)
    assert (r0["cache_flag"], r1["cache_flag"]) == (None, "unprotected")


def test_a_salt_knob_gets_a_value_unique_to_each_resend(tmp_path: Path, fake) -> None:
    url, srv = fake()
    _repeat_run(tmp_path / "d.sqlite", url, bust={"cache_salt": "{nonce}"})
    conn = connect(tmp_path / "d.sqlite")
    (b,) = [json.loads(r["cache_bust"]) for r in rows(conn, "SELECT cache_bust FROM responses") if r["cache_bust"]]
    conn.close()
    assert b == {"cache_salt": "{nonce}"}  # recorded as declared; the value sent is per attempt
    assert srv.RequestHandlerClass.state.requests == 2


def test_analysis_leaves_cache_served_latencies_out(tmp_path: Path, cell_env) -> None:
    from kv_transition.analysis.compute import _resource_stats

    cfg, paths = cell_env(4)
    conn = connect(paths.db)
    now = utcnow()
    conn.execute("INSERT INTO cells(cell_id, group_id, dataset_id, engine, method, kv_scope, model_id, repeats,"
                 " inputs_json, config_json, config_hash, spec_json, status, created_at, updated_at)"
                 " VALUES ('c','rt',?,'fake','full','query_aware','m',1,'{}','{}','h','{}','completed',?,?)",
                 (paths.dataset_id, now, now))
    run_id = conn.execute("INSERT INTO runs(cell_id, runtime, config_hash, host, pid, harness_version, status,"
                          " started_at) VALUES ('c','t','h','h',1,'0','completed',?)", (now,)).lastrowid
    for i, (ttft, flag) in enumerate([(1.0, None), (1.2, None), (0.001, "cached"), (0.002, "unprotected")]):
        rid = conn.execute("INSERT INTO requests(cell_id, dataset_id, example_id, repeat, status, created_at,"
                           " updated_at) VALUES ('c',?,?,0,'ok',?,?)", (paths.dataset_id, f"ex00{i}", now, now)).lastrowid
        conn.execute("INSERT INTO responses(request_id, attempt_no, run_id, text, prompt_tokens, completion_tokens,"
                     " ttft_s, tpot_s, e2e_s, itl_json, n_chunks, streamed, created_at, cache_flag)"
                     " VALUES (?,1,?,'a',100,4,?,0.01,2.0,'[]',4,1,?,?)", (rid, run_id, ttft, now, flag))
    conn.commit()
    stats = _resource_stats(conn, "c")
    conn.close()
    ttfts = sorted(v["ttft_p50"] for v in stats.values() if v["ttft_p50"] is not None)
    assert ttfts and min(ttfts) >= 1.0  # the 1 ms and 2 ms cache-served TTFTs are not in any bin's p50


# ---- (4) token counts always ------------------------------------------------------------------------

def count_words_test_double(text: str) -> int:
    """TEST DOUBLE for the model tokenizer: whitespace words (the fake's own token unit)."""
    return len(text.split())


def test_no_usage_from_the_server_means_harness_side_counts(tmp_path: Path, fake) -> None:
    url, _ = fake("--no-usage")
    r0, _ = _repeat_run(tmp_path / "e.sqlite", url, bust=None, count=count_words_test_double, prompt_tokens=42)
    assert (r0["prompt_tokens"], r0["completion_tokens"], r0["token_source"]) == (42, 5, "harness")
    assert r0["total_tokens"] == 47 and r0["tpot_s"] is not None
    url2, _ = fake()  # usage sent (include_usage honoured): the server's counts
    r0, _ = _repeat_run(tmp_path / "f.sqlite", url2, bust=None, count=count_words_test_double, prompt_tokens=42)
    assert (r0["prompt_tokens"], r0["token_source"]) == (3, "server")


def test_streaming_requests_ask_for_usage(cell_env) -> None:
    from kv_transition.cell import request_body, resolve_cell_spec

    cfg, _ = cell_env(1)
    spec, _, _ = resolve_cell_spec(cfg, runtime="external", base_url="http://127.0.0.1:1")
    b = request_body({"prompt": "p", "max_new_tokens": 3, "add_special_tokens": False}, spec, cfg)
    assert b["stream"] is True and b["stream_options"] == {"include_usage": True}


# ---- (5) the KV method checked against the engine's own log ------------------------------------------

class LogFileRuntimeTestDouble(Runtime):
    """TEST DOUBLE: a runtime whose only behaviour is an engine log file."""

    name = "process"

    def start(self, spec, labels, log_path):  # pragma: no cover - not used
        raise NotImplementedError

    def wait_ready(self, inst, timeout_s=None):  # pragma: no cover
        pass

    def is_running(self, inst):  # pragma: no cover
        return True

    def stop(self, inst, timeout_s=20.0):  # pragma: no cover
        pass


KV_LINE = ("llama_kv_cache:        CPU KV buffer size =    30.00 MiB\n"
           "llama_kv_cache: size =   30.00 MiB (  8192 cells,  30 layers,  1/1 seqs), K ({k}):   15.00 MiB, "
           "V ({v}):   15.00 MiB\n")


@pytest.mark.parametrize("k, v, ok", [("q8_0", "q8_0", True), ("f16", "f16", False), ("q8_0", "f16", False)])
def test_kv_method_verified_from_the_log_or_refused(tmp_path: Path, k: str, v: str, ok: bool) -> None:
    from kv_transition.engines.spec import load_engine, resolve

    spec = resolve(load_engine("llamacpp"), "q8_0", model_path="m.gguf", served_model="m", runtime="process",
                   params={"model_file": "m.gguf"})
    log = tmp_path / "e.log"
    log.write_text("loading…\n" + KV_LINE.format(k=k, v=v))
    inst = Instance(runtime="process", base_url="http://127.0.0.1:1", spec=spec, log_path=log)
    if ok:
        assert verify_from_log(LogFileRuntimeTestDouble(), inst) == {"k": "q8_0", "v": "q8_0"}
    else:
        with pytest.raises(EngineStartError, match=r"llamacpp/q8_0: refused: .*the cell needs 'q8_0'"):
            verify_from_log(LogFileRuntimeTestDouble(), inst)


def test_no_kv_line_in_the_log_is_a_refusal_too(tmp_path: Path) -> None:
    from kv_transition.engines.spec import load_engine, resolve

    spec = resolve(load_engine("llamacpp"), "q4_0", model_path="m", served_model="m", runtime="process",
                   params={"model_file": "m.gguf"})
    spec = __import__("dataclasses").replace(spec, verify={**spec.verify, "timeout_s": 0.3})
    log = tmp_path / "e.log"
    log.write_text("llama_model_loader: loaded meta data\n")
    with pytest.raises(EngineStartError, match="cannot verify the KV method"):
        verify_from_log(LogFileRuntimeTestDouble(), Instance(runtime="process", base_url="", spec=spec, log_path=log))


def test_external_server_gets_the_knob_on_every_request(tmp_path, cell_env, fake, capsys) -> None:
    """A server someone else runs may hold the prompts of an earlier cell: with the external runtime the
    knob goes into first sends too. Second cell, same prompts: no cache hit, nothing flagged."""
    from .conftest import FAKE_ENGINE_YAML

    url, _ = fake("--prefix-cache")
    cfg = _cfg_file(tmp_path, cell_env, 3)
    d = tmp_path / "engines" / "fakebust"
    d.mkdir()
    (d / "engine.yaml").write_text(FAKE_ENGINE_YAML.replace("name: fake", "name: fakebust")
                                   + "prefix_cache: {bust_request: {cache_prompt: false}}\n")
    for knob in (["--method", "full"], ["--method", "snapkv", "--ratio", "0.5"]):
        assert main(["run", "-c", cfg, "--engine", "fakebust", *knob, "--runtime", "external",
                     "--base-url", url, "-q", "--json"]) == 0
    capsys.readouterr()
    conn = connect(tmp_path / "runs" / "rt" / "kv_transition.sqlite")
    resp = rows(conn, "SELECT cache_bust, cached_tokens, cache_flag FROM responses")
    conn.close()
    assert len(resp) == 6 and all(json.loads(r["cache_bust"]) == {"cache_prompt": False} for r in resp)
    assert all(r["cached_tokens"] == 0 and r["cache_flag"] is None for r in resp)
