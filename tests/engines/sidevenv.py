"""Side venvs with an engine's own CLI parser: `<engine>==<version of its engine.yaml tag>` installed --no-deps,
plus the exact closure of what its argcheck.py imports (engines/<name>/argcheck-requirements.txt, also --no-deps)
and the CPU torch wheel. Cached outside .venv, keyed by engine, version and the requirements file, so CI
builds one once per pin and reuses it afterwards:

    ~/.cache/kvt/argcheck/<engine>-<version>-<sha of requirements + torch pin>/     ($KVT_ARGCHECK_CACHE overrides)

A version other than the engine.yaml tag's (a matrix cell with `tag: "0.26.0"`) has its own closure in
engines/<name>/argcheck-requirements-<version>.txt.

Standard library only, so .ci/run can provision before the harness venv exists:

    python3 tests/engines/sidevenv.py [vllm sglang==0.5.23 ...]   # build (or reuse) each; default: every requirements file
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
    try:
        return version_of_tag(m.group(1))
    except SideVenvError as e:
        raise SideVenvError(f"engines/{engine}/engine.yaml: {e}") from None


def version_of_tag(tag: str) -> str:
    v = TAG_VERSION.match(tag)
    if not v:
        raise SideVenvError(f"tag {tag!r} names no package version")
    return v.group(1)


def requirements_file(engine: str, version: str | None = None) -> Path:
    if version is None or version == pinned_version(engine):
        return engine_dir(engine) / "argcheck-requirements.txt"
    return engine_dir(engine) / f"argcheck-requirements-{version}.txt"


def cache_root() -> Path:
    env = os.environ.get("KVT_ARGCHECK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvt" / "argcheck"


def venv_dir(engine: str, version: str | None = None) -> Path:
    version = version or pinned_version(engine)
    req = requirements_file(engine, version)
    if not req.is_file():
        raise SideVenvError(f"{req.relative_to(REPO)} is missing")
    key = hashlib.sha256(req.read_bytes() + TORCH.encode()).hexdigest()[:12]
    return cache_root() / f"{engine}-{version}-{key}"


def python_of(d: Path) -> Path:
    return d / "bin" / "python"


def _pip(py: Path, *args: str, log) -> None:
    cmd = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
        raise SideVenvError(f"pip install {' '.join(args)} failed:\n{tail}")
    log(f"  pip install {' '.join(args)}")


def ensure(engine: str, version: str | None = None, log=lambda s: print(s, file=sys.stderr, flush=True)) -> Path:
    """The side venv's python for `engine`==`version` (default: its engine.yaml tag), built now if the cache
    has none for these pins."""
    version = version or pinned_version(engine)
    d = venv_dir(engine, version)
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
        log(f"argcheck side venv for {engine}=={version}: building {d}")
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(tmp)
            py = python_of(tmp)
            _pip(py, TORCH, log=log)
            _pip(py, "--no-deps", f"{engine}=={version}", log=log)
            _pip(py, "--no-deps", "-r", str(requirements_file(engine, version)), log=log)
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)                     # a venv's python finds its site-packages next to itself
            (d / ".complete").write_text(f"{engine}=={version}\n{TORCH}\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return python_of(d)


def main(argv: list[str]) -> int:
    """ARGV: engine or engine==version (default: every engine with a requirements file, every version)."""
    todo = [tuple(a.split("==", 1)) if "==" in a else (a, None) for a in argv]
    if not todo:
        for req in sorted((REPO / "engines").glob("*/argcheck-requirements*.txt")):
            rest = req.stem.removeprefix("argcheck-requirements")
            todo.append((req.parent.name, rest[1:] if rest else None))
    for engine, version in todo:
        try:
            print(f"{engine}{'==' + version if version else ''}: {ensure(engine, version)}")
        except SideVenvError as e:
            print(f"sidevenv: {engine}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
