"""Per-runtime engine variants (a pip-installed vLLM under the process runtime) and the version check that
keeps a cell from being recorded under a tag it did not run."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest
import yaml

from kv_transition.engines.spec import load_engine, resolve
from kv_transition.errors import ConfigError
from kv_transition.runtime import EngineStartError
from kv_transition.runtime.health import verify_version
from kv_transition.runtime.process import ProcessRuntime
from tests.fakes.fake_engine import FAKE_SERVER, fake_spec, free_port, serve_in_thread

REPO = Path(__file__).resolve().parents[2]


def test_vllm_process_variant_runs_the_pip_module_and_records_the_installed_version() -> None:
    eng = load_engine("vllm")
    spec = resolve(eng, "fp8_e4m3", model_path="/m", served_model="x", runtime="process", tag="0.26.0")
    assert spec.command[:3] == ["python", "-m", "vllm.entrypoints.cli.main"] and spec.command[3] == "serve"
    assert spec.image_ref == "pypi/vllm:0.26.0" and spec.digest is None and spec.runtime == "process"
    assert spec.version_path == "/version"
    assert spec.args[spec.args.index("--kv-cache-dtype") + 1] == "fp8_e4m3"
    # the docker runtime keeps the container image and its own entrypoint
    d = resolve(eng, "fp8_e4m3", model_path="/m", served_model="x", runtime="docker", digest="sha256:" + "a" * 64)
    assert d.command == ["vllm", "serve"] and d.image_ref.startswith("vllm/vllm-openai@sha256:") and d.runtime is None
    # an engine without a variant for that runtime is unchanged by it
    k = resolve(load_engine("kvpress"), "full", model_path="/m", served_model="x", runtime="process")
    assert k.command == ["python", "-m", "kvpress_engine"] and k.runtime is None


def test_base_args_parse_on_old_and_new_vllm() -> None:
    # vLLM 0.26 has no --disable-log-requests (0.33 derives it from --enable-log-requests); logging is off by default
    spec = resolve(load_engine("vllm"), "full", model_path="/m", served_model="x")
    assert not any(a.startswith("--disable-log-requests") for a in spec.args)


def test_engine_tag_from_config_and_matrix_enters_the_cell_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kv_transition.cell import cell_id_for, cell_inputs, resolve_cell_spec
    from kv_transition.config.loader import load_config
    from kv_transition.matrix.expand import expand
    from kv_transition.matrix.schema import load_matrix

    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "config/experiments/device_vllm.yaml", overrides=["model.path=null"])
    a, rt, _ = resolve_cell_spec(cfg, engine="vllm", method="full", runtime="process")
    cfg2 = load_config(REPO / "config/experiments/device_vllm.yaml", overrides=["model.path=null", "engine.tag=0.26.0"])
    b, _, _ = resolve_cell_spec(cfg2, engine="vllm", method="full", runtime="process")
    assert a.tag == "v0.33.0" and b.tag == "0.26.0" and b.image_ref == "pypi/vllm:0.26.0"
    assert cell_id_for(cell_inputs(cfg, a, "d")) != cell_id_for(cell_inputs(cfg2, b, "d"))
    x = expand(cfg, load_matrix(REPO / "config/matrix/device_vllm.yaml"))
    vllm = [c for c in x.cells if c.engine == "vllm"]
    assert vllm and all(c.spec.image_ref == "pypi/vllm:0.26.0" and c.spec.env.get("PYTHONPATH") for c in vllm)
    assert {c.method for c in vllm} >= {"full", "fp8_e4m3", "int8_per_token_head"}


def test_verify_version_accepts_a_match_and_refuses_a_mismatch() -> None:
    url, srv, _ = serve_in_thread(["--version", "0.26.0"])
    try:
        port = int(url.rsplit(":", 1)[1])
        ok = fake_spec(port=port, tag="v0.26.0", version_path="/version")
        assert verify_version(ok) == "0.26.0"  # a leading v in the tag is the same version
        assert verify_version(fake_spec(port=port, tag="0.26.0", version_path=None)) is None
        with pytest.raises(EngineStartError, match=r"reports version '0.26.0' but the cell says '0.33.0'"):
            verify_version(fake_spec(port=port, tag="0.33.0", version_path="/version"))
        with pytest.raises(EngineStartError, match="could not read the engine version"):
            verify_version(fake_spec(port=port, tag="0.26.0", version_path="/nope"))
    finally:
        srv.shutdown()


def test_a_version_mismatch_stops_the_engine_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through load_engine → resolve → ProcessRuntime.running: the engine answers health, reports another version,
    the start fails with that reason and the process is gone (nothing left running)."""
    root = tmp_path / "engines"
    (root / "pipfake").mkdir(parents=True)
    (root / "pipfake" / "engine.yaml").write_text(yaml.safe_dump({
        "name": "pipfake", "image": "example/pipfake", "tag": "v1.0", "gpu": False,
        "command": ["should-not-run"], "args": ["--host", "{host}", "--port", "{port}", "--version", "1.0"],
        "health": {"path": "/health", "readiness_timeout_s": 20, "interval_s": 0.1},
        "version": {"path": "/version"},
        "runtimes": {"process": {"image": "pypi/pipfake", "command": ["python", "-u", str(FAKE_SERVER)]}},
        "methods": {"full": {"baseline": True}},
    }))
    monkeypatch.setenv("KVT_ENGINES_DIR", str(root))
    eng = load_engine("pipfake")
    rt = ProcessRuntime(registry_dir=tmp_path / "reg", stop_timeout_s=5)
    good = resolve(eng, "full", model_path="/m", served_model="x", port=free_port(), runtime="process")
    with rt.running(good, {"group": "g", "cell": "ok"}, tmp_path / "ok.log") as inst:
        assert inst.spec.image_ref == "pypi/pipfake:v1.0"
    bad = resolve(eng, "full", model_path="/m", served_model="x", port=free_port(), runtime="process", tag="2.0")
    with pytest.raises(EngineStartError, match=r"reports version '1.0' but the cell says '2.0'"):
        with rt.running(bad, {"group": "g", "cell": "bad"}, tmp_path / "bad.log"):
            pytest.fail("a mismatched engine must not be lent to the cell")
    assert (tmp_path / "bad.log").is_file()  # it did start (and answered health) before the check refused it
    left = [p for p in psutil.process_iter(["cmdline", "status"])
            if str(FAKE_SERVER) in (p.info["cmdline"] or []) and str(bad.port) in (p.info["cmdline"] or [])
            and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert not left and not list((tmp_path / "reg").glob("*.json"))


def test_unknown_runtime_variant_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "engines"
    (root / "x").mkdir(parents=True)
    (root / "x" / "engine.yaml").write_text(yaml.safe_dump({
        "name": "x", "image": "i", "tag": "t", "runtimes": {"podman": {"command": ["y"]}},
        "methods": {"full": {}}}))
    monkeypatch.setenv("KVT_ENGINES_DIR", str(root))
    with pytest.raises(ConfigError, match=r"engine.yaml: runtimes.podman"):
        load_engine("x")


def test_stage_slims_the_vllm_wheel(tmp_path: Path) -> None:
    import zipfile

    sys.path.insert(0, str(REPO / "bench" / "device_vllm"))
    try:
        import stage
    finally:
        sys.path.pop(0)
    whl = tmp_path / "in" / "vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    whl.parent.mkdir()
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ("vllm/__init__.py", "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
                     "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so", "vllm/vllm-rs",
                     "vllm/third_party/deep_gemm/_C.cpython-311-x86_64-linux-gnu.so",
                     "vllm/third_party/deep_gemm/_C.cpython-312-x86_64-linux-gnu.so"):
            z.writestr(name, b"x" * 100)
    (tmp_path / "out").mkdir()
    out = stage.slim_vllm(whl, tmp_path / "out")
    assert out.name == whl.name
    assert sorted(zipfile.ZipFile(out).namelist()) == [
        "vllm/__init__.py", "vllm/third_party/deep_gemm/_C.cpython-312-x86_64-linux-gnu.so",
        "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so"]
    pins = stage.pins(REPO / "bench/device_vllm/vllm-0.26.0-cp312.txt")
    assert "torch" not in {p.split("==")[0] for p in pins} and all("==" in p for p in pins)
