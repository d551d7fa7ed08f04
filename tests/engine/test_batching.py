"""Continuous batching gives the same answers: every catalog method that can batch, mixed in one batch
(different prompt lengths, ratios, scopes, max_tokens; requests joining mid-decode and leaving early, one
cancelled) decodes token for token what it decodes alone. Tiny model, CPU, float32, in process.

Plus the incremental detokenizer against the full decode it replaces (text, streamed deltas, stop strings)."""

from __future__ import annotations

import random

import pytest

from .test_units import _complete

pytestmark = [pytest.mark.engine, pytest.mark.slow]

CONTEXT = ("The archive holds letters from 1850 to 1920. The red key opens the north door; the blue key opens "
           "the cellar. Anna wrote most letters in spring. ")
QUESTION = "Question: which key opens the cellar? Answer:"
ARTIFACT = {"qfilter", "kvzap", "duo_attention"}


@pytest.fixture(scope="module")
def eng():
    from .pipeline_ref import load_tiny

    return load_tiny()[0]


def _cases(eng):
    from kvpress_engine.methods import PressSpec, resolve_press_spec
    from kvpress_engine.presses import KINDS

    scopes = ["query_aware", "context_only", "kvpress_pipeline"]
    cases = []
    for i, name in enumerate(sorted(KINDS)):  # every press class (recipes are these with parameters)
        req = _complete(name)
        if "compression_ratio" in req:
            req["compression_ratio"] = (0.25, 0.5, 0.75)[i % 3]
        prompt = CONTEXT * (1 + i % 3) + QUESTION
        scope = "query_aware" if "question_start" in req else scopes[i % 3]  # finch: query_aware only
        qs = len(CONTEXT * (1 + i % 3))
        if scope != "query_aware":
            req["scope"] = scope
        if scope != "query_aware" or "question_start" in req:
            req["question_start"] = qs
        spec = resolve_press_spec(PressSpec(), req)
        if any(n.method in ARTIFACT for n in spec.tree.walk()):
            continue
        enc = eng.encode_completion(prompt, spec.question_start, scope == "kvpress_pipeline")
        mx = 2 if (spec.tree.phase() != "prefill" or spec.tree.memory() == "masks") else 2 + i % 5
        cases.append((name, spec, enc, mx))
    return cases


@pytest.mark.parametrize("mode,attn", [("eager", "matmul"), ("static", "sdpa"), ("static", "matmul")])
def test_batched_equals_alone_for_every_method(eng, mode, attn, monkeypatch):
    """eager: shapes from the host lengths; static: the CUDA graph's computation (whole capacity, device-side
    lengths, padded bucket rows) uncaptured, with either attention kernel."""
    from kvpress_engine.engine import Batch

    cancel_after = {"snapkv": 3}  # one request's client goes away mid-decode
    cases = [(n, s, e, mx + (10 if n in cancel_after else 0)) for n, s, e, mx in _cases(eng)]
    alone = {name: eng.generate(enc, spec, mx, ignore_eos=True) for name, spec, enc, mx in cases}
    monkeypatch.setattr(eng, "static_attn", attn)
    batch = Batch(eng, 6, mode)
    padded_steps = 0
    pending = list(cases)
    got, reasons, ragged_steps, mid_joins = {}, {}, 0, 0

    while pending or batch.active:
        # fill the free slots between two steps: later requests join sequences already mid-decode
        while pending and not batch.full():
            name, spec, enc, mx = pending.pop(0)
            counter = {"n": 0}

            def cancelled(name=name, counter=counter):
                counter["n"] += 1
                return name in cancel_after and counter["n"] > cancel_after[name]

            act = eng.prefill(enc, spec, mx, ignore_eos=True,
                              cancelled=cancelled)
            act.name = name
            if act.done:
                got[name] = eng.result(act)
            elif act.batch_reason is None:
                mid_joins += any(len(a.gen) > 1 for a in batch.active)
                batch.join(act)
            else:
                reasons[name] = act.batch_reason
                eng.decode_alone(act)
                got[name] = eng.result(act)
        if batch.active:
            c = batch.cache
            if c.n > 1 and (c.lens[:, : c.n].min(axis=1) != c.lens[:, : c.n].max(axis=1)).any():
                ragged_steps += 1
            padded_steps += c.bucket(c.n) > c.n
            for a in batch.step():
                got[a.name] = eng.result(a)

    assert set(got) == set(alone)
    for name, res in got.items():
        ref = alone[name]
        if name in cancel_after:
            assert res.token_ids == ref.token_ids[: len(res.token_ids)] and len(res.token_ids) < len(ref.token_ids)
            continue
        assert res.token_ids == ref.token_ids, name
        assert res.text == ref.text, name
        assert res.applied["batched"] == (name not in reasons)
        assert res.applied["decode_step"] == (mode if name not in reasons else "alone"), name
        assert res.applied["kv_tokens_final"] == ref.applied["kv_tokens_final"], name
    batched = [n for n in got if n not in reasons]
    assert {"full", "snapkv", "pyramidkv", "streamingllm", "knorm", "expected_attention", "finch", "think",
            "simlayerkv", "observed_attention", "per_layer", "chunkkv", "merging"} <= set(batched)
    assert max(got[n].applied["batch_size_max"] for n in batched) == 6
    assert ragged_steps > 5 and mid_joins > 5  # rows of different lengths really shared steps
    assert padded_steps > 0 or mode == "eager"  # bucket padding rows (length 0) rode along in static steps
    # decoding-time and head-wise masking presses decode alone, and say why
    assert {"decoding", "kvzip", "cam", "dms"} <= set(reasons)
    for name, res in got.items():
        a = res.applied
        alone_expected = a["phase"] != "prefill" or (a["memory"] == "masks" and not a["skipped"])
        assert a["batched"] != alone_expected, (name, a["phase"], a["memory"])
    assert all(not got[n].applied["batched"] and got[n].applied["batched_reason"] for n in reasons)


def test_pyramidkv_question_in_one_pass_equals_token_by_token(eng):
    """The per-layer causal mask (kvt_ragged) gives the question prefill of a PyramidKV cache what feeding
    the question one token at a time gives (the engine's earlier way)."""
    import torch
    from kvpress_engine.batch import ATTN_NAME, use_attention
    from kvpress_engine.build import build_press
    from kvpress_engine.methods import PressSpec, resolve_press_spec
    from transformers import DynamicCache

    spec = resolve_press_spec(PressSpec(), {"method": "pyramidkv", "compression_ratio": 0.5})
    ids = eng.tokenizer.encode(CONTEXT * 6 + QUESTION)
    split = len(eng.tokenizer.encode(CONTEXT * 6))
    x = torch.tensor([ids])
    outs = []
    for one_pass in (True, False):
        built = build_press(spec.tree, 0.5, n_layers=eng.n_layers)
        cache = DynamicCache()
        with torch.inference_mode():
            with built.press(eng.model):
                eng.model.model(input_ids=x[:, :split], past_key_values=cache)
            lens = [cache.get_seq_length(i) for i in range(len(cache))]
            assert len(set(lens)) > 1
            pos = torch.arange(split, len(ids))[None]
            if one_pass:
                with use_attention(eng.model, ATTN_NAME):
                    out = eng.model(input_ids=x[:, split:], past_key_values=cache, position_ids=pos)
                outs.append(out.logits[0])
            else:
                rows = [eng.model(input_ids=x[:, j:j + 1], past_key_values=cache, position_ids=pos[:, j - split:j - split + 1]
                                  ).logits[0, -1] for j in range(split, len(ids))]
                outs.append(torch.stack(rows))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


# ------------------------------------------------------------------------------------------------ graph steps


def _decode_in(eng, batch, reqs):
    """Decode (spec, prompt, max_tokens) requests together in ``batch``; their results in order."""
    from kvpress_engine.engine import Encoded

    acts = []
    for spec, ids, mx in reqs:
        act = eng.prefill(Encoded(ids, None), spec, mx, ignore_eos=True)
        batch.join(act)
        acts.append(act)
    out = {}
    while batch.active:
        for a in batch.step():
            out[id(a)] = eng.result(a)
    return [out[id(a)] for a in acts]


def _reqs(eng):
    from kvpress_engine.methods import PressSpec, resolve_press_spec

    return [(resolve_press_spec(PressSpec(), kv), eng.tokenizer.encode(CONTEXT * k + QUESTION), mx)
            for kv, k, mx in [({"method": "full"}, 1, 6), ({"method": "snapkv", "compression_ratio": 0.5}, 3, 4),
                              ({"method": "pyramidkv", "compression_ratio": 0.25}, 2, 5)]]


def test_graph_steps_without_cuda_fall_back_to_static_steps_with_the_same_answers(eng):
    """A batch told to capture CUDA graphs on a machine without CUDA (the capture really fails) says why, goes
    on in static steps, and answers what decoding alone answers."""
    from kvpress_engine.engine import Batch, Encoded

    reqs = _reqs(eng)
    alone = [eng.generate(Encoded(ids, None), spec, mx, ignore_eos=True) for spec, ids, mx in reqs]
    batch = Batch(eng, 4, "graph")
    got = _decode_in(eng, batch, reqs)
    assert batch.mode == "static" and batch.mode_reason.startswith("capture failed:")
    assert batch.graphs.captures == 0
    for res, ref in zip(got, alone):
        assert res.token_ids == ref.token_ids
        assert res.applied["decode_step"] == "static"


def test_step_modes_resolve_by_device_and_the_cli_refuses_graphs_on_cpu():
    import torch
    from kvpress_engine.batch import resolve_step_mode
    from kvpress_engine.cli import parse_args

    assert resolve_step_mode("auto", torch.device("cpu")) == "eager"
    assert resolve_step_mode("auto", torch.device("cuda")) == "graph"
    assert resolve_step_mode("static", torch.device("cpu")) == "static"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_step_mode("graph", torch.device("cpu"))
    with pytest.raises(ValueError, match="step mode must be one of"):
        resolve_step_mode("fast", torch.device("cpu"))
    assert parse_args([]).decode_step == "auto" and parse_args([]).static_attn == "matmul"
    with pytest.raises(SystemExit) as e:
        parse_args(["--device", "cpu", "--decode-step", "graph"])
    assert e.value.code == 2


def test_fused_blocks_are_swapped_in_for_static_steps_only_and_answer_the_same(eng):
    """torch.compile'd norms/MLPs/rotary replace transformers' own for a static step and are put back after;
    a fused static batch decodes what decoding alone decodes (CPU float32: inductor's CPU backend)."""
    import sys

    from kvpress_engine.batch import Fused
    from kvpress_engine.engine import Batch, Encoded

    model = eng.model
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rotary = modeling.apply_rotary_pos_emb
    fused = Fused(model)
    n_layers = eng.n_layers
    assert len(fused.swaps) == 2 * n_layers + 1 + n_layers + 1  # 2 norms per layer + final norm, MLPs, rotary
    with fused:
        assert model.model.norm.forward.func is not None and modeling.apply_rotary_pos_emb is not rotary
    assert "forward" not in model.model.norm.__dict__ and modeling.apply_rotary_pos_emb is rotary

    reqs = _reqs(eng)
    alone = [eng.generate(Encoded(ids, None), spec, mx, ignore_eos=True) for spec, ids, mx in reqs]
    eng.fuse, eng._fused = True, fused
    try:
        got = _decode_in(eng, Batch(eng, 4, "static"), reqs)
    finally:
        eng.fuse, eng._fused = False, None
    assert [r.token_ids for r in got] == [r.token_ids for r in alone]
    assert "forward" not in model.model.layers[0].mlp.__dict__ and modeling.apply_rotary_pos_emb is rotary


# ------------------------------------------------------------------------------------------------ detokenizer


def _old_way(tok, ids, stops):
    """What the engine did before: decode everything at every token, search the stops in all of it."""
    gen, text = [], ""
    for t in ids:
        gen.append(t)
        text = tok.decode(gen, skip_special_tokens=True)
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                return text[:cut], True
    return text, False


@pytest.mark.parametrize("seed", range(4))
def test_incremental_detokenizer_is_exact(eng, seed):
    from kvpress_engine.detok import Detokenizer

    tok = eng.tokenizer
    rng = random.Random(seed)
    texts = ["naïve café — 東京タワー 🎉🎉 ok", "def f(x):\n    return x  # ∑", "Ünïcödé   spaces\t\ttabs 😀👍🏽!",
             "The cellar key is blue. The END.", " leading space and 2+2=4"]
    ids = []
    for _ in range(6):
        ids += tok.encode(rng.choice(texts), add_special_tokens=False)
    ids += [rng.randrange(tok.vocab_size) for _ in range(40)]  # arbitrary ids, byte pieces included
    if tok.eos_token_id is not None:
        ids.insert(rng.randrange(len(ids)), tok.eos_token_id)  # a special token inside: skipped
    for stops in ([], ["END"], ["key", "🎉"], ["\n    "]):
        deltas: list[str] = []
        d = Detokenizer(tok, stops, deltas.append)
        stopped = False
        for t in ids:
            if d.push(t):
                stopped = True
                break
        text = d.finish()
        ref, ref_stopped = _old_way(tok, ids, stops)
        assert (text, stopped) == (ref, ref_stopped), (stops, text, ref)
        assert "".join(deltas) == text
        if stops:
            hold = max(len(s) for s in stops) - 1
            # no streamed piece was ever ahead of what could still start a stop string (checked by the
            # concatenation above; the held tail goes out at finish)
            assert hold >= 0
