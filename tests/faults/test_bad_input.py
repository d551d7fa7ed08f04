"""Each bad input of issue 10, through the CLI entry point: exit 2, ONE line naming the file (or the
`-o` override / the flag it came from), the key path and a suggestion — and nothing written: no DB
row, no manifest, no log, no engine started."""

from __future__ import annotations

from pathlib import Path

import pytest

from kv_transition.cli import main

from .conftest import one_error_line, q, tree_state, write_yaml


@pytest.fixture
def cli(project, monkeypatch: pytest.MonkeyPatch):
    """→ (project, call(*argv) → (rc, the one error line or '')) with cwd and env of the project."""
    p = project(n=3)
    monkeypatch.chdir(p.root)
    for k in ("KVT_ENGINES_DIR", "KVT_STATE_DIR", "KVT_DB_BUSY_TIMEOUT_S"):
        monkeypatch.setenv(k, p.env[k])

    def call(*argv: str, capsys=None) -> tuple[int, str]:
        rc = main(list(argv))
        err = capsys.readouterr().err if capsys else ""
        return rc, (one_error_line(err) if rc == 2 and capsys else err)

    return p, call


def _unchanged(p, before) -> None:
    assert tree_state(p.root) == before, "a bad input wrote something"
    assert not p.engine_pids(), "a bad input started an engine"


RUN_FLAGS = [
    (["--method", "snapkv", "--ratio", "1.5"], "--method snapkv --ratio 1.5: --ratio: 1.5 is outside [0, 1)"),
    (["--method", "snapkv", "--budget", "0"], "--budget: 0 is not a positive token count"),
    (["--method", "snapkv", "--budget=-5"], "--budget: -5 is not a positive token count"),
    (["--method", "snapkv"], "--method snapkv: kv.method: fakekv/snapkv needs a compression ratio or a budget "
                             "(add --ratio R or --budget N)"),
    (["--method", "full", "--ratio", "0.5"], "--ratio: method fakekv/full does not take a compression_ratio"),
    (["--method", "snapkvv", "--ratio", "0.5"], "has no method 'snapkvv'"),
    (["--engine", "nope"], "--engine nope: engine.name: unknown engine 'nope'"),
]


@pytest.mark.parametrize("flags, expected", RUN_FLAGS, ids=[" ".join(f) for f, _ in RUN_FLAGS])
def test_run_flags_are_validated_before_any_engine_or_row(cli, capsys, flags, expected) -> None:
    p, call = cli
    before = tree_state(p.root)
    rows_before = q(p.db, "SELECT COUNT(*) n FROM cells")[0]["n"]
    rc, line = call("run", "-c", str(p.config), "-q", *flags, capsys=capsys)
    assert rc == 2 and expected in line, line
    assert q(p.db, "SELECT COUNT(*) n FROM cells")[0]["n"] == rows_before == 0
    _unchanged(p, before)


def test_missing_local_model_path_fails_validate_prepare_and_run(cli, capsys) -> None:
    p, call = cli
    before = tree_state(p.root)
    for cmd in ("validate", "prepare", "run"):
        rc, line = call(cmd, "-c", str(p.config), "-o", "model.path=/nonexistent/model-dir", capsys=capsys)
        assert rc == 2, cmd
        assert line.startswith("kvt: error: -o model.path=/nonexistent/model-dir: model.path: "
                               "'/nonexistent/model-dir' does not exist"), line
    _unchanged(p, before)
    # a Hub id is not a local path: it passes (the engine resolves it)
    assert call("validate", "-c", str(p.config), "-o", "model.path=HuggingFaceTB/SmolLM2-135M")[0] == 0


def test_config_file_errors_are_one_line_naming_file_key_and_suggestion(cli, capsys, tmp_path: Path) -> None:
    p, call = cli
    before = tree_state(p.root)
    base = p.config.name
    cases = {
        "dup.yaml": (f"extends: {base}\nkv: {{method: full, method: snapkv}}\n",
                     "dup.yaml:2: duplicate key 'method'"),
        "dup2.yaml": (f"extends: {base}\nexperiment:\n  group_id: a\nexperiment:\n  name: b\n",
                      "dup2.yaml:4: duplicate key 'experiment' (first set on line 2; keep one)"),
        "typo.yaml": (f"extends: {base}\nengine:\n  hots: 127.0.0.1\n",
                      "typo.yaml: engine.hots: unknown key (did you mean 'host'?)"),
        "syntax.yaml": (f"extends: {base}\nkv: [full\n", "syntax.yaml:3: invalid YAML: "),
    }
    for name, (text, expected) in cases.items():
        f = p.config.parent / name
        f.write_text(text)
        before[str(f.relative_to(p.root))] = tree_state(p.root)[str(f.relative_to(p.root))]
        rc, line = call("validate", "-c", str(f), capsys=capsys)
        assert rc == 2 and expected in line and str(f) in line, line
    rc, line = call("validate", "-c", str(p.config), "-o", "experimnt.group_id=x", capsys=capsys)
    assert rc == 2 and line == ("kvt: error: -o experimnt.group_id=x: experimnt: unknown key "
                                "(did you mean 'experiment'?)")
    rc, line = call("validate", "-c", str(p.config), "-o", "db.path=/tmp/elsewhere.sqlite", capsys=capsys)
    assert rc == 2 and line.startswith("kvt: error: -o db.path=/tmp/elsewhere.sqlite: db.path: ") \
        and "outside output.runs_root" in line
    _unchanged(p, before)


MATRICES = {
    "no_knob": ("name: m\nengines:\n  fakekv:\n    methods: [full, snapkv]\n",
                "m.yaml: engines.fakekv.methods.snapkv: fakekv/snapkv needs a compression ratio or a budget"),
    "bad_budgets": ("name: m\nengines:\n  fakekv:\n    methods: [full, snapkv]\n    budgets: [0, -5]\n",
                    "m.yaml: engines.fakekv.budgets: budgets must be positive token counts (got [0, -5])"),
    "bad_ratio": ("name: m\nengines:\n  fakekv:\n    methods: {snapkv: {compression_ratios: [1.5]}}\n",
                  "m.yaml: engines.fakekv.methods.snapkv.compression_ratios: compression ratios must lie in [0, 1)"),
    "syntax": ("name: m\nengines:\n  fakekv:\n    methods: [full, snapkv\n", "m.yaml:5: invalid YAML: "),
    "typo": ("name: m\nengines:\n  fakekv:\n    methds: [full]\n",
             "m.yaml: engines.fakekv.methds: unknown key (did you mean 'methods'?)"),
    "dup": ("name: m\nengines:\n  fakekv:\n    methods: [full]\n  fakekv:\n    methods: [snapkv]\n",
            "m.yaml:5: duplicate key 'fakekv' (first set on line 3; keep one)"),
    "method": ("name: m\nengines:\n  fakekv:\n    methods: [ful]\n",
               "m.yaml: engines.fakekv.methods.ful: 'fakekv' has no method 'ful' (did you mean 'full'?"),
}


@pytest.mark.parametrize("name", list(MATRICES))
def test_matrix_errors_are_one_line_naming_the_matrix_file(cli, capsys, name) -> None:
    p, call = cli
    text, expected = MATRICES[name]
    m = write_yaml(p.root / "mx" / "m.yaml", {})
    m.write_text(text)
    before = tree_state(p.root)
    for cmd in ("plan", "run"):
        rc, line = call("matrix", cmd, "-c", str(p.config), "-m", str(m), capsys=capsys)
        assert rc == 2 and expected in line and str(m) in line, (cmd, line)
    _unchanged(p, before)


def test_report_score_analyze_with_nothing_to_work_on_exit_2(cli, capsys) -> None:
    p, call = cli  # prepared: a manifest, no runs
    before = tree_state(p.root)
    for cmd, expected in (("report", "nothing to report"), ("score", "nothing to score"),
                          ("analyze", "nothing to analyze")):
        rc, line = call(cmd, "-c", str(p.config), capsys=capsys)
        assert rc == 2 and line.startswith(f"kvt: error: {p.db}: {expected}"), line
    _unchanged(p, before)
    assert not (p.db.parent / "report").exists()
