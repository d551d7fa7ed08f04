"""Analysis on synthetic score data with a known transition."""

from __future__ import annotations

import random

import pytest

from kv_transition.analysis.stats import (ScoreRow, bin_stats, bootstrap_mean_ci, find_transition,
                                          paired_ratio_ci)


def _rows(cell: str, acc_by_bin: dict[int, float], n: int = 40, seed: int = 0, tokens_per_bin: int = 1000):
    rng = random.Random(seed)
    out = []
    for b, acc in acc_by_bin.items():
        k = round(acc * n)
        scores = [1.0] * k + [0.0] * (n - k)
        rng.shuffle(scores)
        for i, s in enumerate(scores):
            out.append(ScoreRow(cell, f"ex{b}-{i}", b, s, tokens_per_bin * (b + 1)))
    return out


def test_known_transition_is_found_and_interpolated():
    base = _rows("full", {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    meth = _rows("snapkv", {0: 1.0, 1: 0.975, 2: 0.5, 3: 0.2})
    stats = bin_stats(base + meth, {"snapkv": "full", "full": "full"}, n_boot=500, seed=1)
    sk = [s for s in stats if s.cell_id == "snapkv"]
    assert [round(s.rel, 3) for s in sk] == [1.0, 0.975, 0.5, 0.2]
    t = find_transition(sk, threshold=0.95)
    assert t.bin_id == 2
    # crossing between bin 1 (rel .975 @ 2000 tok) and bin 2 (rel .5 @ 3000 tok): 2000 + (.025/.475)*1000
    assert t.tokens == pytest.approx(2000 + 1000 * 0.025 / 0.475)
    # the baseline against itself never transitions
    tf = find_transition([s for s in stats if s.cell_id == "full"], 0.95)
    assert tf.bin_id is None and tf.label == "no transition up to 4,000 tokens"


def test_drop_within_noise_is_not_a_transition():
    # 3 examples per bin: a single miss gives rel 0.667 but the CI still includes 1
    base = _rows("full", {0: 1.0, 1: 1.0}, n=3)
    meth = _rows("m", {0: 1.0, 1: 2 / 3}, n=3)
    st = [s for s in bin_stats(base + meth, {"m": "full"}, n_boot=2000, seed=0) if s.cell_id == "m"]
    assert st[1].rel == pytest.approx(2 / 3) and st[1].rel_ci_hi >= 1.0
    assert find_transition(st, 0.95).bin_id is None


def test_pairing_uses_only_common_examples_and_averages_repeats():
    base = [ScoreRow("full", "a", 0, 1.0, 10), ScoreRow("full", "b", 0, 0.0, 10)]
    meth = [ScoreRow("m", "a", 0, 1.0, 10), ScoreRow("m", "a", 0, 0.0, 10), ScoreRow("m", "c", 0, 1.0, 10)]
    (s,) = [x for x in bin_stats(base + meth, {"m": "full"}) if x.cell_id == "m"]
    assert s.n == 2 and s.n_paired == 1 and s.mean == pytest.approx(0.75)
    assert s.baseline_mean == 1.0 and s.rel == pytest.approx(0.5)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    rng = random.Random(3)
    vals = [rng.random() for _ in range(50)]
    a = bootstrap_mean_ci(vals, 1000, 7)
    assert a == bootstrap_mean_ci(vals, 1000, 7)
    assert a[0] < sum(vals) / len(vals) < a[1]
    assert bootstrap_mean_ci([0.4], 100, 0) == (0.4, 0.4)


def test_zero_baseline_gives_no_relative_score():
    assert paired_ratio_ci([1, 0], [0, 0], 100, 0) == (None, None, None)
    base = [ScoreRow("full", "a", 0, 0.0, 10)]
    meth = [ScoreRow("m", "a", 0, 0.0, 10)]
    st = [x for x in bin_stats(base + meth, {"m": "full"}) if x.cell_id == "m"]
    assert st[0].rel is None
    assert find_transition(st).reason == "no paired baseline scores"


def test_failing_from_the_shortest_bin_says_so():
    base = _rows("full", {0: 1.0, 1: 1.0})
    meth = _rows("m", {0: 0.0, 1: 0.0})
    st = [s for s in bin_stats(base + meth, {"m": "full"}, n_boot=200) if s.cell_id == "m"]
    t = find_transition(st)
    assert t.bin_id == 0 and t.tokens == 1000 and t.label == "≤ ~1,000 tokens (shortest bin)"
