"""The SQLite edge: one file per experiment group, WAL, foreign keys, idempotent migrations."""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from kv_transition.db.migrations import MIGRATIONS
from kv_transition.errors import KvtError

_SQLITE_MAGIC = b"SQLite format 3\x00"
LAST_PATH: list[str] = []  # the DB path most recently opened (for the CLI's one-line errors)


class DbError(KvtError):
    """A database that cannot be used: damaged, not a database, empty, or locked. CLI exit 2."""


def is_locked_error(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def describe_db_error(path: str | Path, e: BaseException, mid: bool = False) -> str:
    """The one line the CLI prints for an sqlite3 error on `path` (`mid`: found after the command began,
    so earlier committed transactions stand)."""
    if is_locked_error(e):
        return f"{path}: database is locked by another process (try again when it has finished)"
    if mid:
        return (f"{path}: database is damaged ({e}); the command stopped "
                f"(check it: sqlite3 {path} 'PRAGMA integrity_check')")
    return f"{path}: database is damaged ({e}); nothing was changed"


def check_file(p: Path) -> None:
    """Refuse, before SQLite touches it, a file that is empty, not an SQLite database, or shorter than
    its header says (truncated). A missing file is fine (it will be created)."""
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return
    wal = Path(str(p) + "-wal")
    if size == 0:
        if wal.is_file() and wal.stat().st_size > 0:
            return  # a WAL database whose pages have not been checkpointed yet
        raise DbError(f"{p}: is an empty file (0 bytes), not a kv-transition database; nothing was changed "
                      "(remove it, or point db.path elsewhere)")
    with open(p, "rb") as f:
        head = f.read(100)
    if not head.startswith(_SQLITE_MAGIC):
        raise DbError(f"{p}: is damaged (not an SQLite database file); nothing was changed")
    if len(head) < 100:
        raise DbError(f"{p}: is damaged (truncated to {size} bytes); nothing was changed")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    n_pages = int.from_bytes(head[28:32], "big")
    valid_for, change = head[92:96], head[24:28]
    if n_pages and valid_for == change and size < n_pages * page_size:
        raise DbError(f"{p}: is damaged (truncated: {size} bytes, its header says {n_pages * page_size}); "
                      "nothing was changed")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def dumps(obj: Any) -> str:
    """Canonical JSON for storage (sorted keys, no spaces, UTF-8 kept)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def default_busy_timeout_s() -> float:
    """How long a statement waits for another process's lock: $KVT_DB_BUSY_TIMEOUT_S, default 30 s."""
    import os

    try:
        return max(0.0, float(os.environ.get("KVT_DB_BUSY_TIMEOUT_S", "30")))
    except ValueError:
        return 30.0


def connect(path: str | Path, *, migrate_schema: bool = True, readonly: bool = False,
            busy_timeout_s: float | None = None) -> sqlite3.Connection:
    """Open (creating parent dirs) and migrate. Rows come back as sqlite3.Row. A damaged, foreign or
    empty file raises DbError before anything is written; a lock held longer than `busy_timeout_s`
    raises DbError too (SQLite retries with backoff meanwhile)."""
    p = Path(path)
    LAST_PATH[:] = [str(p)]
    check_file(p)
    if busy_timeout_s is None:
        busy_timeout_s = default_busy_timeout_s()
    if readonly:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=busy_timeout_s, check_same_thread=False)
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(p, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # reads the schema: a foreign file fails here
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if migrate_schema:
                migrate(conn)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise DbError(describe_db_error(p, e)) from None
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply the migrations not applied yet, each in its own transaction. Idempotent."""
    applied: list[int] = []
    schema_version(conn)  # creates schema_migrations
    # every version not applied yet, in version order: numbers are handed out to parallel branches, so a
    # lower one (5) can land after a higher one (7) — MAX(version) would skip it on DBs made in between
    done = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
    for version, name, script in sorted(MIGRATIONS, key=lambda m: m[0]):
        if version in done:
            continue
        with transaction(conn):
            for stmt in _statements(script):
                conn.execute(stmt)
            conn.execute(
                "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?,?,?)",
                (version, name, utcnow()),
            )
        applied.append(version)
    return applied


def _statements(script: str) -> Iterator[str]:
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, ROLLBACK on error (nothing half-written)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


def insert_many(
    conn: sqlite3.Connection, table: str, rows: Iterable[Mapping[str, Any]], *, replace: bool = False
) -> int:
    """Insert dict rows (all with the same keys). Returns the number of rows."""
    rows = list(rows)
    if not rows:
        return 0
    cols = list(rows[0].keys())
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    sql = f"{verb} INTO {table} ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})"
    conn.executemany(sql, [tuple(r[c] for c in cols) for r in rows])
    return len(rows)


def rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(sql, params).fetchall()]
