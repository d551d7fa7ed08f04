"""No secret at rest, none printed: planted secrets in engine.env (config), in a matrix's engine env,
and in the host env passed through (engine.yaml passthrough_env) reach the engine, yet appear in no
row of a full `sqlite3 .dump`, no file under runs/, and no command output."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess

from .conftest import q, write_yaml

CFG_SECRETS = {"HF_TOKEN": "hf_plantedCfgSecret1", "MY_API_KEY": "sk-plantedCfgSecret2"}
MATRIX_SECRET = ("OTHER_SECRET", "plantedMatrixSecret4")
HOST_SECRET = ("FAKE_PASSTHRU_TOKEN", "plantedHostSecret3")
ALL = [*CFG_SECRETS.values(), MATRIX_SECRET[1], HOST_SECRET[1]]


def _dump(db) -> str:
    if shutil.which("sqlite3"):
        return subprocess.run(["sqlite3", str(db), ".dump"], capture_output=True, text=True, check=True).stdout
    c = sqlite3.connect(db)
    try:
        return "\n".join(c.iterdump())
    finally:
        c.close()


def test_planted_secrets_are_nowhere_at_rest_or_in_output(project) -> None:
    p = project(n=3, engine={"env": {**CFG_SECRETS, "PLAIN_SETTING": "visible-value"}})
    host = {HOST_SECRET[0]: HOST_SECRET[1]}
    matrix = write_yaml(p.root / "mx" / "m.yaml", {
        "name": "m", "engines": {"fakekv": {"methods": {"snapkv": {"compression_ratios": [0.5]}},
                                            "env": {MATRIX_SECRET[0]: MATRIX_SECRET[1]}}}})
    outputs = []
    for argv in (p.run_args(), ["resolve", "-c", str(p.config), "--print-config"], ["validate", "-c", str(p.config)],
                 ["matrix", "plan", "-c", str(p.config), "-m", str(matrix)],
                 ["matrix", "plan", "-c", str(p.config), "-m", str(matrix), "--json"],
                 ["matrix", "run", "-c", str(p.config), "-m", str(matrix), "--no-live"],
                 ["score", "-c", str(p.config), "-q"], ["analyze", "-c", str(p.config)],
                 ["report", "-c", str(p.config)]):
        res = p.kvt(*argv, env=host)
        assert res.returncode == 0, (argv, res.stderr)
        outputs.append(res.stdout + res.stderr)
    # the engine got them (the secret is for the engine) — proven by the masked record of what it got
    envs = [r["env_json"] for r in q(p.db, "SELECT env_json FROM engine_instances")]
    assert envs and all('"HF_TOKEN": "***"' in e and f'"{HOST_SECRET[0]}": "***"' in e for e in envs)
    assert any(f'"{MATRIX_SECRET[0]}": "***"' in e for e in envs)
    cfg_json = q(p.db, "SELECT config_json FROM cells ORDER BY created_at LIMIT 1")[0]["config_json"]
    assert '"HF_TOKEN":"***"' in cfg_json and "visible-value" in cfg_json  # masking is targeted

    dump = _dump(p.db)
    assert "INSERT INTO" in dump and "responses" in dump
    files = [f for f in (p.root / "runs").rglob("*") if f.is_file()]
    assert any(f.suffix == ".log" for f in files) and any(f.suffix == ".html" for f in files)
    for secret in ALL:
        assert secret not in dump, f"{secret} in the DB dump"
        for f in files:
            assert secret.encode() not in f.read_bytes(), f"{secret} in {f}"
        for out in outputs:
            assert secret not in out, f"{secret} printed"
