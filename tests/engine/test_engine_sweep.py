"""bench/engine_sweep.py end to end on the tiny model (CPU): the three modes (kvpress's pipeline, the engine
in-process as mode b, the engine over HTTP), one JSON line per measurement, a rerun skips what is there, and
the summary table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO, engine_env

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_sweep_tiny_cpu(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "bench" / "engine_sweep.py"), "run", "--out", str(out), "--shape", "real",
           "--device", "cpu", "--prompts", "2", "--len", "96", "--max-tokens", "3", "--presses", "full,pyramidkv",
           "--ratios", "0.5", "--engine-src", str(REPO / "engines" / "kvpress"), "--threads", "1"]
    r = subprocess.run(cmd, env=engine_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    res = [x for x in recs if x["kind"] == "result"]
    assert sorted((x["mode"], x["press"]) for x in res) == [(m, p) for m in "abc" for p in ("full", "pyramidkv")]
    for x in res:
        assert x["complete"] and x["prompts_done"] == 2 and x["tokens"] == 6 and x["tok_s"] > 0
    c = {x["press"]: x for x in res if x["mode"] == "c"}
    assert c["pyramidkv"]["batched"] and c["pyramidkv"]["decode_steps"] >= 2
    assert any(x["kind"] == "meta" and x.get("weights_read_bytes") for x in recs)
    assert "| pyramidkv | 0.5 | 96 | " in r.stdout
    # a rerun finds everything done: no new measurement
    r2 = subprocess.run(cmd[:-2] + ["--modes", "a,c"], env=engine_env(), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert len((out / "results.jsonl").read_text().splitlines()) == len(recs)
    s = subprocess.run([sys.executable, str(REPO / "bench" / "engine_sweep.py"), "summarize", "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert s.returncode == 0
    table = [x for x in s.stdout.splitlines() if x.startswith("| ")]
    assert len(table) == 3 and table[1].startswith("| full | 0.0 | 96 | ")  # header and two rows (the rule: |---)


def test_sweep_mode_d_fanout_prefills_each_prompt_once(tmp_path):
    """Mode d sends every (press, ratio) of a prompt at once: the engine reports ONE prefill for the prompt."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "bench" / "engine_sweep.py"), "run", "--out", str(out), "--shape", "real",
           "--device", "cpu", "--prompts", "1", "--len", "96", "--max-tokens", "3", "--presses", "full,snapkv,knorm",
           "--ratios", "0.5", "--modes", "d", "--threads", "1"]
    r = subprocess.run(cmd, env=engine_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    fan = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    fan = [x for x in fan if x["kind"] == "fanout"]
    assert len(fan) == 1 and fan[0]["groups"] == 3 and fan[0]["tokens"] == 9
    assert fan[0]["prefills"] == 1.0 and fan[0]["shared"] == 3, fan[0]
    assert "| prompt 0 | 96 | 3 | 1.00 |" in r.stdout


def test_sigterm_stops_the_engine_the_sweep_started(tmp_path):
    """`timeout` (as device calls use it) stops the sweep with SIGTERM while its engine serves: the engine, in its
    own session, must go too (an H200 call once found the last call's engine holding 137 GiB)."""
    import os
    import signal
    import time

    out = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "bench" / "engine_sweep.py"), "run", "--out", str(out), "--shape", "real",
           "--device", "cpu", "--prompts", "2", "--len", "96", "--max-tokens", "64", "--presses", "full,snapkv,knorm",
           "--ratios", "0.25,0.5,0.75", "--modes", "c", "--threads", "1"]
    p = subprocess.Popen(cmd, env=engine_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "engine_c.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (log.exists() and "ready:" in log.read_text(errors="replace")):
        assert p.poll() is None, p.stdout.read()[-2000:]
        time.sleep(0.5)
    assert log.exists() and "ready:" in log.read_text(errors="replace"), "the engine never became ready"
    pid = int(log.read_text().split("Started server process [")[1].split("]")[0])
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) != 0
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"engine {pid} still running after the sweep got SIGTERM")
