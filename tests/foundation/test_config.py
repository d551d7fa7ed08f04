"""Config layer: merge, env interpolation, overrides, validation messages, paths, CLI exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kv_transition.cli import main
from kv_transition.config import load_config, resolve_paths
from kv_transition.config.loader import deep_merge, interpolate, parse_override, read_dotenv
from kv_transition.errors import ConfigError
from tests.conftest import write_yaml


def test_deep_merge_mappings_merge_scalars_and_lists_replace():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    over = {"a": {"c": [3]}, "e": 2}
    assert deep_merge(base, over) == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # inputs untouched


def test_experiment_extends_default_deep_merge(repo_root: Path):
    cfg = load_config(repo_root / "config/experiments/snapkv_longbench.yaml", env={})
    assert cfg.dataset.source == "longbench"
    assert cfg.dataset.longbench.tasks == ["hotpotqa", "2wikimqa", "multifieldqa_en", "qasper"]
    assert cfg.kv.method == "snapkv" and cfg.kv.budget == 1024
    # untouched keys come from the base
    assert cfg.decoding.temperature == 0.0 and cfg.telemetry.interval_s == 0.25
    assert cfg.experiment.group_id == "snapkv_longbench"


def test_env_interpolation_and_defaults():
    env = {"A": "x", "PORT": "9001"}
    assert interpolate({"k": "${A}-${B:-y}"}, env, "", "f") == {"k": "x-y"}
    assert interpolate({"p": "${PORT}"}, env, "", "f") == {"p": 9001}  # whole-value keeps YAML type
    with pytest.raises(ConfigError, match=r"f: k: environment variable MISSING is not set"):
        interpolate({"k": "${MISSING}"}, env, "", "f")


def test_env_from_dotenv_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / ".env").write_text("# comment\nexport KVT_EXP_GROUP='from_dotenv'\nOTHER=1\n")
    assert read_dotenv(tmp_path / ".env") == {"KVT_EXP_GROUP": "from_dotenv", "OTHER": "1"}
    cfg_file = write_yaml(tmp_path / "c.yaml", {"experiment": {"group_id": "${KVT_EXP_GROUP}"}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KVT_EXP_GROUP", raising=False)
    assert load_config(cfg_file).experiment.group_id == "from_dotenv"
    monkeypatch.setenv("KVT_EXP_GROUP", "from_env")
    assert load_config(cfg_file).experiment.group_id == "from_env"


def test_missing_env_var_names_it(tmp_path: Path):
    f = write_yaml(tmp_path / "c.yaml", {"experiment": {"group_id": "${NOPE_NOT_SET}"}})
    with pytest.raises(ConfigError, match="experiment.group_id: environment variable NOPE_NOT_SET is not set"):
        load_config(f, env={})


def test_overrides_parse_yaml_scalars(repo_root: Path):
    assert parse_override("a.b.c=3") == (["a", "b", "c"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    cfg = load_config(repo_root / "config/default.yaml",
                      ["binning.n_per_bin=5", "kv.method=snapkv", "kv.compression_ratio=0.5"], env={})
    assert cfg.binning.n_per_bin == 5 and cfg.kv.method == "snapkv" and cfg.kv.compression_ratio == 0.5


@pytest.mark.parametrize("bad, msg", [
    ("novalue", "expected KEY.PATH=VALUE"),
    ("a..b=1", "bad key path"),
    ("a=[unclosed", "not a valid YAML scalar"),
])
def test_bad_override(bad: str, msg: str):
    with pytest.raises(ConfigError, match=msg):
        parse_override(bad)


@pytest.mark.parametrize("override, expected", [
    ("dataset.sourse=x", "dataset.sourse: unknown key (did you mean 'source'?)"),
    ("binning.edgs=[0]", "binning.edgs: unknown key (did you mean 'edges'?)"),
    ("experimnt.group_id=x", "experimnt: unknown key (did you mean 'experiment'?)"),
    ("binning.n_per_bin=abc", "binning.n_per_bin: Input should be a valid integer"),
    ("dataset.source=wikipedia", "dataset.source: Input should be 'synthetic', 'longbench' or 'longbench_v2'"),
    ("kv.compression_ratio=1.5", "kv.compression_ratio: Input should be less than 1"),
    ("binning.edges=[5, 10]", "binning: edges must be strictly increasing token counts starting at 0"),
    ("experiment.group_id=../escape", "experiment.group_id: '../escape' is not a safe identifier"),
    ("experiment.group_id=a/b", "experiment.group_id: 'a/b' is not a safe identifier"),
    ("dataset.synthetic.depths=[1.5]", "dataset.synthetic.depths: depths must be"),
])
def test_validation_messages_name_the_dotted_key(repo_root: Path, override: str, expected: str):
    with pytest.raises(ConfigError) as ei:
        load_config(repo_root / "config/default.yaml", [override], env={})
    assert expected in str(ei.value)
    # the error names the -o override it came from, not the file that never said it
    assert str(ei.value).startswith(f"-o {override}: ")
    assert "\n" not in str(ei.value)


def test_missing_required_key(tmp_path: Path):
    f = write_yaml(tmp_path / "c.yaml", {"dataset": {"source": "synthetic"}})
    with pytest.raises(ConfigError, match="experiment: required key is missing"):
        load_config(f, env={})


def test_wrong_type_and_bad_yaml(tmp_path: Path):
    f = write_yaml(tmp_path / "c.yaml", {"experiment": {"group_id": "g"}, "decoding": {"temperature": "hot"}})
    with pytest.raises(ConfigError, match="decoding.temperature: Input should be a valid number"):
        load_config(f, env={})
    g = tmp_path / "bad.yaml"
    g.write_text("experiment: {group_id: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(g, env={})
    h = tmp_path / "list.yaml"
    h.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(h, env={})


def test_extends_cycle_is_an_error(tmp_path: Path):
    write_yaml(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write_yaml(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="extends"):
        load_config(tmp_path / "a.yaml", env={})


def test_canonical_paths(repo_root: Path, tmp_path: Path):
    cfg = load_config(repo_root / "config/default.yaml", ["experiment.group_id=g1"], env={})
    p = resolve_paths(cfg, cwd=tmp_path)
    assert p.db == tmp_path / "runs" / "g1" / "kv_transition.sqlite"
    assert p.manifest == tmp_path / "data" / "processed" / p.dataset_id / "manifest.json"
    assert p.dataset_id.startswith("synthetic-")
    # dataset id depends on what the manifest depends on, not on e.g. the KV method
    cfg2 = load_config(repo_root / "config/default.yaml", ["experiment.group_id=g1", "kv.method=snapkv"], env={})
    assert resolve_paths(cfg2, cwd=tmp_path).dataset_id == p.dataset_id
    cfg3 = load_config(repo_root / "config/default.yaml", ["binning.seed=7"], env={})
    assert resolve_paths(cfg3, cwd=tmp_path).dataset_id != p.dataset_id


def test_db_path_outside_runs_root_is_refused(repo_root: Path, tmp_path: Path):
    cfg = load_config(repo_root / "config/default.yaml", ["db.path=/tmp/elsewhere.sqlite"], env={})
    with pytest.raises(ConfigError, match="db.path: .* is outside output.runs_root"):
        resolve_paths(cfg, cwd=tmp_path)


# --- CLI: exit codes, one line on stderr, nothing written -------------------------------------

def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv", [
    ["validate", "-c", "config/default.yaml", "-o", "dataset.sourse=x"],
    ["validate", "-c", "config/missing.yaml"],
    ["resolve", "-c", "config/default.yaml", "-o", "experiment.group_id=../x"],
    ["prepare", "-c", "config/default.yaml", "-o", "binning.edges=[3,1]"],
    ["prepare", "-c", "config/default.yaml", "-o", "nonsense"],
    ["validate"],
    ["frobnicate"],
])
def test_cli_bad_input_exit_2_one_line_nothing_written(project: Path, capsys: pytest.CaptureFixture, argv):
    before = _files(project)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvt: error: ") and err.count("\n") == 1, err
    assert _files(project) == before


def test_cli_validate_and_resolve_ok(project: Path, capsys: pytest.CaptureFixture):
    assert main(["validate", "-c", "config/default.yaml"]) == 0
    assert main(["resolve", "-c", "config/default.yaml", "-o", "experiment.group_id=abc"]) == 0
    out = capsys.readouterr().out
    assert f"db: {project / 'runs' / 'abc' / 'kv_transition.sqlite'}" in out
    assert f"run_dir: {project / 'runs' / 'abc'}" in out
    assert main(["resolve", "-c", "config/default.yaml", "--print-config"]) == 0
    assert '"group_id": "demo"' in capsys.readouterr().out
    assert not (project / "runs").exists()


def test_python_m_delegates_with_exit_code(project: Path):
    r = subprocess.run([sys.executable, "-m", "kv_transition", "validate", "-c", "config/default.yaml",
                        "-o", "kv.budget=0"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "kv.budget: Input should be greater than 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kv_transition", "validate", "-c", "config/default.yaml"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_import_has_no_side_effects(tmp_path: Path):
    code = "import kv_transition, kv_transition.cli, kv_transition.config, kv_transition.db, kv_transition.manifest.store"
    r = subprocess.run([sys.executable, "-c", code + "; import sys; print('torch' in sys.modules)"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    assert list(tmp_path.iterdir()) == []


def test_every_config_key_is_documented(repo_root: Path):
    """docs/config.md stays true: every key of the schema has a row."""
    from pydantic import BaseModel

    from kv_transition.config.schema import Config

    doc = (repo_root / "docs" / "config.md").read_text()
    missing = []

    def walk(m: type[BaseModel], prefix: str) -> None:
        for name, f in m.model_fields.items():
            sub = next((c for c in (f.annotation, *getattr(f.annotation, "__args__", ()))
                        if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
            elif f"`{prefix}{name}`" not in doc:
                missing.append(prefix + name)

    walk(Config, "")
    assert not missing, f"undocumented config keys: {missing}"
