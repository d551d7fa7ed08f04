"""Pure parsing: SSE framing, chunk accumulation, the latency math (vLLM definitions)."""

from __future__ import annotations

import json

import pytest

from kv_transition.runner.stream import AttemptError, SSEDecoder, StreamAccumulator, http_error, parse_completion_body, tpot


def chunk(text: str | None = None, finish: str | None = None, **extra) -> str:
    d = {"id": "x", "object": "text_completion", "choices": [] if text is None and finish is None else
         [{"index": 0, "text": text or "", "finish_reason": finish}]}
    d.update(extra)
    return json.dumps(d)


def test_sse_decoder_framing() -> None:
    d = SSEDecoder()
    out = [d.feed(x) for x in [": keep-alive", "event: message", "data: {\"a\":", "data: 1}\r", "", "", "data:[DONE]"]]
    assert [o for o in out if o is not None] == ['{"a":\n1}']
    assert d.flush() == "[DONE]"  # missing final blank line
    assert d.flush() is None


def test_metrics_math_vllm_definitions() -> None:
    acc = StreamAccumulator(t0=10.0)
    acc.feed(chunk("Hel"), 10.5)       # first token: TTFT 0.5
    acc.feed(chunk("lo"), 10.6)
    acc.feed(chunk(""), 10.65)         # empty text: not a token, no ITL entry
    acc.feed(chunk(" wor"), 10.8)
    acc.feed(chunk("ld", "length"), 11.0)
    acc.feed(chunk(usage={"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11},
                   kv_press_applied={"method": "snapkv", "compression_ratio": 0.5}), 11.01)
    acc.feed("[DONE]", 11.02)
    assert acc.done
    r = acc.finish()
    assert r.text == "Hello world" and r.finish_reason == "length"
    assert r.ttft_s == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.1, 0.2, 0.2])
    assert r.e2e_s == pytest.approx(1.02)
    assert r.tpot_s == pytest.approx((1.02 - 0.5) / 3)  # first token excluded
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens) == (7, 4, 11)
    assert r.kv_applied == {"method": "snapkv", "compression_ratio": 0.5}
    assert r.n_chunks == 4 and r.streamed


def test_tpot_edge_cases() -> None:
    assert tpot(1.0, 0.4, 1) is None
    assert tpot(1.0, None, 5) is None
    assert tpot(1.0, 0.2, 5) == pytest.approx(0.2)


def test_without_usage_counts_chunks_and_accepts_missing_done() -> None:
    acc = StreamAccumulator(0.0)
    acc.feed(chunk("a"), 0.1)
    acc.feed(chunk("b"), 0.3)
    acc.feed(chunk("c", "stop"), 0.6)
    r = acc.finish()  # no [DONE], but a finish_reason: complete
    assert r.completion_tokens is None and r.output_tokens == 3
    assert r.tpot_s == pytest.approx((0.6 - 0.1) / 2)


@pytest.mark.parametrize("payload", ['{"id": "x", "choices": [{"ind', "[1, 2]", "not json"])
def test_malformed_data_is_a_retryable_attempt_error(payload: str) -> None:
    acc = StreamAccumulator(0.0)
    with pytest.raises(AttemptError) as ei:
        acc.feed(payload, 0.1)
    assert ei.value.kind == "malformed" and ei.value.retryable


def test_stream_ended_early_is_incomplete() -> None:
    acc = StreamAccumulator(0.0)
    acc.feed(chunk("a"), 0.1)
    with pytest.raises(AttemptError) as ei:
        acc.finish()
    assert ei.value.kind == "incomplete" and ei.value.retryable


def test_error_object_in_stream() -> None:
    acc = StreamAccumulator(0.0)
    with pytest.raises(AttemptError) as ei:
        acc.feed(json.dumps({"error": {"message": "bad budget", "code": 400}}), 0.1)
    assert ei.value.kind == "stream_error" and not ei.value.retryable and ei.value.http_status == 400
    with pytest.raises(AttemptError) as ei:
        StreamAccumulator(0.0).feed(json.dumps({"error": {"message": "OOM"}}), 0.1)
    assert ei.value.retryable


def test_http_error_classification() -> None:
    e = http_error(400, '{"error": {"message": "kv_press.budget must be > 0"}}')
    assert e.kind == "http_4xx" and not e.retryable and e.http_status == 400 and "budget" in e.body
    assert http_error(503, "busy").retryable and http_error(503, "busy").kind == "http_5xx"
    assert http_error(429, "slow down").retryable
    assert not http_error(404, "").retryable


def test_non_streaming_body() -> None:
    raw = json.dumps({"choices": [{"text": "hi there", "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                      "kv_press_applied": {"method": "full"}})
    r = parse_completion_body(raw, 1.0, 1.25)
    assert r.text == "hi there" and r.e2e_s == pytest.approx(0.25) and r.ttft_s is None
    assert r.kv_applied == {"method": "full"} and not r.streamed
    with pytest.raises(AttemptError):
        parse_completion_body(b"<html>", 0, 1)


def test_client_sse_framing_over_a_mock_transport() -> None:
    """The client's inlined framing: comments, event fields, CRLF, a multi-line data event, no final blank line."""
    import asyncio

    import httpx

    from kv_transition.runner.client import complete, make_client

    body = (": ping\r\n\r\nevent: completion\r\ndata: " + chunk("Hel") + "\r\n\r\n"
            'data: {"choices": [{"index": 0,\r\ndata:  "text": "lo", "finish_reason": "stop"}]}\r\n\r\n'
            "data: " + chunk(usage={"completion_tokens": 2}, kv_press_applied={"method": "full"}) + "\r\n\r\n"
            "data: [DONE]")

    def handler(req: httpx.Request) -> httpx.Response:
        assert json.loads(req.content)["stream"] is True
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())

    async def go():
        async with make_client("http://test", 1, transport=httpx.MockTransport(handler)) as c:
            return await complete(c, {"stream": True}, stream=True, timeout_s=5)

    r = asyncio.run(go())
    assert r.text == "Hello" and r.finish_reason == "stop" and r.completion_tokens == 2
    assert r.kv_applied == {"method": "full"} and len(r.itl) == 1 and r.ttft_s is not None
