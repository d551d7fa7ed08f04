"""Admission by KV memory: a prefilled request joins the decoding batch only when its slot room fits under
--kv-cache-limit-gib (and in free GPU memory on CUDA); otherwise it waits, prefilled, for rows to leave.
Nothing is refused or lost, and the answers are what decoding alone gives."""

from __future__ import annotations

import threading

import httpx
import pytest

from .conftest import free_port, start_engine, stop_engine, wait_healthy

pytestmark = pytest.mark.engine

PROMPT = ("The lighthouse keeper logs the ships at dawn. The tide table hangs by the door. "
          "The spare lamp is in the blue crate. " * 3 + "Question: where is the spare lamp? Answer:")
LIMIT_BYTES = 15_000_000  # two rows of this prompt fit, three do not (checked from the responses below)


def test_slot_plans_double_rows_unless_the_limit_says_one_more():
    import torch
    from kvpress_engine.batch import SlotCache

    c = SlotCache(2, 1, 4, torch.float32, "cpu", 8, grouped=False)  # 2 layers, 1 head, head_dim 4: 32 B/token/layer
    per_tok = 2 * 1 * 4 * 4  # K and V, one head of 4 floats, per layer

    def add(n_tok, extra):
        kv = [(torch.ones(1, 1, n_tok, 4), torch.ones(1, 1, n_tok, 4)) for _ in range(2)]
        return c.add(kv, torch.tensor(1), n_tok, extra)

    assert c.bytes_after_join([10, 10], 5) == 1 * 64 * 2 * per_tok  # one row, capacity rounded up to 64
    add(10, 5)
    add(10, 5)
    assert c.slots == 2 and c.allocated_bytes() == 2 * 64 * 2 * per_tok
    assert c.bytes_after_join([100, 100], 5) == 4 * 128 * 2 * per_tok  # rows double, capacity grows to 128
    c.limit_bytes = 3 * 128 * 2 * per_tok
    assert c.bytes_after_join([100, 100], 5) == 3 * 128 * 2 * per_tok  # doubling would not fit: one more row
    add(100, 5)
    assert c.slots == 3 and c.allocated_bytes() <= c.limit_bytes
    assert c.held_tokens().tolist() == [[10, 10, 100], [10, 10, 100]]


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("limited_engine") / "engine.log"
    # requests of one prompt wait up to 3 s for each other (one fan-out group: a fixed arrival order); static
    # decoding steps: the CUDA graphs' computation, uncaptured, through the server's whole path
    proc = start_engine(["--port", str(port), "--threads", "1", "--fanout-wait-ms", "3000", "--decode-step", "static",
                         "--kv-cache-limit-gib", str(LIMIT_BYTES / 2**30)], log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, log)
        yield base, log
    finally:
        stop_engine(proc)


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_requests_over_the_kv_limit_wait_for_rows_and_answer_as_alone(limited_server):
    base, log = limited_server
    mx = [6, 9, 7, 8]

    def post(max_tokens):
        r = httpx.post(base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
                                                       "kv_press": {"method": "full"}}, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()

    alone = [post(m) for m in mx]
    a0 = alone[0]["kv_press_applied"]
    per_tok = a0["kv_bytes_before"] // a0["kv_tokens_before"]
    row = per_tok * -(-(a0["kv_tokens_before"] + max(mx) + 1) // 64) * 64
    assert 2 * row <= LIMIT_BYTES < 3 * row, (row, "the test's premise: two rows fit under the limit, three do not")

    deferred = _metric(base, "kvpress:kv_admission_deferred_total")
    got: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, post(mx[i]))) for i in range(len(mx))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(got) == list(range(len(mx)))
    for i, a in enumerate(alone):
        s = got[i]["kv_press_applied"]
        assert got[i]["choices"][0]["text"] == a["choices"][0]["text"], i
        assert got[i]["usage"]["completion_tokens"] == mx[i]
        assert s["shared_prefill_with"] == len(mx)  # all four were prefilled together, then admitted by memory
        assert s["batch_size_max"] <= 2, s
        assert s["decode_step"] == "static" and a["kv_press_applied"]["decode_step"] == "static"
    assert max(g["kv_press_applied"]["batch_size_max"] for g in got.values()) == 2
    assert _metric(base, "kvpress:kv_admission_deferred_total") - deferred == 2
    assert "waits for KV memory" in log.read_text()
    assert _metric(base, "kvpress:num_requests_running") == 0 and _metric(base, "kvpress:batch_size") == 0


def test_the_limit_must_be_positive():
    from kvpress_engine.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--kv-cache-limit-gib", "0"])
    assert e.value.code == 2
    assert parse_args(["--kv-cache-limit-gib", "1.5"]).kv_cache_limit_gib == 1.5
