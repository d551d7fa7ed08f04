"""DbWriter: the request loop never touches SQLite. Producers (the runner, the telemetry sampler)
enqueue rows; one thread owns a connection and commits whatever has accumulated in one transaction
(`executemany` per run of same-shaped statements). `flush()` waits until everything queued before it
is committed."""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from kv_transition.db import connect

_FLUSH = object()
_STOP = object()


class WriterError(RuntimeError):
    pass


class DbWriter:
    def __init__(self, db_path: str | Path, *, max_batch: int = 2000,
                 connect_fn: Optional[Callable[[], sqlite3.Connection]] = None):
        self.db_path = Path(db_path)
        self.max_batch = max_batch
        self._connect = connect_fn or (lambda: connect(self.db_path))
        self._q: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.errors: list[str] = []
        self.n_batches = 0
        self.n_statements = 0
        self.commit_s = 0.0
        self._sql_cache: dict[tuple[str, tuple[str, ...], str], str] = {}

    # --- producers (any thread, never block) ---
    def insert(self, table: str, row: dict[str, Any], *, verb: str = "INSERT") -> None:
        cols = tuple(row)
        key = (table, cols, verb)
        sql = self._sql_cache.get(key)
        if sql is None:
            sql = f"{verb} INTO {table} ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})"
            self._sql_cache[key] = sql
        self._q.put((sql, tuple(row.values())))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._q.put((sql, tuple(params)))

    def flush(self, timeout: Optional[float] = 60.0) -> None:
        ev = threading.Event()
        self._q.put((_FLUSH, ev))
        if self._thread is None:
            return
        if not ev.wait(timeout):
            raise WriterError(f"DB writer did not flush within {timeout}s")
        self.raise_errors()

    def raise_errors(self) -> None:
        if self.errors:
            raise WriterError("DB writer failed: " + "; ".join(self.errors[:3]))

    # --- lifecycle ---
    def start(self) -> "DbWriter":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvt-db-writer", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: Optional[float] = 120.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            self.start()
        self._q.put((_STOP, None))
        assert self._thread is not None
        self._thread.join(timeout)
        self.raise_errors()

    def __enter__(self) -> "DbWriter":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the thread ---
    def _loop(self) -> None:
        conn = self._connect()
        try:
            stop = False
            while not stop:
                batch = [self._q.get()]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._q.get_nowait())
                    except queue.Empty:
                        break
                waiters = []
                stmts: list[tuple[str, tuple[Any, ...]]] = []
                for sql, params in batch:
                    if sql is _FLUSH:
                        waiters.append(params)
                    elif sql is _STOP:
                        stop = True
                    else:
                        stmts.append((sql, params))
                if stmts:
                    self._commit(conn, stmts)
                for ev in waiters:
                    ev.set()
            # drain anything that raced the stop marker
            rest = []
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item[0] is _FLUSH:
                    item[1].set()
                elif item[0] is not _STOP:
                    rest.append(item)
            if rest:
                self._commit(conn, rest)
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, stmts: list[tuple[str, tuple[Any, ...]]]) -> None:
        t = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                i = 0
                while i < len(stmts):
                    sql = stmts[i][0]
                    j = i
                    while j < len(stmts) and stmts[j][0] == sql:
                        j += 1
                    conn.executemany(sql, [p for _, p in stmts[i:j]])
                    i = j
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            # one bad row must not lose the batch: replay statement by statement, keep the error
            self._replay(conn, stmts, e)
        self.n_batches += 1
        self.n_statements += len(stmts)
        self.commit_s += time.perf_counter() - t

    def _replay(self, conn: sqlite3.Connection, stmts: list[tuple[str, tuple[Any, ...]]], first: Exception) -> None:
        for sql, params in stmts:
            try:
                conn.execute(sql, params)
            except sqlite3.Error as e:
                if len(self.errors) < 100:
                    self.errors.append(f"{e} in {sql[:80]}")
