"""The matrix's own rows in the group's DB: matrix_runs (one per `kvt matrix run`), matrix_cells (each cell's
outcome in that run) and matrix_engines (each engine load of a shared group). Cell rows proper (cells, requests,
telemetry…) are written by `run_cell`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Optional

from kv_transition import __version__
from kv_transition.cell import git_sha
from kv_transition.db import connect, transaction, utcnow
from kv_transition.matrix.expand import EngineGroup
from kv_transition.matrix.outcome import CellOutcome
from kv_transition.runtime.base import Instance


class MatrixLog:
    def __init__(self, db: Path):
        self.db = db
        self.matrix_run_id: Optional[int] = None

    def _conn(self) -> Any:
        return connect(self.db)

    def start(self, group_id: str, matrix_name: str, matrix_path: Optional[str], matrix_sha256: Optional[str],
              lock: Optional[dict[str, Any]], inventory: dict[str, Any], n_cells: int) -> int:
        conn = self._conn()
        try:
            with transaction(conn):
                cur = conn.execute(
                    "INSERT INTO matrix_runs(group_id, matrix_name, matrix_path, matrix_sha256, lock_json, inventory_json,"
                    " harness_version, git_sha, host, pid, status, n_cells, started_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (group_id, matrix_name, matrix_path, matrix_sha256, json.dumps(lock) if lock else None,
                     json.dumps(inventory), __version__, git_sha(), socket.gethostname(), os.getpid(), "running",
                     n_cells, utcnow()))
                self.matrix_run_id = int(cur.lastrowid)
        finally:
            conn.close()
        return self.matrix_run_id

    def cell(self, o: CellOutcome, port: Optional[int], started: str) -> None:
        conn = self._conn()
        try:
            conn.execute(
                "INSERT OR REPLACE INTO matrix_cells(matrix_run_id, cell_id, engine_group, model_id, engine, method,"
                " compression_ratio, budget, gpus_json, port, image_lock, status, reason, started_at, finished_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (self.matrix_run_id, o.cell.cell_id, o.group_id, o.cell.model, o.cell.engine, o.cell.method,
                 o.cell.compression_ratio, o.cell.budget, json.dumps(list(o.gpus)), port, o.cell.image_lock,
                 o.status, o.reason, started, utcnow()))
        finally:
            conn.close()

    def load(self, group: EngineGroup, gpus: tuple[int, ...], inst: Instance, error: Optional[str]) -> None:
        conn = self._conn()
        try:
            conn.execute(
                "INSERT INTO matrix_engines(matrix_run_id, engine_group, model_id, engine, runtime, gpus_json, port,"
                " ident, image_digest, started_at, ready_at, stopped_at, exit_code, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (self.matrix_run_id, group.group_id, group.model, group.engine, inst.runtime, json.dumps(list(gpus)),
                 inst.spec.port, inst.ident, inst.image_digest or inst.spec.digest, inst.started_at, inst.ready_at,
                 inst.stopped_at or utcnow(), inst.exit_code, error))
        finally:
            conn.close()

    def finish(self, status: str, outcomes: list[CellOutcome]) -> None:
        conn = self._conn()
        try:
            conn.execute("UPDATE matrix_runs SET status=?, n_completed=?, n_failed=?, finished_at=? WHERE matrix_run_id=?",
                         (status, sum(o.status == "completed" for o in outcomes),
                          sum(o.status != "completed" for o in outcomes), utcnow(), self.matrix_run_id))
        finally:
            conn.close()
