"""Download a dataset file once into ``<data_root>/raw/…``, with its sha256 recorded next to it.

The file lands at ``dest`` only complete (streamed to a temporary name in the same directory, hashed
while written, then renamed). A sidecar ``<dest>.source.json`` records the URL, the sha256, the size
and the time of the download; it is what :func:`recorded` returns and what the manifest cites. On reuse
the file is hashed again and checked against the record (and against a pinned ``expected`` digest), so a
truncated or swapped file is an error, not a silent different dataset.

A source that cannot be reached is one :class:`DataError` line naming the URL, the config key that set
it and the alternatives; nothing is left behind (no partial file, no empty directories).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

Progress = Callable[[str, int, Optional[int]], None]  # (stage, advance, total), as kvt prepare's

from kv_transition.errors import DataError

_CHUNK = 1 << 20


def sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".source.json")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def recorded(dest: Path) -> Optional[dict[str, Any]]:
    """The download record of ``dest`` (url, sha256, bytes, downloaded_at), or None."""
    try:
        rec = json.loads(sidecar(dest).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _check(dest: Path, url: str, key: str, expected: Optional[str]) -> dict[str, Any]:
    digest = sha256_file(dest)
    rec = recorded(dest)
    if rec is not None and rec.get("sha256") != digest:
        raise DataError(
            f"{dest}: sha256 {digest} differs from the {rec.get('sha256')} recorded when it was downloaded "
            f"from {rec.get('url')}; the file changed or is damaged: delete it to download it again"
        )
    if expected is not None and digest != expected:
        raise DataError(f"{dest}: sha256 {digest} is not the {expected} pinned by {key}.sha256 ({url})")
    if rec is None:  # a file placed here by hand: record what it is now
        rec = {"url": url, "sha256": digest, "bytes": dest.stat().st_size, "downloaded_at": None}
        _write_record(dest, rec)
    return rec


def _write_record(dest: Path, rec: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(rec, fh, indent=2, sort_keys=True)
    os.replace(tmp, sidecar(dest))


def fetch_once(
    url: str, dest: Path, *, key: str, alternatives: str, expected: Optional[str] = None, timeout: float = 60.0,
    progress: Optional[Progress] = None,
) -> Path:
    """``dest``, downloaded from ``url`` if it is not there yet; its sha256 recorded and checked.

    ``key`` names the config key that set ``url`` (for the error line); ``alternatives`` says what
    else the user can do when the URL cannot be reached. ``progress`` gets the bytes as they arrive
    (stage ``download <file name>``, total from Content-Length when the server sends one).
    """
    if dest.is_file():
        _check(dest, url, key, expected)
        return dest
    import httpx

    created: list[Path] = []
    d = dest.parent
    while not d.exists():
        created.append(d)
        d = d.parent
    tmp: Optional[str] = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as fh, httpx.stream("GET", url, follow_redirects=True, timeout=timeout) as r:
            r.raise_for_status()
            stage = f"download {dest.name}"
            length = r.headers.get("content-length")
            if progress is not None:
                progress(stage, 0, int(length) if length and length.isdigit() else None)
            for chunk in r.iter_bytes(_CHUNK):
                fh.write(chunk)
                h.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(stage, len(chunk), None)
        digest = h.hexdigest()
        if expected is not None and digest != expected:
            raise DataError(
                f"{url}: downloaded sha256 {digest} is not the {expected} pinned by {key}.sha256; nothing kept"
            )
        os.replace(tmp, dest)
        tmp = None
        _write_record(dest, {"url": url, "sha256": digest, "bytes": size,
                             "downloaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    except (httpx.HTTPError, httpx.InvalidURL, OSError, DataError) as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        for c in created:  # innermost first
            try:
                c.rmdir()
            except OSError:
                break
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot download {url} (set by {key}): {_one_line(e)}; {alternatives}") from None
    return dest
