"""Side venvs with an engine's own CLI parser: `<engine>==<version of its engine.yaml tag>` installed --no-deps,
plus the exact closure of what its argcheck.py imports (engines/<name>/argcheck-requirements.txt, also --no-deps)
and the CPU torch wheel. Cached outside .venv, keyed by engine, version and the requirements file, so CI
builds one once per pin and reuses it afterwards:

    ~/.cache/kvt/argcheck/<engine>-<version>-<sha of requirements + torch pin>/     ($KVT_ARGCHECK_CACHE overrides)

Standard library only, so .ci/run can provision before the harness venv exists:

    python3 tests/engines/sidevenv.py vllm sglang      # build (or reuse) and print each venv's python
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"          # the same pin as the Makefile: the CPU wheel on this kind of machine
TAG_VERSION = re.compile(r"^v?(\d+(?:\.\d+)+(?:\.post\d+)?)")


class SideVenvError(RuntimeError):
    pass


def engine_dir(engine: str) -> Path:
    return REPO / "engines" / engine


def pinned_version(engine: str) -> str:
    """The engine package version an engine.yaml `tag:` names: v0.33.0 → 0.33.0, v0.5.23-cu130 → 0.5.23."""
    text = (engine_dir(engine) / "engine.yaml").read_text(encoding="utf-8")
    m = re.search(r"^tag:\s*['\"]?([^\s'\"#]+)", text, re.M)
    if not m:
        raise SideVenvError(f"engines/{engine}/engine.yaml: no tag")
    v = TAG_VERSION.match(m.group(1))
    if not v:
        raise SideVenvError(f"engines/{engine}/engine.yaml: tag {m.group(1)!r} names no package version")
    return v.group(1)


def requirements_file(engine: str) -> Path:
    return engine_dir(engine) / "argcheck-requirements.txt"


def cache_root() -> Path:
    env = os.environ.get("KVT_ARGCHECK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvt" / "argcheck"


def venv_dir(engine: str) -> Path:
    req = requirements_file(engine)
    if not req.is_file():
        raise SideVenvError(f"{req.relative_to(REPO)} is missing")
    key = hashlib.sha256(req.read_bytes() + TORCH.encode()).hexdigest()[:12]
    return cache_root() / f"{engine}-{pinned_version(engine)}-{key}"


def python_of(d: Path) -> Path:
    return d / "bin" / "python"


def _pip(py: Path, *args: str, log) -> None:
    cmd = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
        raise SideVenvError(f"pip install {' '.join(args)} failed:\n{tail}")
    log(f"  pip install {' '.join(args)}")


def ensure(engine: str, log=lambda s: print(s, file=sys.stderr, flush=True)) -> Path:
    """The side venv's python for `engine`, built now if the cache has none for these pins."""
    d = venv_dir(engine)
    done = d / ".complete"
    if done.is_file():
        return python_of(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f".{d.name}.lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)        # one builder per pin; the others wait and reuse it
        if done.is_file():
            return python_of(d)
        tmp = d.parent / f".{d.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        version = pinned_version(engine)
        log(f"argcheck side venv for {engine}=={version}: building {d}")
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(tmp)
            py = python_of(tmp)
            _pip(py, TORCH, log=log)
            _pip(py, "--no-deps", f"{engine}=={version}", log=log)
            _pip(py, "--no-deps", "-r", str(requirements_file(engine)), log=log)
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)                     # a venv's python finds its site-packages next to itself
            (d / ".complete").write_text(f"{engine}=={version}\n{TORCH}\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return python_of(d)


def main(argv: list[str]) -> int:
    for engine in argv or ["vllm", "sglang"]:
        try:
            print(f"{engine}: {ensure(engine)}")
        except SideVenvError as e:
            print(f"sidevenv: {engine}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
