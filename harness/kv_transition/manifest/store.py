"""The manifest: what will be sent, to the token. Written as manifest.json and, with the same
content, into SQLite; `verify` proves the two agree and that neither was edited."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from kv_transition.db import dumps, insert_many, rows, transaction, utcnow
from kv_transition.errors import ManifestError

FORMAT = "kv-transition/manifest@1"
_ENTRY_FIELDS = (
    "example_id", "task", "bin_id", "prompt", "chat", "add_special_tokens", "original_tokens",
    "final_tokens", "truncated", "max_new_tokens", "question_start",
)
_BOOL_FIELDS = ("chat", "add_special_tokens", "truncated")


def content_hash(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    return "sha256:" + hashlib.sha256(dumps(body).encode("utf-8")).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    out = dict(manifest)
    out["content_hash"] = content_hash(out)
    return out


def header(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in ("bins", "entries", "examples", "content_hash")}


def write_json(manifest: dict[str, Any], path: Path) -> None:
    """Atomic: a temp file in the same dir, fsync, rename. Never a half-written manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, ensure_ascii=False, sort_keys=True, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (run `kvt prepare` first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a {FORMAT} manifest")
    return data


def write_db(conn: sqlite3.Connection, manifest: dict[str, Any], manifest_path: Path, group_id: str) -> None:
    """Replace this dataset's rows with the manifest's, in one transaction."""
    dsid = manifest["dataset_id"]
    with transaction(conn):
        # children first: foreign keys are enforced
        for table in ("manifest_entries", "bins", "examples"):
            conn.execute(f"DELETE FROM {table} WHERE dataset_id = ?", (dsid,))
        conn.execute("DELETE FROM datasets WHERE dataset_id = ?", (dsid,))
        conn.execute(
            "INSERT INTO datasets(dataset_id, group_id, source, header_json, content_hash, manifest_path,"
            " n_examples, n_entries, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (dsid, group_id, manifest["dataset"]["source"], dumps(header(manifest)), manifest["content_hash"],
             str(manifest_path), len(manifest["examples"]), len(manifest["entries"]), utcnow()),
        )
        insert_many(conn, "examples", (
            {"dataset_id": dsid, "example_id": e["example_id"], "task": e["meta"].get("task", ""),
             "question": e["question"], "context": e["context"], "answers_json": dumps(e["answers"]),
             "meta_json": dumps(e["meta"])}
            for e in manifest["examples"]
        ))
        insert_many(conn, "bins", (
            {"dataset_id": dsid, **{k: b[k] for k in ("bin_id", "label", "lo", "hi", "n_candidates", "n_selected")}}
            for b in manifest["bins"]
        ))
        insert_many(conn, "manifest_entries", (
            {"dataset_id": dsid, "ordinal": i, **{k: (int(e[k]) if k in _BOOL_FIELDS else e[k]) for k in _ENTRY_FIELDS}}
            for i, e in enumerate(manifest["entries"])
        ))


def from_db(conn: sqlite3.Connection, dataset_id: str) -> dict[str, Any]:
    """Rebuild the manifest from SQLite (the inverse of write_db)."""
    ds = conn.execute("SELECT * FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()
    if ds is None:
        raise ManifestError(f"dataset {dataset_id!r} is not in the database (run `kvt prepare` first)")
    m = json.loads(ds["header_json"])
    m["bins"] = [
        {k: r[k] for k in ("bin_id", "label", "lo", "hi", "n_candidates", "n_selected")}
        for r in rows(conn, "SELECT * FROM bins WHERE dataset_id = ? ORDER BY bin_id", (dataset_id,))
    ]
    m["entries"] = [
        {k: (bool(r[k]) if k in _BOOL_FIELDS else r[k]) for k in _ENTRY_FIELDS}
        for r in rows(conn, "SELECT * FROM manifest_entries WHERE dataset_id = ? ORDER BY ordinal", (dataset_id,))
    ]
    m["examples"] = [
        {"example_id": r["example_id"], "question": r["question"], "context": r["context"],
         "answers": json.loads(r["answers_json"]), "meta": json.loads(r["meta_json"])}
        for r in rows(conn, "SELECT * FROM examples WHERE dataset_id = ? ORDER BY example_id", (dataset_id,))
    ]
    m["content_hash"] = ds["content_hash"]
    return m


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if type(a) is not type(b):
        return f"{path or '<root>'}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: present in only one"
            if a[k] != b[k]:
                return _first_difference(a[k], b[k], f"{path}.{k}" if path else k)
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {str(a)[:60]!r} vs {str(b)[:60]!r}"


def verify(path: Path, conn: sqlite3.Connection) -> dict[str, Any]:
    """Raise ManifestError on any mismatch; return a small summary when file and DB agree."""
    file_m = read_json(path)
    stated = file_m.get("content_hash")
    actual = content_hash(file_m)
    if stated != actual:
        raise ManifestError(f"{path}: content hash mismatch (file says {stated}, content is {actual}): edited or corrupted")
    db_m = from_db(conn, file_m["dataset_id"])
    if db_m["content_hash"] != stated:
        raise ManifestError(
            f"{path}: database holds {db_m['content_hash']} for {file_m['dataset_id']}, file holds {stated}"
        )
    db_actual = content_hash(db_m)
    if db_actual != stated:
        diff = _first_difference(
            {k: v for k, v in file_m.items() if k != "content_hash"},
            {k: v for k, v in db_m.items() if k != "content_hash"},
        )
        raise ManifestError(f"database copy of {file_m['dataset_id']} differs from {path}: first difference at {diff}")
    return {"dataset_id": file_m["dataset_id"], "content_hash": stated,
            "entries": len(file_m["entries"]), "examples": len(file_m["examples"])}
