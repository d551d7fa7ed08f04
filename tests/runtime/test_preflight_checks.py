"""The preflight's individual checks on stated inputs (no Docker, no GPU): the argcheck verdict per the
contract, GPU visibility and free memory, mounts, ports, disk."""

from __future__ import annotations

import socket
from pathlib import Path

from kv_transition.engines.spec import Mount
from kv_transition.preflight import PreflightReport, Target, _verdict, check_disk, check_gpus, check_mounts, check_port
from kv_transition.runtime.gpus import GpuInfo
from tests.fakes.fake_engine import fake_spec

GIB = 2 ** 30


def test_argcheck_verdict_follows_the_contract() -> None:
    assert _verdict(0, 'loading\n{"attention_backend": "FLASH_ATTN"}\n', "") == (
        "ok", "accepted by the engine's parser attention_backend=FLASH_ATTN")
    assert _verdict(2, "", "usage: vllm serve …\nvllm serve: error: argument --kv-cache-dtype: invalid choice: 'fp9'\n") == (
        "fail", "vllm serve: error: argument --kv-cache-dtype: invalid choice: 'fp9'")
    st, why = _verdict(1, "", "Traceback …\nModuleNotFoundError: No module named 'vllm'\n")
    assert st == "fail" and why.startswith("the argcheck itself broke (exit 1): ModuleNotFoundError")


def _t(gpus, **kw) -> Target:
    return Target("g", fake_spec("docker", gpu=True, gpus=gpus, **kw), "docker", ["cell-a"])


def test_gpus_visible_with_enough_free_memory() -> None:
    inv = lambda: [GpuInfo(0, "GPU-0", "H200", 140 * GIB, 130 * GIB), GpuInfo(1, "GPU-1", "H200", 140 * GIB, 20 * GIB)]  # noqa: E731
    ok, low = check_gpus([_t([0]), _t([1])], 0.5, inv)
    assert ok.status == "ok" and "130.0 of 140.0 GiB free" in ok.detail and ok.cells == ["cell-a"]
    assert low.status == "fail" and "need ≥ 50%" in low.detail
    (gone,) = check_gpus([_t([5])], 0.5, inv)
    assert gone.status == "fail" and "not visible (NVML sees indices [0, 1])" in gone.detail

    def no_nvml():
        raise RuntimeError("NVML Shared Library Not Found")

    (fail,) = check_gpus([_t([0])], 0.5, no_nvml)
    assert fail.status == "fail" and "NVML is unavailable" in fail.detail
    (skip,) = check_gpus([Target("c", fake_spec("process"), "process", ["c"])], 0.5, no_nvml)
    assert skip.status == "skip" and "no GPU engine involved" in skip.detail and "Not Found" in skip.detail


def test_mounts_ports_disk(tmp_path: Path) -> None:
    model = tmp_path / "M"
    model.mkdir()
    (model / "config.json").write_text("{}")
    spec = fake_spec("docker", mounts=[Mount(str(model), "/models/M", True, "model"),
                                       Mount(str(tmp_path / "gone"), "/x", True, "extra"),
                                       Mount(str(tmp_path / "cache" / "hf"), "/root/.cache/huggingface", False, "hf_cache")])
    a, b, c = check_mounts(Target("g", spec, "docker", ["cell"]))
    assert (a.status, b.status, c.status) == ("ok", "fail", "ok")
    assert "1 entry" in a.detail and "does not exist" in b.detail and "will be created" in c.detail
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        busy = Target("g", fake_spec("process", port=port), "process", ["cell"])
        assert check_port(busy).status == "fail"
        busy.port_fallback = True
        assert check_port(busy).status == "warn"
    assert check_disk(tmp_path / "runs" / "logs", 0.001).status == "ok"
    d = check_disk(tmp_path / "runs" / "logs", 10 ** 9)
    assert d.status == "fail" and "need ≥ 1e+09 GiB" in d.detail
    rep = PreflightReport([a, b, c, d])
    assert not rep.ok and str(rep.error()).startswith(f"preflight: mounts {tmp_path / 'gone'} → /x (cell cell): ")
