"""`kvt run` against an already-running TEST DOUBLE (runtime external): exit codes and summary."""

from __future__ import annotations

import json

import yaml

from kv_transition.cli import main


def _cfg(tmp_path, cell_env, **sections) -> str:
    cfg, paths = cell_env(4, **sections)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(p)


def test_kvt_run_external_ok_then_incomplete_exit_codes(tmp_path, cell_env, fake_server, capsys) -> None:
    url, _ = fake_server()
    cfg = _cfg(tmp_path, cell_env)
    assert main(["run", "-c", cfg, "--engine", "fake", "--runtime", "external", "--base-url", url, "-q", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "completed" and out["requests"].startswith("4 ok") and out["ttft_s p50"] is not None

    bad, _ = fake_server("--fail-first", "100", "--fail-status", "400")
    assert main(["run", "-c", cfg, "--engine", "fake", "--method", "snapkv", "--ratio", "0.5", "--runtime", "external",
                 "--base-url", bad, "-q", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "incomplete" and out["cell_id"].startswith("fake.snapkv.r0.5-")


def test_kvt_run_bad_input_exit_2(tmp_path, cell_env, capsys) -> None:
    cfg = _cfg(tmp_path, cell_env)
    assert main(["run", "-c", cfg, "--method", "nope", "-q"]) == 2
    assert "no method 'nope'" in capsys.readouterr().err
    assert main(["run", "-c", cfg, "--budget", "5", "--ratio", "0.5"]) == 2
    assert main(["run", "-c", cfg, "--method", "full", "--ratio", "0.5", "-q"]) == 2  # full takes no ratio
    assert main(["run", "-c", cfg, "--runtime", "external", "-q"]) == 2  # no URL
