"""DbWriter: the request loop never touches SQLite.

Producers (the runner, the telemetry sampler) append operations to a deque: lock-free, no thread
wake-up per row. One thread owns a connection, wakes every `interval_s` (or when the backlog passes
`max_batch`, or on flush/close) and commits whatever has accumulated in ONE transaction, coalescing
same-shaped operations into multi-row statements:

- `insert(table, row)`            → INSERT INTO t (…) VALUES (…),(…),…
- `update(table, key, row)`       → WITH v(…) AS (VALUES …) UPDATE t SET … FROM v WHERE t.key = v.key
                                    (the last update of a key in a batch wins)
- `execute(sql, params)`          → as is; a barrier: nothing is reordered across it

Why: per-row wake-ups and per-row `executemany` steps each hand the GIL between the writer thread and
the event loop; on a CPU-bound loop every hand-off costs the loop a forced switch. Multi-row
statements make that one hand-off per table per batch. `flush()` waits until everything queued
before it is committed. A failing batch is replayed operation by operation so one bad row loses only
itself (its error is kept and raised by flush/close).

Another process holding the write lock (`database is locked`): the batch is retried with exponential
backoff for up to `lock_wait_s` (each try waits `busy_timeout_s` in SQLite's own busy handler), and
nothing is replayed row by row meanwhile. Telemetry and event rows are *droppable*: when they still
cannot be written (lock outlasting the wait, or a bad row) they are dropped — counted, and reported
in ONE `writer_dropped` event — and never raised, so a telemetry row can never fail a cell.
"""

from __future__ import annotations

import collections
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from kv_transition.db import connect
from kv_transition.db.core import is_locked_error

DROPPABLE_TABLES = ("telemetry_", "events")  # rows whose loss costs no answer (prefixes)

_FLUSH = "flush"
_STOP = "stop"
_INS = "i"
_UPD = "u"
_SQL = "s"


class WriterError(RuntimeError):
    pass


class DbWriter:
    def __init__(self, db_path: str | Path, *, max_batch: int = 5000, interval_s: float = 0.05,
                 connect_fn: Optional[Callable[[], sqlite3.Connection]] = None, lock_wait_s: float = 300.0,
                 busy_timeout_s: float = 1.0, context: tuple[Optional[int], Optional[str]] = (None, None)):
        self.db_path = Path(db_path)
        self.max_batch = max_batch
        self.interval_s = interval_s
        self.lock_wait_s = lock_wait_s
        self.busy_timeout_s = busy_timeout_s
        self.context = context  # (run_id, cell_id) of the writer_dropped event
        self._connect = connect_fn or (lambda: connect(self.db_path, busy_timeout_s=self.busy_timeout_s))
        self._q: "collections.deque[tuple[Any, ...]]" = collections.deque()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._max_vars = 999
        self.errors: list[str] = []
        self.n_batches = 0
        self.n_statements = 0   # operations committed (rows inserted/updated, statements executed)
        self.n_sql = 0          # SQL statements actually run
        self.commit_s = 0.0
        self.n_dropped = 0      # droppable rows (telemetry, events) given up on
        self.n_lock_waits = 0   # batches that had to wait out another process's write lock
        self._drop_reason: Optional[str] = None
        self._drop_reported = 0

    # --- producers (any thread, never block) ---
    def insert(self, table: str, row: dict[str, Any], *, verb: str = "INSERT") -> None:
        self._q.append((_INS, (table, tuple(row), verb), tuple(row.values())))
        if len(self._q) > self.max_batch:
            self._wake.set()

    def update(self, table: str, key: str, row: dict[str, Any]) -> None:
        """UPDATE table SET <row's other columns> WHERE key = row[key]."""
        self._q.append((_UPD, (table, key, tuple(row)), tuple(row.values())))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._q.append((_SQL, sql, tuple(params)))

    def flush(self, timeout: Optional[float] = 60.0) -> None:
        ev = threading.Event()
        self._q.append((_FLUSH, ev, None))
        self._wake.set()
        if self._thread is None:
            return
        if not ev.wait(timeout):
            raise WriterError(f"DB writer did not flush within {timeout}s")
        self.raise_errors()

    def raise_errors(self) -> None:
        if self.errors:
            raise WriterError("DB writer failed: " + "; ".join(self.errors[:3]))

    @property
    def backlog(self) -> int:
        return len(self._q)

    # --- lifecycle ---
    def start(self) -> "DbWriter":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvt-db-writer", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: Optional[float] = None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            self.start()
        self._q.append((_STOP, None, None))
        self._wake.set()
        assert self._thread is not None
        self._thread.join(timeout if timeout is not None else self.lock_wait_s + 60.0)
        if self._thread.is_alive():
            self.errors.append(f"DB writer still blocked after {self.lock_wait_s:.0f}s ({self.backlog} rows unwritten)")
        self.raise_errors()

    def __enter__(self) -> "DbWriter":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the thread ---
    def _open(self) -> Optional[sqlite3.Connection]:
        """Connect, waiting out a lock (migrations need the write lock) for up to lock_wait_s."""
        deadline = time.monotonic() + self.lock_wait_s
        delay = 0.05
        while True:
            try:
                return self._connect()
            except Exception as e:  # noqa: BLE001 - DbError (locked/damaged) or sqlite3.Error
                if "locked" not in str(e).lower() or time.monotonic() >= deadline:
                    self.errors.append(f"cannot open {self.db_path}: {e}")
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _loop(self) -> None:
        conn = self._open()
        if conn is None:  # nothing can be written: release every waiter, keep the error for close()
            while not self._closed or self._q:
                while self._q:
                    op = self._q.popleft()
                    if op[0] is _FLUSH:
                        op[1].set()
                if self._closed and not self._q:
                    break
                self._wake.wait(self.interval_s)
                self._wake.clear()
            return
        try:
            self._max_vars = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        except (AttributeError, sqlite3.Error):  # Python < 3.11
            self._max_vars = 999
        q = self._q
        try:
            stop = False
            while not stop:
                # sleep a full interval even when rows are waiting: a busy producer then costs one
                # commit per interval, not a commit loop fighting the event loop for the GIL.
                # insert() past max_batch, flush() and close() cut the sleep short.
                self._wake.wait(self.interval_s)
                self._wake.clear()
                todo = len(q)  # only what is here now: rows arriving meanwhile wait for the next wake
                while todo > 0 and not stop:
                    ops: list[tuple[Any, ...]] = []
                    waiters = []
                    while todo > 0 and len(ops) < self.max_batch:
                        op = q.popleft()
                        todo -= 1
                        if op[0] is _FLUSH:
                            waiters.append(op[1])
                            break  # commit what came before the marker, then release the waiter
                        if op[0] is _STOP:
                            stop = True
                            break
                        ops.append(op)
                    if ops:
                        self._commit(conn, ops)
                    for ev in waiters:
                        ev.set()
            rest = []  # anything that raced in after the stop marker still gets written
            while q:
                op = q.popleft()
                if op[0] is _FLUSH:
                    op[1].set()
                elif op[0] is not _STOP:
                    rest.append(op)
            if rest:
                self._commit(conn, rest)
            self._report_drops(conn)
        finally:
            conn.close()

    def _statements(self, ops: list[tuple[Any, ...]]) -> list[tuple[str, list[Any]]]:
        """Coalesce: segments between _SQL barriers, same-shaped ops grouped (first-seen order)."""
        out: list[tuple[str, list[Any]]] = []
        groups: dict[tuple[str, Any], list[tuple[Any, ...]]] = {}

        def emit_groups() -> None:
            for (kind, shape), vals in groups.items():
                if kind == _INS:
                    out.extend(self._insert_sql(shape, vals))
                else:
                    out.extend(self._update_sql(shape, vals))
            groups.clear()

        for kind, shape, vals in ops:
            if kind == _SQL:
                emit_groups()
                out.append((shape, list(vals)))
            else:
                groups.setdefault((kind, shape), []).append(vals)
        emit_groups()
        return out

    def _chunks(self, rows: list[tuple[Any, ...]], ncols: int) -> list[list[tuple[Any, ...]]]:
        per = max(1, min(500, self._max_vars // max(1, ncols)))
        return [rows[i:i + per] for i in range(0, len(rows), per)]

    def _insert_sql(self, shape: tuple[str, tuple[str, ...], str], rows: list[tuple[Any, ...]]) -> list[tuple[str, list[Any]]]:
        table, cols, verb = shape
        one = "(" + ",".join("?" * len(cols)) + ")"
        head = f"{verb} INTO {table} ({','.join(cols)}) VALUES "
        return [(head + ",".join([one] * len(ch)), [v for r in ch for v in r]) for ch in self._chunks(rows, len(cols))]

    def _update_sql(self, shape: tuple[str, str, tuple[str, ...]], rows: list[tuple[Any, ...]]) -> list[tuple[str, list[Any]]]:
        table, key, cols = shape
        k = cols.index(key)
        last = {r[k]: r for r in rows}  # the last update of a key wins
        rows = list(last.values())
        one = "(" + ",".join("?" * len(cols)) + ")"
        sets = ",".join(f"{c}=v.{c}" for c in cols if c != key)
        out = []
        for ch in self._chunks(rows, len(cols)):
            sql = (f"WITH v({','.join(cols)}) AS (VALUES {','.join([one] * len(ch))}) "
                   f"UPDATE {table} SET {sets} FROM v WHERE {table}.{key} = v.{key}")
            out.append((sql, [x for r in ch for x in r]))
        return out

    def _commit(self, conn: sqlite3.Connection, ops: list[tuple[Any, ...]]) -> None:
        t = time.perf_counter()
        stmts = self._statements(ops)
        deadline = time.monotonic() + self.lock_wait_s
        delay = 0.05
        while True:
            try:
                self._run(conn, stmts)
                self.n_sql += len(stmts)
                break
            except sqlite3.Error as e:
                if is_locked_error(e):
                    self.n_lock_waits += 1
                    if time.monotonic() < deadline:
                        time.sleep(delay)  # another process holds the write lock: back off, retry it all
                        delay = min(delay * 2, 2.0)
                        continue
                    self._give_up(ops, e)
                    break
                self._replay(conn, ops)  # one bad row must not lose the batch
                break
        self.n_batches += 1
        self.n_statements += len(ops)
        self.commit_s += time.perf_counter() - t
        if self.n_dropped > self._drop_reported:
            self._report_drops(conn)

    @staticmethod
    def _run(conn: sqlite3.Connection, stmts: list[tuple[str, list[Any]]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in stmts:
                conn.execute(sql, params)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @staticmethod
    def _droppable(op: tuple[Any, ...]) -> bool:
        if op[0] in (_INS, _UPD):
            return str(op[1][0]).startswith(DROPPABLE_TABLES)
        return False

    def _drop(self, n: int, why: str) -> None:
        self.n_dropped += n
        self._drop_reason = why

    def _give_up(self, ops: list[tuple[Any, ...]], e: BaseException) -> None:
        """The lock outlasted lock_wait_s: droppable rows are dropped, the rest is an error."""
        keep = [op for op in ops if not self._droppable(op)]
        self._drop(len(ops) - len(keep), f"{e} (waited {self.lock_wait_s:.0f}s)")
        if keep and len(self.errors) < 100:
            self.errors.append(f"{e}: {len(keep)} row(s) not written after waiting {self.lock_wait_s:.0f}s "
                               "for another process's write lock")

    def _replay(self, conn: sqlite3.Connection, ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            for sql, params in self._statements([op]):
                try:
                    conn.execute(sql, params)
                    self.n_sql += 1
                except sqlite3.Error as e:
                    if self._droppable(op):
                        self._drop(1, f"{e} in {sql[:60]}")
                    elif len(self.errors) < 100:
                        self.errors.append(f"{e} in {sql[:80]}")

    def _report_drops(self, conn: sqlite3.Connection) -> None:
        """ONE event per writer (updated, not repeated) saying how many telemetry/event rows were lost."""
        if self.n_dropped <= self._drop_reported:
            return
        run_id, cell_id = self.context
        msg = (f"{self.n_dropped} telemetry/event row(s) dropped after DB write failures "
               f"(last: {self._drop_reason}); answers are unaffected")
        try:
            if self._drop_reported == 0:
                conn.execute("INSERT INTO events(run_id, cell_id, t, level, kind, message, data_json)"
                             " VALUES (?,?,?,?,?,?,?)", (run_id, cell_id, time.time(), "warning", "writer_dropped",
                                                         msg, f'{{"n_dropped": {self.n_dropped}}}'))
                self._drop_event_id = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            else:
                conn.execute("UPDATE events SET message=?, data_json=? WHERE event_id=?",
                             (msg, f'{{"n_dropped": {self.n_dropped}}}', self._drop_event_id))
            self._drop_reported = self.n_dropped
        except sqlite3.Error:
            pass  # still locked: the next batch (or close) tries again
