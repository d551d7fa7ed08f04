"""`kvt lock`: every image tag of a matrix → its registry digest, in a lock file that plan/run use.

Resolution order per `image:tag`: the registry (`client.images.get_registry_data(ref).id`), then the
local image's RepoDigests (an image pulled from a registry), then — for images only built locally —
the local image id, marked `local:sha256:…` (reproducible on this host only; the runner keeps the
tag for those and the plan shows the marker). A tag that resolves nowhere is an error (exit 2).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from kv_transition import __version__
from kv_transition.engines.spec import load_engine
from kv_transition.errors import KvtError
from kv_transition.matrix.schema import MatrixFile, load_matrix

LOCAL = "local:"


class LockError(KvtError):
    """An image tag that cannot be resolved to a digest (exit 2)."""


def default_lock_path(matrix_path: str | Path) -> Path:
    p = Path(matrix_path)
    return p.with_name(p.name.split(".")[0] + ".lock.yaml")


def matrix_images(matrix: MatrixFile) -> list[str]:
    refs = []
    for name in matrix.engines:
        eng = load_engine(name)
        ref = f"{eng.image}:{eng.tag}"
        if ref not in refs:
            refs.append(ref)
    return refs


def resolve_image(client: Any, ref: str, registry: bool = True) -> dict[str, str]:
    """→ {digest, source}; source: registry | repo_digest | local. Raises LockError."""
    repo = ref.rsplit(":", 1)[0] if ":" in ref.split("/")[-1] else ref
    errors = []
    if registry:
        try:
            rd = client.images.get_registry_data(ref)
            if rd.id:
                return {"digest": rd.id, "source": "registry"}
        except Exception as e:  # noqa: BLE001 - unreachable registry, unknown repo, auth: fall back
            errors.append(f"registry: {' '.join(str(e).split())[:160]}")
    try:
        img = client.images.get(ref)
    except Exception as e:  # noqa: BLE001
        errors.append(f"local: {' '.join(str(e).split())[:120]}")
        raise LockError(f"image {ref}: cannot resolve a digest ({'; '.join(errors)})") from None
    for d in img.attrs.get("RepoDigests") or []:
        name, _, digest = d.partition("@")
        if name == repo or name.endswith("/" + repo):
            return {"digest": digest, "source": "repo_digest"}
    return {"digest": LOCAL + img.id, "source": "local"}


def make_lock(matrix_path: str | Path, client: Any = None, registry: bool = True,
              resolver: Optional[Callable[[Any, str], dict[str, str]]] = None) -> dict[str, Any]:
    matrix = load_matrix(matrix_path)
    if client is None and resolver is None:
        from kv_transition.runtime.docker import docker_client

        client = docker_client(timeout_s=30)
    res = resolver or (lambda c, r: resolve_image(c, r, registry=registry))
    images = {ref: res(client, ref) for ref in matrix_images(matrix)}
    text = Path(matrix_path).read_bytes()
    return {"format": "kv-transition/lock@1", "matrix": matrix.name,
            "matrix_sha256": hashlib.sha256(text).hexdigest(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "harness_version": __version__, "images": images}


def write_lock(lock: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("# written by `kvt lock`; plan/run pin images to these digests\n"
                 + yaml.safe_dump(lock, sort_keys=False))
    return p


def read_lock(path: Optional[str | Path]) -> Optional[dict[str, Any]]:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return None
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise KvtError(f"{p}: not a kvt lock file (no images mapping)")
    return data
