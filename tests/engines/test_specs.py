"""The engine specs in engines/*/engine.yaml: they load, every method resolves, the served model name
reaches the server (a mismatch makes every request a 404), and the dry run is an exact docker run."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from kv_transition.engines.spec import list_engines, load_engine, resolve
from kv_transition.errors import ConfigError


def test_the_engines_are_there():
    assert {"vllm", "sglang", "kvpress", "llamacpp", "openai"} <= set(list_engines())


@pytest.mark.parametrize("name", ["vllm", "sglang", "kvpress"])
def test_every_method_resolves_and_names_the_served_model(name: str):
    eng = load_engine(name)
    assert sum(m.baseline for m in eng.methods.values()) == 1 and eng.methods["full"].baseline
    for method, m in eng.methods.items():
        knob = {"compression_ratio": 0.5} if "compression_ratio" in m.supports else {}
        # wrappers (kvpress adakv, chunk, composed, ...) need their nested presses in kv.params
        nested = {"inner": {"method": "snapkv"}, "presses": [{"method": "knorm"}], "prefill": {"method": "knorm"},
                  "decoding": {"method": "decoding", "inner": {"method": "knorm"}}}
        params = {k: nested[k] for k in str(m.properties.get("takes") or "").split("+") if k}
        spec = resolve(eng, method, model_path="/models/x", served_model="my-model", port=8123,
                       gpus=[0, 1], host_env={"HF_TOKEN": "hf_secret"}, request_params=params or None, **knob)
        argv = spec.command + spec.args
        assert "my-model" in argv and argv[argv.index("my-model") - 1] == "--served-model-name"
        assert "8123" in argv and "/models/x" in argv
        run = spec.docker_run()
        assert "hf_secret" not in run and "HF_TOKEN=***" in run
        assert spec.image_ref in shlex.split(run)
        if eng.method_mode == "request":
            assert spec.request_extras["kv_press"]["method"] == method
            if knob:
                assert spec.request_extras["kv_press"]["compression_ratio"] == 0.5


def test_server_mode_kv_dtypes_are_server_args():
    spec = resolve(load_engine("vllm"), "fp8_e4m3", model_path="m", served_model="m")
    assert spec.args[-2:] == ["--kv-cache-dtype", "fp8_e4m3"] and spec.request_extras == {}
    spec = resolve(load_engine("sglang"), "no_radix_cache", model_path="m", served_model="m")
    assert "--disable-radix-cache" in spec.args and "--enable-metrics" in spec.args


def test_bad_method_and_knob_are_clear_errors():
    with pytest.raises(ConfigError, match="engine 'vllm' has no method 'snapkv'"):
        resolve(load_engine("vllm"), "snapkv", model_path="m", served_model="m")
    with pytest.raises(ConfigError, match="does not take a budget"):
        resolve(load_engine("vllm"), "full", model_path="m", served_model="m", budget=128)
    with pytest.raises(ConfigError, match="unknown engine 'tgi'"):
        load_engine("tgi")


# ---- llama.cpp (docker: llama-server; process: llama-cpp-python) and the generic openai engine ----------

LLAMACPP_TYPES = {"f16": 1, "q8_0": 8, "q5_1": 7, "q5_0": 6, "q4_1": 3, "q4_0": 2, "iq4_nl": 20}


def test_llamacpp_kv_types_are_server_args_for_k_and_v_with_flash_attention():
    eng = load_engine("llamacpp")
    assert sum(m.baseline for m in eng.methods.values()) == 1 and eng.methods["f16"].baseline
    assert set(LLAMACPP_TYPES) <= set(eng.methods)
    for method, ggml in LLAMACPP_TYPES.items():
        d = resolve(eng, method, model_path="/m/x.gguf", served_model="smol", port=8123, runtime="docker",
                    params={"model_file": "/m/x.gguf"})
        a = d.args
        assert a[a.index("--cache-type-k") + 1] == method and a[a.index("--cache-type-v") + 1] == method
        assert a[a.index("--flash-attn") + 1] == "on" and a[a.index("-m") + 1] == "/m/x.gguf"
        assert a[a.index("--alias") + 1] == "smol" and d.image_ref.startswith("ghcr.io/ggml-org/llama.cpp:server")
        assert d.verify["expect"] == {"k": method, "v": method} and d.cache_bust_request == {"cache_prompt": False}
        p = resolve(eng, method, model_path="/m/x.gguf", served_model="smol", port=8123, runtime="process",
                    params={"model_file": "/m/x.gguf"})
        argv = p.command + p.args
        assert argv[:3] == ["python", "-m", "llama_cpp.server"]
        assert argv[argv.index("--type_k") + 1] == str(ggml) == argv[argv.index("--type_v") + 1]
        assert argv[argv.index("--flash_attn") + 1] == "true" and argv[argv.index("--interrupt_requests") + 1] == "false"
        assert p.health_fallback_paths == ["/v1/models"] and p.metrics_path is None and p.cache_bust_request == {}
        assert p.gpu is False and p.verify["expect"] == {"k": method, "v": method}


def test_llamacpp_prompt_cache_on_off_and_what_a_runtime_cannot_do():
    eng = load_engine("llamacpp")
    kw = dict(model_path="m", served_model="m", params={"model_file": "m.gguf"})
    off = resolve(eng, "f16_no_prompt_cache", runtime="docker", **kw)
    assert off.args[-2:] == ["--cache-ram", "0"] and off.request_extras == {"cache_prompt": False}
    on = resolve(eng, "f16_prompt_cache", runtime="process", **kw)
    assert on.args[-4:] == ["--cache", "true", "--cache_type", "ram"]
    with pytest.raises(ConfigError, match="cannot run under the process runtime: llama-cpp-python always reuses"):
        resolve(eng, "f16_no_prompt_cache", runtime="process", **kw)


def test_openai_engine_needs_no_image_and_runs_external_only():
    eng = load_engine("openai")
    assert eng.image is None and eng.command == [] and list(eng.methods) == ["full"]
    spec = resolve(eng, "full", model_path="m", served_model="m", runtime="external")
    assert (spec.served_model_from, spec.health_fallback_paths, spec.concurrency) == ("server", ["/v1/models"], 1)
    with pytest.raises(ConfigError, match="image and tag: required for the docker runtime"):
        resolve(eng, "full", model_path="m", served_model="m", runtime="docker")
    with pytest.raises(ConfigError, match=r"no method 'q8_0' .*docs/engines.md"):
        resolve(eng, "q8_0", model_path="m", served_model="m")


def test_openai_engine_is_builtin_when_engines_dir_points_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("KVT_ENGINES_DIR", str(tmp_path))
    assert load_engine("openai").name == "openai"
    with pytest.raises(ConfigError, match="unknown engine 'vllm'"):
        load_engine("vllm")


def test_vllm_busts_its_prefix_cache_with_a_salt_and_reports_cached_tokens():
    spec = resolve(load_engine("vllm"), "full", model_path="m", served_model="m")
    assert spec.cache_bust_request == {"cache_salt": "{nonce}"} and "--enable-prompt-tokens-details" in spec.args
    spec = resolve(load_engine("sglang"), "full", model_path="m", served_model="m")
    assert spec.cache_bust_request == {} and "--enable-cache-report" in spec.args


# --- aliases, hardware requirements (engine.yaml data) ------------------------------------------------

def test_vllm_fp8_is_an_alias_recorded_as_fp8_e4m3():
    eng = load_engine("vllm")
    assert "fp8" not in eng.methods and "fp8" in eng.methods["fp8_e4m3"].aliases
    a = resolve(eng, "fp8", model_path="m", served_model="m")
    b = resolve(eng, "fp8_e4m3", model_path="m", served_model="m")
    assert a.method == b.method == "fp8_e4m3" and a.args == b.args


def _engine_dir(tmp_path, methods: str) -> Path:
    d = tmp_path / "engines" / "e"
    d.mkdir(parents=True)
    (d / "engine.yaml").write_text(f"name: e\nimage: i\ntag: t\nmethods:\n{methods}")
    return tmp_path / "engines"


def test_alias_that_names_a_method_and_bad_capability_are_one_line_errors(tmp_path):
    root = _engine_dir(tmp_path, "  full: {baseline: true}\n  a: {aliases: [full]}\n")
    with pytest.raises(ConfigError, match=r"engine.yaml: .*'full' is already a method"):
        load_engine("e", root)
    root = _engine_dir(tmp_path / "2", "  full: {baseline: true, requires: {min_compute_capability: sm100}}\n")
    with pytest.raises(ConfigError, match=r"methods\.full\.requires\.min_compute_capability: .*'sm100' is not major"):
        load_engine("e", root)


def test_every_method_states_its_hardware_and_blackwell_only_ones_are_data():
    for name in ("vllm", "sglang"):
        for method, m in load_engine(name).methods.items():
            assert m.description, f"{name}/{method} has no description (the hardware it needs)"
    v, s = load_engine("vllm").methods, load_engine("sglang").methods
    h200, b200, rtx5090 = (9, 0), (10, 0), (12, 0)
    assert "10.0..10.9" in v["nvfp4_4over6"].requires.refusal(h200)
    assert v["nvfp4_4over6"].requires.refusal(b200) is None and v["nvfp4_4over6"].requires.refusal(rtx5090)
    for m in ("mxfp8", "nvfp4"):
        assert "needs compute capability >= 10.0, the GPU has 9.0" == s[m].requires.refusal(h200)
        assert s[m].requires.refusal(b200) is None
    assert s["fp4_mx_block16"].requires.refusal(h200) is None           # the H200-usable FP4
    assert s["fp4_mx_block16"].args[-2:] == ["--attention-backend", "triton"]
    assert all(m.requires.refusal(h200) is None for k, m in v.items() if k != "nvfp4_4over6")


def test_catalogs_have_the_pinned_versions_kv_options():
    v = {k: m.args for k, m in load_engine("vllm").methods.items()}
    for dt in ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"):
        assert v[dt] == ["--kv-cache-dtype", dt]
    assert "--kv-cache-dtype-skip-layers" in v["fp8_e4m3_skip_edges"]
    assert v["offload_lmcache"][-2:] == ["--kv-offloading-backend", "lmcache"]
    s = {k: m.args for k, m in load_engine("sglang").methods.items()}
    flat = [a for args in s.values() for a in args]
    for flag in ("--hicache-ratio", "--hicache-size", "--hicache-write-policy", "--radix-eviction-policy"):
        assert flag in flat


def test_dead_metric_dropped_and_sglang_health_does_not_generate():
    assert load_engine("vllm").metrics.kv_usage == ["vllm:kv_cache_usage_perc"]
    sg = load_engine("sglang")
    # /health runs a one-token generation per probe in SGLang 0.5.23; /ready does not
    assert sg.health.path == "/ready" or sg.env.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION") == "false"
