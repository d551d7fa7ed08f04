"""The report on a 40-cell study (tests/report/synth_study.py: vLLM/SGLang KV dtypes, kvpress presses × ratios
and budgets, a masked-not-freed press, a context_only cell, an incomplete cell; 7 LongBench tasks × 4 bins),
analysed by the real `analyze()`: the headline heatmap is legible at 40 rows (no text box overlaps another,
measured with matplotlib's renderer), every figure uses one colour per method, transitions get bootstrap
intervals, memory is what the engine held, LongBench numbers follow LongBench's conventions, provenance and
`kvt report --compare` work end to end."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from kv_transition.cli import main
from kv_transition.db import connect
from kv_transition.report import plots
from kv_transition.report.build import write_report
from kv_transition.report.data import load_report_data
from tests.report.synth_study import make_study_db


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("runs")
    (root / "synth40").mkdir()
    db = root / "synth40" / "kv_transition.sqlite"
    info = make_study_db(db, attention_backend="FLASH_ATTN")
    conn = connect(db)
    data = load_report_data(conn, db_path=str(db))
    conn.close()
    return root, db, info, data


def test_heatmap_is_legible_at_40_rows(study, monkeypatch: pytest.MonkeyPatch):
    _, _, info, data = study
    assert len(data.cells) == 40
    fig, tips = plots.heatmap_figure(data)
    boxes = plots.text_boxes(fig)
    from matplotlib.text import Text

    labelled = {t.get_gid().split("-")[-1] for t in fig.findobj(Text) if t.get_text().strip()
                and (t.get_gid() or "").startswith(("hm-rowlabel-", "hm-method-"))}
    assert len(labelled) == 40                               # every cell's row carries a label
    assert len(tips) == 40 * len(data.bins)                  # one tooltip per cell × bin
    assert plots.overlapping_texts(fig) == []
    assert min(size for _, size, _ in boxes) >= 6.5           # nothing printed smaller than 6.5 pt
    # every row label is on its own row: the pitch between consecutive labels exceeds the text height
    labels = sorted((b for t, _, b in boxes if re.fullmatch(r"(r|b)=\S+|kv=\S+", t)), key=lambda b: -b.y0)
    pitch = min(a.y0 - b.y0 for a, b in zip(labels, labels[1:]))
    assert pitch > 1.3 * max(b.height for b in labels)
    import matplotlib.pyplot as plt

    plt.close(fig)
    # the check is not vacuous: squeezing the rows makes labels collide
    monkeypatch.setattr(plots, "ROW_H", 0.08)
    tight, _ = plots.heatmap_figure(data)
    assert plots.overlapping_texts(tight)
    plt.close(tight)


def test_rows_grouped_engine_method_knob_and_transition_outlined(study):
    _, _, info, data = study
    order = [(c["engine"], c["is_baseline"], c["method"]) for c in data.ordered_cells()]
    engines = [e for e, _, _ in order]
    assert engines == sorted(engines)                                   # grouped by engine
    for e in set(engines):
        sub = [o for o in order if o[0] == e]
        assert sub[0][1] is True and sum(o[1] for o in sub) == 1         # its baseline first
        assert [o[2] for o in sub[1:]] == sorted(o[2] for o in sub[1:])  # then methods in order
    snap = [c["knob"] for c in data.ordered_cells() if c["method"] == "snapkv" and c["kv_scope"] == "query_aware"]
    assert snap == ["r=0.25", "r=0.5", "r=0.75", "r=0.9", "b=512", "b=1024", "b=4096"]
    svg = plots.heatmap_svg(data)
    assert svg.count("<title>") == 40 * len(data.bins) and "http" not in svg.replace("http://www.w3.org", "")
    n_trans = sum(1 for c in data.cells if not c["is_baseline"] and data.transitions[c["cell_id"]]["bin_id"] is not None)
    assert svg.count('id="hm-transition-') == n_trans > 20
    # a tooltip carries the CI and the baseline
    assert re.search(r"relative to full cache 0\.\d+ \[95% CI 0\.\d+, [01]\.\d+\], \d+ paired; baseline 0\.\d+", svg)


def test_one_colour_per_method_everywhere(study):
    _, _, _, data = study
    st = plots.style_of(data)
    methods = sorted({c["method"] for c in data.cells if not c["is_baseline"]})
    colours = [st.colour(m) for m in methods]
    assert len(set(colours)) == len(colours)                 # 14 methods, 14 colours (no cycle repeat)
    assert st.colour("full", True) not in colours            # the baseline is never a method's colour
    knobs = {c["knob"] for c in data.cells if c["knob"]}
    assert len({str(st.linestyle(k)) + st.marker(k) for k in knobs}) == len(knobs)
    assert plots.style_of(data) == st                        # deterministic
    from matplotlib.colors import to_rgb

    def lum(c: str) -> float:
        r, g, b = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in to_rgb(c)]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    # method names are printed in their colour: legible on white (WCAG contrast ≥ 3)
    assert min(1.05 / (lum(c) + 0.05) for c in colours) >= 3.0


def test_transition_intervals_and_beyond_the_longest_bin(study):
    _, _, info, data = study
    by_label = {c["label"]: c for c in data.cells}
    never = by_label["vllm/fp8_e4m3"]                        # modelled without a transition
    assert data.transitions[never["cell_id"]]["bin_id"] is None
    lo, hi, p_none = data.intervals[never["cell_id"]]
    assert hi == float("inf") and p_none > 0.5
    mid = by_label["kvpress/snapkv r=0.25"]                  # modelled transition ~9k tokens
    t = data.transitions[mid["cell_id"]]
    lo, hi, _ = data.intervals[mid["cell_id"]]
    assert lo <= t["tokens"] <= hi and 4000 < t["tokens"] < 16000
    # stronger compression breaks earlier (the curve this tool exists for)
    toks = [data.transitions[by_label[f"kvpress/snapkv r={r}"]["cell_id"]]["tokens"] for r in ("0.25", "0.5", "0.75")]
    assert toks == sorted(toks, reverse=True)


def test_memory_is_what_the_engine_held(study):
    _, _, info, data = study
    by_label = {c["label"]: c for c in data.cells}
    full = data.memory[by_label["kvpress/full"]["cell_id"]]
    r05 = data.memory[by_label["kvpress/snapkv r=0.5"]["cell_id"]]
    masked = data.memory[by_label["kvpress/adakv_masked r=0.5"]["cell_id"]]
    for b in (0, 1, 2, 3):
        assert r05[b]["held"] == pytest.approx(full[b]["held"] * 0.5, rel=0.01)
        assert masked[b]["masked"] is True and masked[b]["held"] == pytest.approx(full[b]["held"], rel=0.001)
        assert r05[b]["masked"] is False
    assert by_label["kvpress/adakv_masked r=0.75"]["masked"] and not by_label["kvpress/tova r=0.5"]["masked"]
    # vLLM reports no bytes: fp8 is estimated at half of the same model's full-precision bytes per token
    fp8 = data.memory[by_label["vllm/fp8_e4m3"]["cell_id"]][2]
    full_v = data.memory[by_label["vllm/full"]["cell_id"]][2]
    assert fp8["source"].startswith("derived") and fp8["held"] == pytest.approx(full_v["held"] * 0.5, rel=0.01)
    assert data.memory[by_label["vllm/int4_per_token_head"]["cell_id"]][2]["held"] == pytest.approx(
        full_v["held"] * 0.25, rel=0.01)
    assert plots.pareto_front([(1, 0.2), (2, 0.1), (3, 0.5), (4, 0.5), (5, 0.9)]) == [(1, 0.2), (3, 0.5), (5, 0.9)]


def test_longbench_numbers_follow_longbench(study):
    _, db, info, data = study
    import sqlite3

    conn = sqlite3.connect(db)
    cid = next(c["cell_id"] for c in data.cells if c["label"] == "kvpress/snapkv r=0.5")
    q = conn.execute("SELECT s.task, s.score, e.meta_json FROM scores s JOIN examples e USING (example_id)"
                     " WHERE s.cell_id=?", (cid,)).fetchall()
    conn.close()
    import json

    per: dict[str, list[float]] = {}
    e_rng: dict[str, list[float]] = {}
    cat: dict[str, str] = {}
    lang: dict[str, str] = {}
    for task, score, meta in q:
        m = json.loads(meta)
        per.setdefault(task, []).append(score)
        key = "0-4k" if m["length"] < 4000 else "4-8k" if m["length"] < 8000 else "8k+"
        e_rng.setdefault(key, [])
        e_rng.setdefault(f"{task}:{key}", []).append(score)
        cat[task], lang[task] = m["category"], m["language"]
    lb = data.longbench[cid]
    task_scores = {t: round(100 * sum(v) / len(v), 2) for t, v in per.items()}
    assert lb["tasks"] == task_scores
    # English avg: mean over categories of the mean of their English + code tasks (the leaderboard's Avg)
    cats: dict[str, list[float]] = {}
    for t, s in task_scores.items():
        if lang[t] in ("en", "code"):
            cats.setdefault(cat[t], []).append(s)
    expect_en = sum(sum(v) / len(v) for v in cats.values()) / len(cats)
    assert lb["avg"]["en"] == pytest.approx(expect_en, abs=0.01) and set(lb["avg"]) == {"en", "zh"}
    assert lb["macro"] == pytest.approx(sum(task_scores.values()) / len(task_scores), abs=0.01)
    v = e_rng["qasper:4-8k"]
    assert lb["e"]["qasper"]["4-8k"] == round(100 * sum(v) / len(v), 2)
    # per-task transitions exist for each task of a compressed cell
    assert {t for (c, t) in data.task_transitions if c == cid} == set(per)


def test_report_files_provenance_and_tasks(study, tmp_path: Path):
    _, _, info, data = study
    files = write_report(data, tmp_path / "report")
    html = files.html.read_text()
    for sid in ("heatmap", "transitions", "per-method", "memory", "tasks", "latency", "bins", "provenance"):
        assert f"id='s-{sid}'" in html
    assert "id='longbench'" in html and "id='longbench-e'" in html and "id='task-transitions'" in html
    assert html.count("masked, not freed</span>") == 2
    prov = list(csv.DictReader((tmp_path / "report" / "provenance.csv").open()))
    assert len(prov) == 40
    v = next(r for r in prov if r["cell"].startswith("vllm.fp8_e4m3"))
    assert v["image"].startswith("vllm/image:1.0@sha256:") and v["attention_backend"] == "FLASH_ATTN"
    assert v["kv_dtype"] == "fp8_e4m3" and v["git_sha"] == "0123abcd" and v["model_revision"] == "0e9e39f"
    assert "--kv-cache-dtype fp8_e4m3" in v["args"] and v["config_hash"].startswith("sha256:")
    tasks = list(csv.DictReader((tmp_path / "report" / "tasks.csv").open()))
    assert len({r["task"] for r in tasks}) == 7
    assert {p.name for p in files.pngs} == {"heatmap.png", "transition_vs_budget.png", "score_small_multiples.png",
                                             "memory_pareto.png", "task_heatmap.png", "latency_vs_length.png"}


def test_single_longbench_task_still_gets_longbench_numbers(tmp_path: Path):
    db = tmp_path / "one" / "kv_transition.sqlite"
    db.parent.mkdir()
    make_study_db(db, n_cells=12, group="one", per_task_bin=3, n_boot=50, tasks=("hotpotqa",))
    conn = connect(db)
    data = load_report_data(conn)
    conn.close()
    assert data.tasks == ["hotpotqa"] and not data.task_stats
    files = write_report(data, tmp_path / "report")
    html = files.html.read_text()
    assert "id='longbench'" in html and "id='longbench-e'" in html and "id='task-transitions'" not in html
    assert "task_heatmap.png" not in {p.name for p in files.pngs}
    full = next(c for c in data.cells if c["label"] == "kvpress/full")
    assert set(data.longbench[full["cell_id"]]["avg"]) == {"en"}


def test_attention_backend_read_only_when_the_column_exists(tmp_path: Path):
    db = tmp_path / "g" / "kv_transition.sqlite"
    db.parent.mkdir()
    make_study_db(db, n_cells=12, group="g", per_task_bin=2, n_boot=50)
    conn = connect(db)
    data = load_report_data(conn)
    conn.close()
    by_label = {c["label"]: c for c in data.cells}
    assert by_label["vllm/fp8"]["provenance"]["attention_backend"] is None          # no column, no report
    assert by_label["kvpress/full"]["provenance"]["attention_backend"] == "sdpa (kv_press_applied)"


def test_kvt_report_compare(study, tmp_path: Path, small_synthetic: Path, capsys: pytest.CaptureFixture):
    root, db, info, _ = study
    (root / "after").mkdir(exist_ok=True)
    make_study_db(root / "after" / "kv_transition.sqlite", group="after", shift=1.5, git_sha="fedcba98",
                  n_cells=38)
    c = ["-c", str(small_synthetic), "-o", f"output.runs_root={root}"]
    assert main(["report", *c, "--compare", "synth40", "after"]) == 0
    out = capsys.readouterr().out
    assert "compared 38 matched cell(s) (2 only in synth40, 0 only in after)" in out
    page = root / "compare" / "synth40-vs-after" / "index.html"
    html = page.read_text()
    assert "id='compare'" in html and "id='provenance-diff'" in html and "id='unmatched'" in html
    assert "fedcba98" in html and "0123abcd" in html                   # git sha changed and shown
    rows = list(csv.DictReader((page.parent / "compare.csv").open()))
    snap = [r for r in rows if r["label"] == "kvpress/snapkv r=0.25" and r["bin_label"] == "16k+"][0]
    assert float(snap["delta"]) > 0.1 and snap["ci_disjoint"] == "True"  # later transition → better at 16k+
    assert "git_sha" in snap["provenance_changed"]
    assert (page.parent / "delta_heatmap.png").stat().st_size > 10_000
    # a .sqlite path works as an operand, a missing group is one clear line and exit 2
    assert main(["report", *c, "--compare", str(db), "after", "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "index.html").is_file()
    capsys.readouterr()
    assert main(["report", *c, "--compare", "synth40", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compare nope: no database for group 'nope'" in err
