"""Fan-out prefill (kvpress_engine/fanout.py) is exact: for every press of the catalog, one shared forward pass
gives each variant the cache, first-token logits and kept-token counts of its own separate prefill, and greedy
decoding from the returned caches gives the same tokens as Engine.generate (the product path for one request),
token for token; Engine.generate_many (the engine's path: shared prefill, then batched decoding) answers as
Engine.generate; over HTTP, concurrent requests of one prompt share one prefill. Tiny model, CPU, float32, a
96-token prompt, 4 generated tokens."""

from __future__ import annotations

import pytest

from .test_presses import artifacts  # noqa: F401 - the artifact fixture (kvpress's on-disk formats)

pytestmark = [pytest.mark.engine, pytest.mark.slow]

N = 96
Q = 72  # question_start (token index): finch's window, the split of context_only
T = 4  # tokens generated per variant
PROMPT = [100 + (i * 7919) % 40000 for i in range(N)]
R = 0.5

_DEC = {"compression_interval": 2, "target_size": 40, "hidden_states_buffer_size": 4}
_INNER = {"method": "knorm"}


def _catalog_specs(artifacts) -> list[tuple[str, dict]]:
    """One kv_press per catalog name (required parameters filled, small decoding intervals so decoding-time
    presses act within T tokens), plus a second ratio for a few: a sweep's (press, ratio) cells."""
    from kvpress_engine.presses import ALL

    special: dict[str, dict] = {
        "think": {"key_channel_compression_ratio": 0.5},
        "simlayerkv": {"n_recent": 32, "lazy_threshold": 0.5},
        "finch": {"question_start": Q},
        "dms": {"threshold": 0.0, "sliding_window_size": 8, "decoding": True, "inner": _INNER},
        "per_layer": {"compression_ratios": [0.25, 0.5, 0.75] * 10, "inner": _INNER},
        "composed": {"presses": [{"method": "snapkv", "window_size": 16}, {"method": "knorm"}]},
        "prefill_decoding": {"prefill": {"method": "snapkv", "window_size": 16},
                             "decoding": {"method": "decoding", **_DEC, "inner": _INNER}},
        "decoding": {**_DEC, "inner": _INNER},
        "compression_ratio_decoding": {"compression_interval": 2, "hidden_states_buffer_size": 4, "inner": _INNER},
        "cam": {**_DEC, "merge_budget": 4, "inner": _INNER},
        "qfilter": {"qfilter_path": str(artifacts / "qfilt")},
        "kvzap": {"kvzap_path": str(artifacts / "kvzap")},
        "duo_attention": {"duo_attention_path": str(artifacts / "duo")},
        "kvzip": {"chunk_size": 64},
        "chunk": {"chunk_length": 64, "inner": _INNER},
        "block": {"block_size": 32, "inner": {"method": "snapkv", "window_size": 16}},
        "lagkv": {"lag_size": 32},
        "compactor": {"chunk_size": 64},
        "non_causal_attention": {"chunk_size": 64},
    }
    out = []
    for name, kind in ALL.items():
        kv = {"method": name, **special.get(name, {})}
        if kind.inner and "inner" not in kv:
            kv["inner"] = {"method": "snapkv", "window_size": 16} if name != "key_rerotation" else _INNER
        if kind.recipe is not None or kind.ratio is not None:
            kv["compression_ratio"] = R  # dropped below for names that size themselves
        out.append((name, kv))
    for name, kv in [("snapkv", {"method": "snapkv"}), ("knorm", {"method": "knorm"}),
                     ("adakv_snapkv", {"method": "adakv_snapkv"}), ("pyramidkv", {"method": "pyramidkv"}),
                     ("observed_attention", {"method": "observed_attention"}), ("leverage", {"method": "leverage"}),
                     ("snapkv_budget", {"method": "snapkv", "budget": 50})]:
        out.append((f"{name}@0.25" if "budget" not in kv else name, {"compression_ratio": 0.25, **kv}
                    if "budget" not in kv else kv))
    return out


@pytest.fixture(scope="module")
def engine():
    from .pipeline_ref import load_tiny

    return load_tiny()[0]




def _summary(after: dict, n_kv_heads: int) -> dict:
    lens, eff = after["lens"], after["effective"]
    return {"kv_tokens_after": round(sum(eff) / len(eff)), "kv_tokens_after_min": round(min(eff)),
            "kv_tokens_after_max": round(max(eff)), "kv_tokens_held": round(sum(lens) / len(lens)),
            "kv_tokens_masked": round(sum(after["masked"]) / n_kv_heads / len(lens)) if after["masked"] else 0,
            "kv_bytes_after": after["bytes"]}


def _shared(engine, specs, scope: str, **kw):
    """Every spec through ONE fanout_prefill call, then each variant's question pass and greedy decoding."""
    import torch
    from kvpress_engine import fanout
    from kvpress_engine.build import build_press
    from kvpress_engine.methods import SPLIT_SCOPES, plan_compression

    model = engine.model
    split = Q if scope in SPLIT_SCOPES else None
    span = split if split is not None else N
    q_window = N - Q
    builts = [build_press(s.tree, plan_compression(s, span).press_ratio, question_tokens=q_window,
                          n_layers=engine.n_layers) for s in specs]
    ids = torch.tensor([PROMPT], dtype=torch.long)
    pfs = fanout.fanout_prefill(model, ids, span, builts, base_attn=engine.base_attn,
                                kv_bytes_per_token=engine.kv_bytes_per_token, **kw)
    out = []
    for b, pf in zip(builts, pfs):
        with fanout.attention(model, pf.attn):
            fanout.install_masks(model, pf.masks)
            fanout.restore_rng(pf, engine.device)
            cont = fanout.finish(model, pf, b, ids, split, engine.n_kv_heads)
            try:
                toks = fanout.greedy(model, cont, pf.cache, T, set())
                final = fanout.kv_state(pf.cache, fanout.masks_of(model), engine.n_kv_heads)
            finally:
                cont.stack.close()
                fanout.install_masks(model, None)
        out.append((pf, toks, _summary(cont.after, engine.n_kv_heads), final))
    return out


# context_only: head-wise masks, per-layer lengths, re-rotation, decoding-time presses, eager, random sketches,
# KVzip's own passes
SPLIT_SUBSET = {"full", "snapkv", "snapkv@0.25", "adakv_snapkv", "pyramidkv", "key_rerotation", "dms", "decoding",
                "prefill_decoding", "observed_attention", "observed_attention@0.25", "leverage", "kvzip", "duo_attention",
                "simlayerkv", "think"}


@pytest.mark.parametrize("scope", ["query_aware", "context_only"])
def test_shared_prefill_equals_separate_prefills_for_every_press(engine, artifacts, scope):
    from kvpress_engine.engine import Encoded
    from kvpress_engine.methods import PressSpec, PressSpecError, resolve_press_spec

    specs, names = [], []
    for name, kv in _catalog_specs(artifacts):
        if scope != "query_aware" and name not in SPLIT_SUBSET:
            continue  # the split scope runs the same hooks; its own part is the question pass after them
        kv = {**kv, "scope": scope}
        if scope != "query_aware":
            kv["question_start"] = Q
        try:
            specs.append(resolve_press_spec(PressSpec(), kv))
        except PressSpecError as e:  # a name that sizes itself from its own parameters
            assert "takes no compression_ratio" in e.message, (name, e.message)
            specs.append(resolve_press_spec(PressSpec(), {k: v for k, v in kv.items() if k != "compression_ratio"}))
        names.append(name)
    assert len(specs) > (60 if scope == "query_aware" else len(SPLIT_SUBSET) - 1)
    shared = _shared(engine, specs, scope, fanout_max=128)
    reasons = {}
    for name, spec, (pf, toks, kept, final) in zip(names, specs, shared):
        sep = engine.generate(Encoded(list(PROMPT), Q), spec, T, ignore_eos=True)
        assert toks == sep.token_ids, name
        assert kept == {k: sep.applied[k] for k in kept}, name
        assert round(sum(final["effective"]) / len(final["effective"])) == sep.applied["kv_tokens_final"], name
        reasons[name] = pf.reason
    # every press shares except KVzip (its own reconstruction passes); the eager ones share among themselves
    assert {n for n, r in reasons.items() if r is not None} == {"kvzip", "kvzip_plus"} & set(names), reasons
    assert {r for r in reasons.values() if r} == {"own_passes"}
    own = len({"kvzip", "kvzip_plus"} & set(names))
    attn = {n: pf.attn for n, (pf, *_rest) in zip(names, shared)}
    assert attn["observed_attention"] == attn["observed_attention@0.25"] == "eager"
    passes = {(pf.attn, pf.share) for pf, *_ in shared if pf.shared}
    assert passes == {("eager", 2), ("sdpa", len(specs) - 2 - own)}


def test_fanout_bounds_and_falls_back(engine):
    """--fanout-max cuts a group into passes; a memory bound that fits one cache at a time falls back to
    separate prefills (reason "memory"); still exact."""
    from kvpress_engine.engine import Encoded
    from kvpress_engine.methods import PressSpec, resolve_press_spec

    specs = [resolve_press_spec(PressSpec(), {"method": m, "compression_ratio": r})
             for m in ("snapkv", "knorm", "tova") for r in (0.25, 0.5)]
    seps = [engine.generate(Encoded(list(PROMPT), None), s, T, ignore_eos=True).token_ids for s in specs]
    got = _shared(engine, specs, "query_aware", fanout_max=4)
    assert [pf.share for pf, *_ in got] == [4, 4, 4, 4, 2, 2]
    assert [t for _, t, *_ in got] == seps
    one_cache = N * engine.kv_bytes_per_token
    got = _shared(engine, specs, "query_aware", mem_free=lambda: int(one_cache * 1.5))
    assert [(pf.shared, pf.reason) for pf, *_ in got] == [(False, "memory")] * 6
    assert [t for _, t, *_ in got] == seps
    got = _shared(engine, specs[:1], "query_aware")
    assert (got[0][0].shared, got[0][0].reason) == (False, "alone")


@pytest.mark.parametrize("scope", ["query_aware", "context_only"])
def test_generate_many_shares_the_prefill_and_decodes_as_alone(engine, scope):
    """The engine's own path: Engine.generate_many (one fan-out prefill, each request resumed, the batchable
    ones decoded in one batch, masked/decoding-time ones alone) == Engine.generate per request."""
    from kvpress_engine.engine import Encoded, Variant
    from kvpress_engine.methods import PressSpec, resolve_press_spec

    kvs = [{"method": "full"}, {"method": "snapkv", "compression_ratio": 0.5},
           {"method": "pyramidkv", "compression_ratio": 0.5, "window_size": 16},
           {"method": "adakv_snapkv", "compression_ratio": 0.25},
           {"method": "decoding", **_DEC, "inner": _INNER}, {"method": "observed_attention", "compression_ratio": 0.5},
           {"method": "observed_attention", "compression_ratio": 0.25}]
    extra = {"scope": scope, "question_start": Q} if scope != "query_aware" else {}
    specs = [resolve_press_spec(PressSpec(), {**kv, **extra}) for kv in kvs]
    enc = Encoded(list(PROMPT), Q)
    alone = [engine.generate(enc, s, T, ignore_eos=True) for s in specs]
    many = engine.generate_many(enc, [Variant(s, T, ignore_eos=True) for s in specs])
    for kv, a, m in zip(kvs, alone, many):
        assert not isinstance(m, BaseException), (kv, m)
        assert m.token_ids == a.token_ids, kv
        for k in ("kv_tokens_after", "kv_tokens_held", "kv_tokens_masked", "kv_tokens_final", "kv_bytes_after"):
            assert m.applied[k] == a.applied[k], (kv, k)
    assert [m.applied["shared_prefill_with"] for m in many] == [5, 5, 5, 5, 5, 2, 2]
    assert sum(1 / m.applied["shared_prefill_with"] for m in many) == pytest.approx(2.0)  # sdpa + eager passes


# ------------------------------------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def fanout_server(tmp_path_factory):
    """An engine whose requests wait up to 3 s for others of the same prompt (so concurrent clients on a
    loaded machine are grouped for sure)."""
    from .conftest import free_port, start_engine, stop_engine, wait_healthy

    port = free_port()
    log = tmp_path_factory.mktemp("fanout_engine") / "engine.log"
    proc = start_engine(["--port", str(port), "--threads", "1", "--fanout-wait-ms", "3000"], log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, log)
        yield base
    finally:
        stop_engine(proc)


def test_http_requests_of_one_prompt_share_one_prefill_and_answer_as_alone(fanout_server):
    """Three presses of one prompt sent concurrently are served by one fan-out prefill
    (kv_press_applied.shared_prefill true, shared with 3) and decode in one batch; the same requests sent one
    at a time get their own prefill ("alone") and the same answers and kept counts."""
    import threading

    import httpx

    kvs = [{"method": "snapkv", "compression_ratio": 0.5}, {"method": "knorm", "compression_ratio": 0.25},
           {"method": "adakv_snapkv", "compression_ratio": 0.5}]

    def post(kv):
        r = httpx.post(fanout_server + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6,
                                                                "ignore_eos": True, "kv_press": kv}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    alone = [post(kv) for kv in kvs]
    assert [a["kv_press_applied"]["shared_prefill"] for a in alone] == [False] * 3
    assert {a["kv_press_applied"]["shared_prefill_reason"] for a in alone} == {"alone"}

    got: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, post(kvs[i]))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, a in enumerate(alone):
        s = got[i]["kv_press_applied"]
        assert (s["shared_prefill"], s["shared_prefill_with"], s["shared_prefill_reason"]) == (True, 3, None), s
        assert got[i]["choices"][0]["text"] == a["choices"][0]["text"]
        for k in ("kv_tokens_after", "kv_tokens_held", "kv_tokens_masked", "kv_bytes_after", "compression_ratio"):
            assert s[k] == a["kv_press_applied"][k], k
