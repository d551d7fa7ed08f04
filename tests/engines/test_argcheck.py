"""Every launch command proven by the engine's own parser.

Every method of every catalog with an `argcheck:` (vLLM, SGLang) and every cell of every shipped matrix
(config/matrix/*.yaml) is rendered through the harness's own resolution (engines.spec.resolve for the
catalog, matrix.expand for the matrices: the exact spec.args the runtime would launch) and parsed by the
engine's argcheck.py — vLLM's `vllm serve` parser + AsyncEngineArgs + CacheConfig, SGLang's
prepare_server_args — in a side venv with `<engine>==<tag version>` (tests/engines/sidevenv.py).

Outside CI a side venv that cannot be built skips with the reason; with KVT_REQUIRE_ARGCHECK=1 (.ci/run) it
fails instead."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from kv_transition.config import load_config
from kv_transition.engines.spec import engines_root, list_engines, load_engine, resolve
from kv_transition.matrix import expand, load_matrix
from tests.engines import sidevenv

REPO = Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("KVT_REQUIRE_ARGCHECK") == "1"
CHECKED = ("vllm", "sglang")   # engines with an argcheck; each has engines/<name>/argcheck-requirements.txt


@dataclass(frozen=True)
class Launch:
    where: str          # "catalog vllm/fp8_e4m3" or "matrix llama8b_kv_sweep cell 1a2b… (vllm/full)"
    argv: list[str]     # spec.args: what follows the engine's command words
    version: str        # the engine version the cell runs (spec.tag: the engine.yaml tag or the cell's engine.tag)


def catalog_launches(engine: str) -> list[Launch]:
    eng = load_engine(engine)
    out = []
    for method, m in eng.methods.items():
        spec = resolve(eng, method, model_path="/models/Llama-3.1-8B-Instruct", served_model="llama",
                       port=8123, dtype="bfloat16", max_context=32768, tensor_parallel=1)
        out.append(Launch(f"catalog {engine}/{method}", spec.args, sidevenv.version_of_tag(spec.tag)))
    return out


def matrix_launches(engine: str) -> list[Launch]:
    cfg = load_config(str(REPO / "config" / "default.yaml"), [])
    out = []
    for path in sorted((REPO / "config" / "matrix").glob("*.yaml")):
        if path.name.endswith(".lock.yaml"):
            continue
        exp = expand(cfg, load_matrix(str(path)))
        for c in exp.cells:
            if c.engine == engine:
                out.append(Launch(f"matrix {exp.matrix.name} cell {c.cell_id} ({c.label})", c.spec.args,
                                  sidevenv.version_of_tag(c.spec.tag)))
    return out


@functools.lru_cache(maxsize=None)
def launches_by_version() -> dict[tuple[str, str], list[Launch]]:
    """(engine, version) → every launch of that engine version: each is parsed by THAT version's parser."""
    out: dict[tuple[str, str], list[Launch]] = {}
    for engine in CHECKED:
        for x in catalog_launches(engine) + matrix_launches(engine):
            out.setdefault((engine, x.version), []).append(x)
    return out


PAIRS = sorted(launches_by_version())


def run_batch(py: Path, engine: str, argvs: list[list[str]]) -> list[dict]:
    script = engines_root() / engine / load_engine(engine).argcheck.script
    r = subprocess.run([str(py), str(script), "--kvt-batch"], input=json.dumps(argvs), capture_output=True,
                       text=True, timeout=1200, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, f"{engine} argcheck broke (rc {r.returncode}): {r.stderr.strip()[-2000:]}"
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(argvs), f"{engine} argcheck answered {len(rows)} of {len(argvs)}: {r.stderr[-2000:]}"
    return rows


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{e}-{v}" for e, v in PAIRS])
def side(request: pytest.FixtureRequest) -> tuple[str, str, Path]:
    engine, version = request.param
    try:
        return engine, version, sidevenv.ensure(engine, version)
    except Exception as e:  # noqa: BLE001 - pip/network/disk: skip outside CI, fail in it
        reason = f"argcheck side venv for {engine}=={version} could not be built: {e}"
        if REQUIRED:
            pytest.fail(f"KVT_REQUIRE_ARGCHECK=1 but {reason}", pytrace=False)
        pytest.skip(reason)


def test_every_engine_with_an_argcheck_is_checked():
    with_check = {n for n in list_engines() if load_engine(n).argcheck}
    assert with_check == set(CHECKED)
    for n in CHECKED:
        eng = load_engine(n)
        assert (engines_root() / n / eng.argcheck.script).is_file()
        assert sidevenv.requirements_file(n).is_file()
    assert sidevenv.pinned_version("vllm") == load_engine("vllm").tag.removeprefix("v")
    assert load_engine("sglang").tag.startswith("v" + sidevenv.pinned_version("sglang") + "-")
    for engine, version in PAIRS:   # a matrix cell on another version needs that version's parser closure
        assert sidevenv.requirements_file(engine, version).is_file(), (engine, version)
    assert ("vllm", "0.33.0") in PAIRS and ("sglang", "0.5.23") in PAIRS

def test_every_catalog_method_and_matrix_cell_parses(side: tuple[str, str, Path]):
    engine, version, py = side
    launches = launches_by_version()[(engine, version)]
    if version == sidevenv.pinned_version(engine):
        assert len(launches) >= len(load_engine(engine).methods)
    rows = run_batch(py, engine, [x.argv for x in launches])
    rejected = [f"{x.where}: {r['error']}" for x, r in zip(launches, rows) if r["rc"] != 0]
    assert not rejected, (f"{len(rejected)} launch command(s) rejected by {engine} {version}'s own parser:\n"
                          + "\n".join(rejected))
    # what the parser understood is what the catalog meant (not just "it did not crash")
    for x, r in zip(launches, rows):
        argv = x.argv
        if "--kv-cache-dtype" in argv:
            assert r["out"]["kv_cache_dtype"] == argv[argv.index("--kv-cache-dtype") + 1], x.where
        assert r["out"]["version"] == version


def test_the_parser_rejects_a_bad_kv_dtype_and_a_removed_flag(side: tuple[str, str, Path]):
    """The check can fail: a bad --kv-cache-dtype (argparse has no choices for it in vLLM: only CacheConfig
    rejects it) and a flag the pinned version does not have; the contract's one-argv mode exits 2 with
    ONE stderr line."""
    engine, version, py = side
    full = launches_by_version()[(engine, version)][0].argv
    i = full.index("--kv-cache-dtype") + 1
    bad_dtype = full[:i] + ["fp9_bogus"] + full[i + 1:]
    # vLLM 0.33 removed --calculate-kv-scales; any version rejects a flag it never had
    removed = full + (["--calculate-kv-scales"] if (engine, version) == ("vllm", "0.33.0") else ["--enable-kv-magic"])
    rows = run_batch(py, engine, [bad_dtype, removed])
    assert rows[0]["rc"] == 2 and "fp9_bogus" in rows[0]["error"], rows[0]
    assert rows[1]["rc"] == 2 and "unrecognized arguments" in rows[1]["error"], rows[1]
    script = engines_root() / engine / "argcheck.py"
    r = subprocess.run([str(py), str(script), *bad_dtype], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "fp9_bogus" in lines[0], r.stderr
    assert r.stdout.strip() == ""
