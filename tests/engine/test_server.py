"""The real engine on the tiny model (SmolLM2-135M-Instruct, CPU): API, presses, budgets, errors, queue."""

from __future__ import annotations

import json
import re
import threading

import httpx
import openai
import pytest

from .conftest import Server, free_port, start_engine, stop_engine

pytestmark = pytest.mark.engine

# ~150 tokens of context with a fact to retrieve, then a question (prompts stay small: 2 CPU cores)
CONTEXT = (
    "Notes from the harbour office. The ferry leaves at nine and returns at five. "
    "The secret code for the storage room is 4821. "
    + "Gulls circled the pier while fishermen mended their nets in the morning sun. " * 8
)
QUESTION = "Question: what is the secret code for the storage room? Answer:"
PROMPT = CONTEXT + QUESTION
MAX_TOKENS = 6


def post(server: Server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.api + path, content=content, headers={"Content-Type": "application/json"},
                      timeout=120, **kw)


def completion(server: Server, kv_press=None, prompt=PROMPT, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, **extra}
    if kv_press is not None:
        body["kv_press"] = kv_press
    r = post(server, "/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def metrics(server: Server) -> dict[str, float]:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def n_prompt(server: Server) -> int:
    return completion(server)["usage"]["prompt_tokens"]


# ------------------------------------------------------------------------------------------------ readiness


def test_health_was_503_before_ready(server: Server):
    assert 503 in server.health_codes_seen and server.health_codes_seen[-1] == 200
    r = server.early_completion
    assert r is not None and r.status_code == 503
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    h = httpx.get(server.base_url + "/health").json()
    assert h["status"] == "ok" and h["device"] == "cpu" and h["max_model_len"] == 8192


def test_models(client: openai.OpenAI):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].model_extra["max_model_len"] == 8192


# ------------------------------------------------------------------------------------------------ API shapes


def test_completion_openai_client(client: openai.OpenAI, n_prompt: int):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"kv_press": {"method": "snapkv", "compression_ratio": 0.5}})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r.choices[0].text, str)
    assert r.usage.prompt_tokens == n_prompt and 1 <= r.usage.completion_tokens <= MAX_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    applied = r.model_extra["kv_press_applied"]
    assert applied["method"] == "snapkv" and applied["semantics"] == "ratio"
    assert applied["kv_tokens_before"] == n_prompt
    assert applied["kv_tokens_after"] == int(n_prompt * 0.5)
    for key in ("compression_ratio", "budget", "scope", "params", "kv_bytes_after", "prefill_s", "decode_s"):
        assert key in applied


def test_chat_openai_client(client: openai.OpenAI):
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
        extra_body={"kv_press": {"method": "knorm", "budget": 64}},
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    applied = r.model_extra["kv_press_applied"]
    assert applied["semantics"] == "budget" and applied["kv_tokens_after"] == 64
    assert applied["kv_tokens_before"] == r.usage.prompt_tokens > 64


def test_streaming_completion_matches_non_streaming(client: openai.OpenAI):
    press = {"method": "snapkv", "compression_ratio": 0.5, "window_size": 16}
    ref = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                    extra_body={"kv_press": press})
    chunks = list(client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_body={"kv_press": press}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.choices[0].text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == ref.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == ref.usage.completion_tokens
    assert last.usage.prompt_tokens == ref.usage.prompt_tokens
    assert last.model_extra["kv_press_applied"]["kv_tokens_after"] == ref.model_extra["kv_press_applied"]["kv_tokens_after"]
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_chat(client: openai.OpenAI):
    messages = [{"role": "user", "content": PROMPT}]
    ref = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=MAX_TOKENS)
    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                                 max_tokens=MAX_TOKENS, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == ref.choices[0].finish_reason
    # without include_usage the finish chunk carries what was applied
    assert chunks[-1].model_extra["kv_press_applied"]["method"] == "full"
    assert chunks[-1].object == "chat.completion.chunk"


def test_raw_sse_framing(server: Server):
    with httpx.stream("POST", server.api + "/completions", timeout=60,
                      json={"prompt": "Hello", "max_tokens": 3, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1


# ------------------------------------------------------------------------------------------------ presses


@pytest.mark.parametrize("method", ["snapkv", "streamingllm", "observed_attention", "pyramidkv", "knorm", "tova",
                                    "expected_attention", "random"])
def test_press_really_applied(server: Server, n_prompt: int, method: str):
    ratio = 0.4
    press = {"method": method, "compression_ratio": ratio}
    if method in ("snapkv", "pyramidkv"):
        press["window_size"] = 16
    a = completion(server, press)["kv_press_applied"]
    assert a["method"] == method and a["skipped"] is None
    assert a["kv_tokens_before"] == n_prompt
    assert a["compression_ratio"] == ratio
    if method == "pyramidkv":  # per-layer budgets: the mean over layers is the ratio, layers differ
        assert abs(a["kv_tokens_after"] - (1 - ratio) * n_prompt) <= 0.05 * n_prompt
        assert a["kv_tokens_after_min"] < a["kv_tokens_after_max"]
    else:
        assert abs(a["kv_tokens_after"] - (1 - ratio) * n_prompt) <= 1
        assert a["kv_tokens_after_min"] == a["kv_tokens_after_max"] == a["kv_tokens_after"]
    assert a["kv_bytes_after"] < a["kv_bytes_before"]
    assert a["kv_bytes_after"] == pytest.approx(a["kv_bytes_before"] * a["kv_tokens_after"] / n_prompt, rel=0.01)
    assert a["attn_implementation"] == ("eager" if method == "observed_attention" else "sdpa")
    assert a["prefill_s"] > 0 and a["decode_s"] >= 0 and a["press_s"] > 0


def test_full_keeps_everything(server: Server, n_prompt: int):
    a = completion(server, {"method": "full"})["kv_press_applied"]
    assert a["semantics"] == "none" and a["kv_tokens_after"] == a["kv_tokens_before"] == n_prompt
    assert a["compression_ratio"] == 0 and a["kv_bytes_after"] == a["kv_bytes_before"] and a["press_s"] == 0


def test_budget_semantics(server: Server, n_prompt: int):
    press = {"method": "snapkv", "window_size": 16}
    over = completion(server, {**press, "budget": n_prompt - 40})["kv_press_applied"]
    assert over["semantics"] == "budget" and over["budget"] == n_prompt - 40
    assert over["kv_tokens_after"] == n_prompt - 40 and over["skipped"] is None
    assert over["compression_ratio"] == pytest.approx(40 / n_prompt, abs=1e-6)
    for budget in (n_prompt, n_prompt + 25):  # at and under the budget: not compressed
        a = completion(server, {**press, "budget": budget})["kv_press_applied"]
        assert a["kv_tokens_after"] == n_prompt and a["compression_ratio"] == 0
        assert "budget" in a["skipped"]
    st = completion(server, {"method": "streamingllm", "budget": 50})["kv_press_applied"]
    assert st["kv_tokens_after"] == 50


def test_ratio_and_budget_semantics_differ_with_length(server: Server):
    """ratio removes the same fraction at every length; a budget keeps the same count."""
    short, long_ = CONTEXT[:200] + QUESTION, PROMPT
    out = {}
    for name, p in (("short", short), ("long", long_)):
        r = completion(server, {"method": "knorm", "compression_ratio": 0.5}, prompt=p)["kv_press_applied"]
        b = completion(server, {"method": "knorm", "budget": 40}, prompt=p)["kv_press_applied"]
        out[name] = (r, b)
    for r, b in out.values():
        assert r["kv_tokens_after"] == int(r["kv_tokens_before"] * 0.5)
        assert b["kv_tokens_after"] == 40
    assert out["short"][1]["compression_ratio"] < out["long"][1]["compression_ratio"]


def test_context_only_scope(server: Server, n_prompt: int):
    qs = len(CONTEXT)
    a = completion(server, {"method": "snapkv", "compression_ratio": 0.5, "window_size": 16,
                            "scope": "context_only", "question_start": qs})["kv_press_applied"]
    q = a["question_tokens"]
    ctx = a["compressed_span_tokens"]
    assert a["scope"] == "context_only" and a["question_start"] == qs
    assert ctx + q == n_prompt == a["kv_tokens_before"] and 8 <= q <= 20
    assert a["kv_tokens_after"] == int(ctx * 0.5) + q  # the question is never pruned
    b = completion(server, {"method": "knorm", "budget": 30, "scope": "context_only",
                            "question_start": qs})["kv_press_applied"]
    assert b["kv_tokens_after"] == 30 + b["question_tokens"]
    # the same tokens as query_aware: the prompt is tokenized once and split
    assert b["kv_tokens_before"] == n_prompt


def test_context_only_chat_and_pyramidkv(client: openai.OpenAI):
    msg = CONTEXT + QUESTION
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": msg}], max_tokens=MAX_TOKENS,
        extra_body={"kv_press": {"method": "pyramidkv", "compression_ratio": 0.5, "window_size": 16,
                                 "scope": "context_only", "question_start": len(CONTEXT)}})
    a = r.model_extra["kv_press_applied"]
    # the question part is the question text plus the template's end-of-turn and assistant header
    assert a["question_tokens"] > 10 and a["kv_tokens_before"] == r.usage.prompt_tokens
    assert a["kv_tokens_after_min"] < a["kv_tokens_after_max"]
    assert r.choices[0].message.content


def test_short_span_skip_is_recorded(server: Server):
    a = completion(server, {"method": "snapkv", "compression_ratio": 0.5}, prompt="Hi there, how are you?")[
        "kv_press_applied"]
    assert a["kv_tokens_after"] == a["kv_tokens_before"] and "window_size=64" in a["skipped"]


def test_greedy_is_deterministic(server: Server):
    for press in ({"method": "random", "compression_ratio": 0.5}, {"method": "snapkv", "budget": 60}):
        a = completion(server, press, max_tokens=10)
        b = completion(server, press, max_tokens=10)
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        assert a["usage"] == b["usage"]


def test_full_answers_the_fact(server: Server):
    """sanity: the tiny model with the full cache retrieves the fact (so the prompt is meaningful)."""
    r = post(server, "/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16})
    assert "4821" in r.json()["choices"][0]["message"]["content"]


def test_stop_and_ignore_eos(server: Server):
    ref = completion(server, max_tokens=12)
    text = ref["choices"][0]["text"]
    forced = completion(server, max_tokens=12, ignore_eos=True)
    assert forced["usage"]["completion_tokens"] == 12 and forced["choices"][0]["finish_reason"] == "length"
    words = re.findall(r"\w+", forced["choices"][0]["text"])
    if words:
        stop = words[0]
        s = completion(server, max_tokens=12, ignore_eos=True, stop=[stop])
        assert stop not in s["choices"][0]["text"] and s["choices"][0]["finish_reason"] == "stop"
    assert isinstance(text, str)


# ------------------------------------------------------------------------------------------------ errors


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    "kv_press,param,fragment",
    [
        ({"method": "h2o", "compression_ratio": 0.5}, "kv_press.method", "unknown method"),
        ({"method": "snapkv", "compression_ratio": 1.0}, "kv_press.compression_ratio", "[0, 1)"),
        ({"method": "snapkv", "compression_ratio": -0.2}, "kv_press.compression_ratio", "[0, 1)"),
        ({"method": "snapkv", "budget": 0}, "kv_press.budget", "> 0"),
        ({"method": "snapkv", "budget": -3}, "kv_press.budget", "> 0"),
        ({"method": "snapkv"}, "kv_press.compression_ratio", "needs compression_ratio or budget"),
        ({"method": "snapkv", "budget": 9, "scope": "context_only"}, "kv_press.question_start", "question_start"),
    ],
)
def test_bad_press_requests(server: Server, kv_press, param, fragment):
    err = _error(post(server, "/completions", {"prompt": "x", "kv_press": kv_press}), 400)
    assert err["param"] == param and fragment in err["message"] and err["type"] == "invalid_request_error"


def test_prompt_longer_than_context(server: Server, client: openai.OpenAI):
    err = _error(post(server, "/completions", {"prompt": [1] * 8200, "max_tokens": 1}), 400)
    assert err["code"] == "context_length_exceeded" and "8192" in err["message"]
    err = _error(post(server, "/completions", {"prompt": "word " * 8300}), 400)
    assert err["code"] == "context_length_exceeded"
    err = _error(post(server, "/completions", {"prompt": [1] * 8000, "max_tokens": 500}), 400)
    assert err["param"] == "max_tokens"
    err = _error(post(server, "/chat/completions",
                      {"messages": [{"role": "user", "content": "word " * 8300}], "stream": True}), 400)
    assert err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="SmolLM2-135M-Instruct", prompt=[1] * 8200, max_tokens=1)


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/completions", b"{not json", 400),
        ("/completions", b"[1, 2]", 400),
        ("/completions", {"max_tokens": 3}, 400),  # no prompt
        ("/completions", {"prompt": "x", "max_tokens": "many"}, 400),
        ("/completions", {"prompt": "x", "n": 2}, 400),
        ("/completions", {"prompt": ["a", "b"]}, 400),
        ("/completions", {"prompt": [1, 99999999]}, 400),
        ("/completions", {"prompt": "x", "kv_press": "snapkv"}, 400),
        ("/completions", {"prompt": "x", "kv_press": {"method": "knorm", "budget": 4, "nope": 1}}, 400),
        ("/completions", {"prompt": "x", "model": "gpt-4"}, 404),
        ("/chat/completions", {"messages": []}, 400),
        ("/chat/completions", {"messages": [{"role": "user"}], "kv_press": {
            "method": "knorm", "budget": 4, "scope": "context_only", "question_start": 5}}, 400),
        ("/completions", {"prompt": "abc", "kv_press": {
            "method": "knorm", "budget": 4, "scope": "context_only", "question_start": 3}}, 400),  # empty question
    ],
)
def test_malformed_requests(server: Server, path, body, status):
    _error(post(server, path, body), status)


# ------------------------------------------------------------------------------------------------ queue, metrics


def test_concurrent_clients_each_answered_once(server: Server):
    before = metrics(server)
    n = 8
    results: dict[int, httpx.Response] = {}

    def one(i: int) -> None:
        results[i] = post(server, "/completions", {"prompt": f"Item {i}: the number after {i} is", "max_tokens": 4,
                                                   "ignore_eos": True, "stream": i % 2 == 1})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(n))
    texts = {}
    for i, r in results.items():
        assert r.status_code == 200, r.text
        if i % 2 == 0:
            body = r.json()
            assert body["usage"]["completion_tokens"] == 4
            texts[i] = body["choices"][0]["text"]
        else:
            assert r.text.rstrip().endswith("data: [DONE]")
    # every request was answered once: the server counted exactly n more
    after = metrics(server)
    key = 'kvpress:requests_total{endpoint="completions",status="200"}'
    assert after[key] - before.get(key, 0) == n
    assert after["kvpress:generation_tokens_total"] - before["kvpress:generation_tokens_total"] == 4 * n
    assert after["kvpress:queue_depth"] == 0 and after["kvpress:num_requests_running"] == 0
    # answers are the ones for their own prompt (same as served alone)
    alone = completion(server, prompt="Item 2: the number after 2 is", max_tokens=4, ignore_eos=True)
    assert alone["choices"][0]["text"] == texts[2]


def test_metrics_move(server: Server):
    before = metrics(server)
    body = completion(server, {"method": "snapkv", "compression_ratio": 0.5, "window_size": 16})
    after = metrics(server)
    a, u = body["kv_press_applied"], body["usage"]

    def d(name: str) -> float:
        return after["kvpress:" + name] - before.get("kvpress:" + name, 0)

    assert d("prompt_tokens_total") == u["prompt_tokens"]
    assert d("generation_tokens_total") == u["completion_tokens"]
    assert d("kv_tokens_offered_total") == a["kv_tokens_before"]
    assert d("kv_tokens_kept_total") == a["kv_tokens_after"]
    assert d("kv_bytes_after_compression_total") == a["kv_bytes_after"]
    assert after["kvpress:kv_tokens_kept_last"] == a["kv_tokens_after"]
    assert after["kvpress:kv_bytes_after_compression_last"] == a["kv_bytes_after"]
    assert d("prefill_seconds_total") > 0 and d("press_seconds_total") > 0
    assert "kvpress:kv_cache_usage_perc" in after and after["kvpress:kv_cache_usage_perc"] == 0  # idle now


def test_errors_are_counted(server: Server):
    before = metrics(server)
    post(server, "/completions", {"prompt": "x", "kv_press": {"method": "nope"}})
    after = metrics(server)
    key = 'kvpress:requests_total{endpoint="completions",status="400"}'
    assert after[key] - before.get(key, 0) == 1


# ------------------------------------------------------------------------------------------------ start-up refusals


def test_refuses_sliding_window_model(tmp_path):
    """A Gemma-3 style config (sliding-window layers) is refused at start: non-zero exit, clear message."""
    d = tmp_path / "gemma3-like"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "vocab_size": 256, "sliding_window": 16, "max_position_embeddings": 1024,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    }))
    log = tmp_path / "log.txt"
    proc = start_engine(["--model", str(d), "--port", str(free_port())], log)
    try:
        rc = proc.wait(timeout=120)
    finally:
        stop_engine(proc)
    text = log.read_text()
    assert rc == 2, text[-2000:]
    assert "refusing to serve" in text and "sliding-window" in text


def test_continuous_batching_over_http(server: Server):
    """Requests with different presses, lengths and max_tokens in flight together: they share decoding steps
    (batch_size_max > 1, /metrics' mean batch > 1), each answers what it answers alone, and one whose press
    decodes alone says so."""
    reqs = [
        ({"method": "snapkv", "compression_ratio": 0.5, "window_size": 8}, PROMPT * 3, 12),
        ({"method": "pyramidkv", "compression_ratio": 0.5, "window_size": 8}, PROMPT * 2, 10),
        ({"method": "full"}, PROMPT, 14),
        ({"method": "streamingllm", "compression_ratio": 0.25}, PROMPT * 4, 6),
        ({"method": "decoding", "compression_interval": 2, "target_size": 16, "inner": {"method": "knorm"}}, PROMPT, 4),
    ]
    before = metrics(server)
    results: dict[int, httpx.Response] = {}

    def one(i: int) -> None:
        kv, prompt, mx = reqs[i]
        results[i] = post(server, "/completions", {"prompt": prompt, "max_tokens": mx, "ignore_eos": True,
                                                   "kv_press": kv})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    after = metrics(server)
    bodies = {i: r.json() for i, r in results.items() if r.status_code == 200}
    assert sorted(bodies) == list(range(len(reqs))), {i: r.text for i, r in results.items()}
    applied = {i: b["kv_press_applied"] for i, b in bodies.items()}
    assert max(applied[i]["batch_size_max"] for i in range(4)) >= 2
    assert all(applied[i]["batched"] for i in range(4))
    assert not applied[4]["batched"] and "decoding-time press" in applied[4]["batched_reason"]
    steps = after["kvpress:decode_steps_total"] - before.get("kvpress:decode_steps_total", 0)
    total = after["kvpress:batch_size_sum"] - before.get("kvpress:batch_size_sum", 0)
    assert steps > 0 and total / steps > 1
    assert after["kvpress:max_batch"] == 32 and after["kvpress:batch_size"] == 0
    assert after["kvpress:num_requests_running"] == 0 and after["kvpress:queue_depth"] == 0
    for i, (kv, prompt, mx) in enumerate(reqs):
        alone = completion(server, kv_press=kv, prompt=prompt, max_tokens=mx, ignore_eos=True)
        assert alone["choices"][0]["text"] == bodies[i]["choices"][0]["text"], i
        assert bodies[i]["usage"]["completion_tokens"] == mx
