"""The plan refuses a method the GPU cannot run: engine.yaml `requires` against --gpu-arch, matrix.gpu_arch
or NVML's compute capability — one line, exit 2, nothing started; unknown hardware is said, not guessed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kv_transition.cli import main
from kv_transition.config import load_config
from kv_transition.errors import ConfigError
from kv_transition.matrix import expand, load_matrix
from kv_transition.matrix.hardware import gpu_arch, refuse_unrunnable
from kv_transition.matrix.inventory import Inventory


def _matrix(tmp_path: Path, sglang_methods: list[str]) -> Path:
    p = tmp_path / "hw.yaml"
    (tmp_path / "Llama-3.1-8B-Instruct").mkdir(exist_ok=True)   # a local model dir (it must exist)
    p.write_text(yaml.safe_dump({"name": "hw", "models": [{"id": "meta-llama/Llama-3.1-8B-Instruct",
                                                           "path": str(tmp_path / "Llama-3.1-8B-Instruct")}],
                                 "engines": {"sglang": {"runtime": "docker", "methods": sglang_methods},
                                             "vllm": {"runtime": "docker", "methods": ["full", "fp8"]}}}))
    return p


def _cfg(repo_root: Path, tmp_path: Path, *overrides: str):
    return load_config(str(repo_root / "config" / "default.yaml"),
                       [f"output.runs_root={tmp_path}/runs", f"output.data_root={tmp_path}/data", *overrides])


def test_gpu_arch_sources_in_order(repo_root: Path, tmp_path: Path):
    cfg = _cfg(repo_root, tmp_path, "matrix.gpu_arch=10.0")
    gpus, cpu = Inventory((0, 1), True), Inventory((0,), False)
    probe = {0: ("NVIDIA H200", (9, 0)), 1: ("NVIDIA B200", (10, 0))}
    assert gpu_arch("sm90", cfg, gpus).cc == (9, 0)                             # --gpu-arch wins
    assert gpu_arch(None, cfg, gpus).source == "matrix.gpu_arch 10.0"          # then the config
    a = gpu_arch(None, _cfg(repo_root, tmp_path), gpus, probe=lambda ids: {i: probe[i] for i in ids})
    assert a.cc == (9, 0) and a.source == "GPU 0 (NVIDIA H200)"                # the lowest GPU used
    assert gpu_arch(None, _cfg(repo_root, tmp_path), cpu) is None              # no GPU: unknown

    def no_nvml(ids):
        raise RuntimeError("NVML init failed")
    assert gpu_arch(None, _cfg(repo_root, tmp_path), gpus, probe=no_nvml) is None
    with pytest.raises(ConfigError, match="--gpu-arch: 'hopper' is not a compute capability"):
        gpu_arch("hopper", cfg, gpus)


def test_refuses_blackwell_methods_on_hopper(repo_root: Path, tmp_path: Path):
    cfg = _cfg(repo_root, tmp_path)
    exp = expand(cfg, load_matrix(_matrix(tmp_path, ["full", "fp4_mx_block16", "nvfp4", "mxfp8"])))
    # fp8 is an alias: the vLLM cell is recorded as fp8_e4m3
    assert {c.method for c in exp.cells if c.engine == "vllm"} == {"full", "fp8_e4m3"}
    with pytest.raises(ConfigError) as e:
        refuse_unrunnable(exp, gpu_arch("9.0", cfg, Inventory((0,), True)))
    msg = str(e.value)
    assert msg.startswith("matrix hw: sglang/nvfp4 needs compute capability >= 10.0, --gpu-arch 9.0 has 9.0")
    assert "and 1 more: sglang/mxfp8" in msg and "\n" not in msg
    refuse_unrunnable(exp, gpu_arch("10.0", cfg, Inventory((0,), True)))      # a B200 runs them
    refuse_unrunnable(exp, None)                                               # unknown: not refused


def test_matrix_plan_exit_2_one_line(repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    c = ["-c", str(repo_root / "config" / "default.yaml"), "-o", f"output.runs_root={tmp_path}/runs",
         "-o", f"output.data_root={tmp_path}/data"]
    bad = _matrix(tmp_path, ["full", "nvfp4"])
    assert main(["matrix", "plan", *c, "-m", str(bad), "--gpus", "0", "--gpu-arch", "9.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sglang/nvfp4 needs compute capability >= 10.0" in err[0]
    assert main(["matrix", "run", *c, "-m", str(bad), "--gpus", "0", "--gpu-arch", "9.0", "--no-live"]) == 2
    assert "sglang/nvfp4" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()                                    # nothing half-written
    ok = _matrix(tmp_path, ["full", "fp4_mx_block16"])
    assert main(["matrix", "plan", *c, "-m", str(ok), "--gpus", "0", "--gpu-arch", "9.0", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpu_arch"] == {"compute_capability": "9.0", "source": "--gpu-arch 9.0"}


def test_kvt_run_refuses_a_method_the_gpu_cannot_run(repo_root: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]):
    """One cell (`kvt run`) gets the same refusal as the matrix: exit 2, one line, no DB, no engine."""
    (tmp_path / "Llama-3.1-8B-Instruct").mkdir()
    c = ["-c", str(repo_root / "config" / "default.yaml"), "-o", f"output.runs_root={tmp_path}/runs",
         "-o", f"output.data_root={tmp_path}/data", "-o", f"model.path={tmp_path}/Llama-3.1-8B-Instruct",
         "-o", "engine.gpus=[0]", "-o", "matrix.gpu_arch=9.0"]
    assert main(["run", *c, "--engine", "sglang", "--method", "nvfp4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kvt run: sglang/nvfp4 needs compute capability >= 10.0" in err[0], err
    assert "matrix.gpu_arch 9.0" in err[0]
    assert not (tmp_path / "runs").exists()
