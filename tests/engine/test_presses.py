"""Every servable press end to end over HTTP on the tiny model (CPU), ratio 0.5, a 1,000-token prompt:
the KV entries each press keeps, checked against that press's own arithmetic (kvpress source), the whole
spec echoed, masked-not-freed presses reported as such, artifact presses' argument handling.

One engine process (the session server) serves them all; most requests decode one token (prefill only)."""

from __future__ import annotations

import pytest

from .conftest import Server
from .test_server import _error, post

pytestmark = [pytest.mark.engine, pytest.mark.slow]

N = 1000
R = 0.5
PROMPT = [100 + (i * 7919) % 40000 for i in range(N)]  # token ids: an exact length, no tokenizer needed
KEPT = max(1, int(N * (1 - R)))  # kvpress.utils.compute_n_kept


def run(server: Server, kv: dict, max_tokens: int = 1, prompt=PROMPT) -> dict:
    r = post(server, "/completions", {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "kv_press": kv})
    assert r.status_code == 200, r.text
    return r.json()["kv_press_applied"]


def freed(a: dict, kept: int = KEPT) -> None:
    assert a["kv_tokens_after"] == a["kv_tokens_held"] == kept, a
    assert a["kv_tokens_after_min"] == a["kv_tokens_after_max"] == kept
    assert a["memory"] == "frees" and a["masked"] is False and a["kv_tokens_masked"] == 0
    assert a["kv_bytes_after"] == a["kv_bytes_before"] // N * kept


def masked(a: dict, kept: int = KEPT) -> None:
    """AdaKV-style: the effective entries are the press's count, the tensors stay full size."""
    assert a["kv_tokens_after"] == kept and a["kv_tokens_held"] == N, a
    assert a["memory"] == "masks" and a["masked"] is True and a["kv_tokens_masked"] == N - kept
    assert a["kv_bytes_after"] == a["kv_bytes_before"]  # masked, not freed
    assert a["kv_bytes_effective"] == pytest.approx(a["kv_bytes_before"] / N * kept, rel=1e-6)


SCORERS = ["snapkv", "streamingllm", "observed_attention", "knorm", "tova", "expected_attention", "random", "keydiff",
           "lagkv", "cur", "leverage", "non_causal_attention", "compactor", "cap"]


@pytest.mark.parametrize("method", SCORERS)
def test_scorer_press(server: Server, method: str):
    a = run(server, {"method": method, "compression_ratio": R})
    freed(a)
    assert a["method"] == method and a["press"]["method"] == method and a["skipped"] is None
    assert a["attn_implementation"] == ("eager" if method == "observed_attention" else "sdpa")


# (kv_press, how the press keeps entries: "freed"/"masked" with a count, or a custom check)
def _per_layer():
    ratios = [0.25, 0.5, 0.75] * 10
    return ({"method": "per_layer", "compression_ratios": ratios, "inner": {"method": "knorm"}},
            lambda a: (a["kv_tokens_after_min"] == int(N * 0.25) and a["kv_tokens_after_max"] == int(N * 0.75)
                       and a["kv_tokens_after"] == round(sum(int(N * (1 - r)) for r in ratios) / 30)))


WRAPPED = {
    "adakv": ({"method": "adakv", "inner": {"method": "snapkv", "window_size": 16}, "compression_ratio": R},
              lambda a: masked(a) is None and a["press"] == {  # the whole tree echoed, defaults filled in
                  "method": "adakv", "alpha_safeguard": 0.2,
                  "inner": {"method": "snapkv", "window_size": 16, "kernel_size": 5}} and a["recipe"] is None),
    "critical_adakv": ({"method": "critical_adakv", "inner": {"method": "snapkv"}, "compression_ratio": R}, masked),
    "expected_attention_leaderboard": ({"method": "expected_attention_leaderboard", "compression_ratio": R},
                                       lambda a: masked(a) is None and a["recipe"] == "expected_attention_leaderboard"
                                       and a["press"]["inner"]["epsilon"] == 0.01),
    "adakv_compactor": ({"method": "adakv_compactor", "compression_ratio": R}, masked),
    "critical_adakv_expected_attention": ({"method": "critical_adakv_expected_attention", "compression_ratio": R},
                                          masked),
    "kvzip": ({"method": "kvzip", "compression_ratio": R},
              lambda a: a["kv_tokens_after"] == KEPT and a["kv_tokens_held"] == N and a["masked"]
              and a["kv_bytes_after"] == a["kv_bytes_before"]),
    "critical": ({"method": "critical", "inner": {"method": "snapkv"}, "compression_ratio": R}, freed),
    "critical_expected_attention": ({"method": "critical_expected_attention", "compression_ratio": R}, freed),
    "key_rerotation": ({"method": "key_rerotation", "inner": {"method": "knorm"}, "compression_ratio": R}, freed),
    "block_keydiff": ({"method": "block_keydiff", "compression_ratio": R}, freed),
    "merging_knorm": ({"method": "merging_knorm", "compression_ratio": R}, freed),
    "merging_snapkv": ({"method": "merging_snapkv", "compression_ratio": R}, freed),
    "finch": ({"method": "finch", "compression_ratio": R, "question_start": 900}, freed),
    # ChunkPress: each chunk keeps max(1, int(len * (1 - r))): 333, 333, 333, 1 → 166 * 3 + 1
    "chunk": ({"method": "chunk", "chunk_length": 333, "inner": {"method": "knorm"}, "compression_ratio": R},
              lambda a: freed(a, 166 * 3 + 1)),
    # ChunkKV: 33 whole chunks of 30 + one of 10 → int(34 * 0.5) = 17 chunks kept: 510 tokens, or 490 with the tail
    "chunkkv": ({"method": "chunkkv", "chunk_length": 30, "inner": {"method": "snapkv"}, "compression_ratio": R},
                lambda a: a["kv_tokens_after"] in (490, 510) and a["memory"] == "frees"),
    "chunkkv_leaderboard": ({"method": "chunkkv_leaderboard", "compression_ratio": R}, freed),  # 50 chunks of 20
    "composed": ({"method": "composed", "presses": [{"method": "snapkv"}, {"method": "knorm"}], "compression_ratio": R},
                 lambda a: freed(a, int(KEPT * (1 - R)))),
    "per_layer": _per_layer(),
    "pyramidkv": ({"method": "pyramidkv", "compression_ratio": R},
                  lambda a: abs(a["kv_tokens_after"] - KEPT) <= 0.05 * N
                  and a["kv_tokens_after_min"] < a["kv_tokens_after_max"]),
    # ThinK zeroes half the key channels: every token kept, nothing freed
    "think": ({"method": "think", "key_channel_compression_ratio": 0.5},
              lambda a: a["kv_tokens_after"] == N and a["memory"] == "zeroes" and a["masked"]
              and a["kv_bytes_after"] == a["kv_bytes_before"]),
    # SimLayerKV: a lazy layer keeps n_initial + n_recent - n_last = 4 + 256 - 1 tokens, the others all
    "simlayerkv": ({"method": "simlayerkv", "lazy_threshold": 0.5, "n_recent": 256},
                   lambda a: a["kv_tokens_after_min"] in (259, N) and a["kv_tokens_after_max"] in (259, N)),
    # DMS: entries older than the sliding window whose score is under the threshold are masked
    "dms": ({"method": "dms", "threshold": 0.0, "inner": {"method": "keydiff"}},
            lambda a: a["masked"] and a["kv_tokens_held"] == N and 128 <= a["kv_tokens_after"] < N),
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_wrapper_and_other_press(server: Server, name: str):
    kv, check = WRAPPED[name]
    a = run(server, kv)
    assert a["method"] == kv["method"] and a["skipped"] is None
    assert check(a) is not False, a
    assert a["prefill_s"] > 0


# decoding-time presses: the prefill keeps everything, generation compresses (ignore_eos, 3 tokens = 2 steps)
DECODING = {
    "decoding": ({"method": "decoding", "compression_interval": 1, "target_size": 400, "inner": {"method": "knorm"}},
                 N, 400),
    "cam": ({"method": "cam", "compression_interval": 1, "target_size": 400, "inner": {"method": "knorm"}}, N, 400),
    # CompressionRatioDecoding: to int(seen * (1 - r)) with seen = the last position + 1 = N + 2
    "compression_ratio_decoding": ({"method": "compression_ratio_decoding", "compression_interval": 1,
                                    "compression_ratio": R, "inner": {"method": "knorm"}}, N, int((N + 2) * (1 - R))),
    "prefill_decoding": ({"method": "prefill_decoding", "compression_ratio": R, "prefill": {"method": "snapkv"},
                          "decoding": {"method": "decoding", "compression_interval": 1, "target_size": 300,
                                       "inner": {"method": "knorm"}}}, KEPT, 300),
}


@pytest.mark.parametrize("name", list(DECODING))
def test_decoding_press(server: Server, name: str):
    kv, after, final = DECODING[name]
    a = run(server, kv, max_tokens=3)
    assert a["kv_tokens_after"] == after and a["kv_tokens_final"] == final, a
    assert a["phase"] in ("decode", "prefill+decode")


# ------------------------------------------------------------------------------------------------ artifacts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Local artifacts in kvpress's own on-disk formats, for the tiny model's shape (30 layers, 3 KV heads of
    64, hidden 576): what a user downloads from the Hub, made here with kvpress's classes (random weights)."""
    import torch
    from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
    from kvpress.presses.qfilter_press import QFilters

    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    QFilters(30, 3, 64).save_pretrained(root / "qfilt")
    KVzapModel(KVzapConfig(input_dim=576, output_dim=3, n_modules=30, hidden_dim=32)).save_pretrained(root / "kvzap")
    QFilters(4, 3, 64).save_pretrained(root / "qfilt_wrong_shape")
    duo = root / "duo"  # the duo-attention repo's attn_patterns/<model>/ layout
    duo.mkdir()
    (duo / "config.json").write_text('{"sink_size": 4, "recent_size": 64}')
    (duo / "full_attention_heads.tsv").write_text(
        "\n".join("\t".join(f"{((7 * layer + 3 * h) % 11) / 10:.2f}" for h in range(3)) for layer in range(30)))
    (root / "empty").mkdir()
    return root


def test_artifact_presses_run_from_local_paths(server: Server, artifacts):
    freed(run(server, {"method": "qfilter", "compression_ratio": R, "qfilter_path": str(artifacts / "qfilt")}))
    freed(run(server, {"method": "kvzap", "compression_ratio": R, "kvzap_path": str(artifacts / "kvzap")}))
    masked(run(server, {"method": "adakv", "compression_ratio": R,
                        "inner": {"method": "kvzap", "kvzap_path": str(artifacts / "kvzap")}}))
    # DuoAttention: round(90 heads * 0.5) = 45 streaming heads each keep sink 4 + recent 64 of the 1,000 tokens
    a = run(server, {"method": "duo_attention", "compression_ratio": R, "duo_attention_path": str(artifacts / "duo")})
    assert a["masked"] and a["kv_tokens_held"] == N and a["kv_bytes_after"] == a["kv_bytes_before"]
    assert a["kv_tokens_after"] == round(N - 45 * (N - 68) / 90)


@pytest.mark.parametrize("kv,param,fragment", [
    ({"method": "qfilter"}, "kv_press.qfilter_path", "needs qfilter_path"),
    ({"method": "qfilter", "qfilter_path": "/no/such/dir"}, "kv_press.qfilter_path", "no such directory"),
    ({"method": "qfilter", "qfilter_path": "EMPTY"}, "qfilter_path", "could not load Q-Filters"),
    ({"method": "qfilter", "qfilter_path": "WRONG"}, "qfilter_path", "this model needs (30, 3"),
    ({"method": "adakv", "inner": {"method": "kvzap", "kvzap_path": "/no/such"}}, "kv_press.inner.kvzap_path",
     "no such directory"),
    ({"method": "kvzap", "kvzap_path": "EMPTY"}, "kvzap_path", "could not load KVzap"),
    ({"method": "duo_attention"}, "kv_press.duo_attention_path", "needs duo_attention_path"),
    ({"method": "duo_attention", "duo_attention_path": "EMPTY"}, "duo_attention_path", "could not load a DuoAttention"),
])
def test_artifact_errors_are_400(server: Server, artifacts, kv, param, fragment):
    import json

    text = json.dumps(kv).replace("EMPTY", str(artifacts / "empty")).replace("WRONG", str(artifacts / "qfilt_wrong_shape"))
    body = {"prompt": PROMPT[:200], "max_tokens": 1, "kv_press": {**json.loads(text), "compression_ratio": R}}
    err = _error(post(server, "/completions", body), 400)
    assert err["param"] == param and fragment in err["message"] and "\n" not in err["message"]


def test_nested_errors_name_the_field_over_http(server: Server):
    body = {"prompt": "x", "kv_press": {"method": "adakv", "compression_ratio": R,
                                        "inner": {"method": "snapkv", "kernel_size": 4}}}
    err = _error(post(server, "/completions", body), 400)
    assert err["param"] == "kv_press.inner.kernel_size" and "odd" in err["message"]
