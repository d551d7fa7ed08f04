"""The engine specs in engines/*/engine.yaml: they load, every method resolves, the served model name
reaches the server (a mismatch makes every request a 404), and the dry run is an exact docker run."""

from __future__ import annotations

import shlex

import pytest

from kv_transition.engines.spec import list_engines, load_engine, resolve
from kv_transition.errors import ConfigError


def test_the_three_engines_are_there():
    assert {"vllm", "sglang", "kvpress"} <= set(list_engines())


@pytest.mark.parametrize("name", ["vllm", "sglang", "kvpress"])
def test_every_method_resolves_and_names_the_served_model(name: str):
    eng = load_engine(name)
    assert sum(m.baseline for m in eng.methods.values()) == 1 and eng.methods["full"].baseline
    for method, m in eng.methods.items():
        knob = {"compression_ratio": 0.5} if "compression_ratio" in m.supports else {}
        spec = resolve(eng, method, model_path="/models/x", served_model="my-model", port=8123,
                       gpus=[0, 1], host_env={"HF_TOKEN": "hf_secret"}, **knob)
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
