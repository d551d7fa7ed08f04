"""Merge one experiment group's database (a whole DB from another host, or a shard a remote matrix group
wrote) into another, exactly once.

    rep = merge_into(dst_conn, "other.sqlite")      # one transaction on dst; nothing overwritten
    rep.lines()                                     # what was added, what was already there, conflicts

Autoincrement ids (run_id, request_id, instance_id, event_id, matrix_run_id, load_id) differ between
databases, so every row is matched by its stable key and its ids are re-mapped:

| rows              | matched by                                                     |
|-------------------|----------------------------------------------------------------|
| experiments       | group_id (must be the same group, else nothing is merged)      |
| datasets (+ examples, bins, manifest_entries) | dataset_id; a different content_hash is a conflict |
| cells             | cell_id (content-derived)                                      |
| runs              | (cell_id, host, pid, started_at)                               |
| requests          | UNIQUE (cell_id, example_id, repeat)                           |
| attempts          | (request, run, started_at); attempt_no renumbered when taken   |
| responses, followups, scores | the request; a different text / score is a conflict |
| engine_instances  | (run, ident, started_at)                                       |
| telemetry, events | (run, t, …) — the whole row's identity                         |
| matrix_runs       | (group_id, host, pid, started_at); matrix_cells (run, cell_id), matrix_engines (run, group, ident, started_at) |

Re-merging the same rows is a no-op (a re-sent batch adds nothing). Mutable bookkeeping (a run still
`running` here that ended there, a request answered there) moves forward, never back; answers, attempts,
scores and manifests that differ are reported as conflicts and the destination's are kept. analysis_bins
and transitions are derived: recompute them (`kvt analyze`) after a merge.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from kv_transition.errors import KvtError

TELEMETRY_KEYS = {
    "telemetry_gpu": ("t", "gpu_uuid"),
    "telemetry_host": ("t",),
    "telemetry_engine_metric": ("t", "metric", "labels_json"),
}
MANIFEST_TABLES = ("examples", "bins", "manifest_entries")   # children of datasets, copied with it
RUN_FINAL = ("completed", "incomplete", "failed", "interrupted", "killed")


class MergeError(KvtError):
    """The two databases cannot be merged (different experiment groups, not a database). CLI exit 2."""


@dataclass
class MergeReport:
    source: str
    added: dict[str, int] = field(default_factory=dict)
    unchanged: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    renumbered: int = 0          # attempts whose attempt_no was taken here (kept, numbered after ours)

    def add(self, table: str, n: int = 1) -> None:
        self.added[table] = self.added.get(table, 0) + n

    def same(self, table: str, n: int = 1) -> None:
        self.unchanged[table] = self.unchanged.get(table, 0) + n

    def upd(self, table: str, n: int = 1) -> None:
        self.updated[table] = self.updated.get(table, 0) + n

    @property
    def n_added(self) -> int:
        return sum(self.added.values())

    def lines(self) -> list[str]:
        def fmt(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items()) if v) or "nothing"

        out = [f"{self.source}: added {fmt(self.added)}", f"  already there: {fmt(self.unchanged)}"]
        if any(self.updated.values()):
            out.append(f"  moved forward: {fmt(self.updated)}")
        if self.renumbered:
            out.append(f"  {self.renumbered} attempt(s) numbered after this DB's own attempts of the same request")
        out += [f"  conflict (kept this DB's): {c}" for c in self.conflicts]
        return out


# --- opening ---------------------------------------------------------------------------------------

def open_source(src: str | Path | bytes) -> sqlite3.Connection:
    """The source as an in-memory copy migrated to this harness's schema (an older DB gains the new
    columns as NULL; the file itself is never written)."""
    from kv_transition.db.core import check_file, migrate

    mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    mem.row_factory = sqlite3.Row
    try:
        if isinstance(src, (bytes, bytearray)):
            data = bytearray(src)
            if len(data) >= 20 and data[18] == 2:  # a WAL database's bytes: open them as a rollback-journal one
                data[18] = data[19] = 1
            mem.deserialize(bytes(data))
        else:
            p = Path(src)
            if not p.is_file():
                raise MergeError(f"{p}: no such database file")
            check_file(p)
            disk = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                disk.backup(mem)
            finally:
                disk.close()
        migrate(mem)
    except sqlite3.DatabaseError as e:
        mem.close()
        raise MergeError(f"{src if not isinstance(src, (bytes, bytearray)) else 'shard'}: not a kv-transition "
                         f"database ({e}); nothing merged") from None
    return mem


def _cols(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _has(conn: sqlite3.Connection, table: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None


def _insert(dst: sqlite3.Connection, table: str, row: dict[str, Any], dst_cols: list[str],
            drop: Iterable[str] = ()) -> int:
    d = set(drop)
    cols = [c for c in row if c in dst_cols and c not in d]
    cur = dst.execute(f"INSERT INTO {table}({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                      [row[c] for c in cols])
    return int(cur.lastrowid)


def _update(dst: sqlite3.Connection, table: str, where: str, params: tuple[Any, ...], row: dict[str, Any],
            cols: Iterable[str]) -> None:
    cs = [c for c in cols if c in row]
    if cs:
        dst.execute(f"UPDATE {table} SET {', '.join(c + '=?' for c in cs)} WHERE {where}",
                    [row[c] for c in cs] + list(params))


def group_ids(conn: sqlite3.Connection) -> set[str]:
    out = {r[0] for r in conn.execute("SELECT group_id FROM experiments")}
    out |= {r[0] for r in conn.execute("SELECT DISTINCT group_id FROM cells")}
    return out


# --- the merge -------------------------------------------------------------------------------------

def merge_into(dst: sqlite3.Connection, src: str | Path | bytes | sqlite3.Connection, *,
               source_name: Optional[str] = None, cells: Optional[set[str]] = None,
               datasets: Optional[set[str]] = None, manifests: bool = True, telemetry: bool = True, matrix: bool = True,
               transaction: bool = True, skip_runs: Optional[set[int]] = None) -> MergeReport:
    """Merge `src` into `dst` (a connection from `db.connect`). `cells`: only these cells' rows (and the
    datasets they send, plus `datasets`); `manifests` / `telemetry` / `matrix`: whether to bring those rows too;
    `skip_runs`: source run ids whose engine/telemetry/event rows the destination already has (a remote
    group's finished runs, sent with an earlier batch). One transaction (unless `transaction=False`: the
    caller holds one)."""
    from kv_transition.db.core import transaction as txn

    own = not isinstance(src, sqlite3.Connection)
    s = open_source(src) if own else src  # type: ignore[arg-type]
    name = source_name or (str(src) if isinstance(src, (str, Path)) else "shard")
    rep = MergeReport(name)
    try:
        s_groups, d_groups = group_ids(s), group_ids(dst)
        if len(s_groups) > 1:
            raise MergeError(f"{name}: holds several experiment groups ({', '.join(sorted(s_groups))}); nothing merged")
        if s_groups and d_groups and s_groups != d_groups:
            raise MergeError(f"{name}: experiment group {next(iter(s_groups))!r}, but this database is "
                             f"{', '.join(sorted(d_groups))!r}; nothing merged (merge only DBs of one group)")
        if transaction:
            with txn(dst):
                _merge(dst, s, rep, cells, datasets, manifests, telemetry, matrix, skip_runs or set())
        else:
            _merge(dst, s, rep, cells, datasets, manifests, telemetry, matrix, skip_runs or set())
    finally:
        if own:
            s.close()
    return rep


def _merge(dst: sqlite3.Connection, s: sqlite3.Connection, rep: MergeReport, only: Optional[set[str]],
           only_ds: Optional[set[str]], manifests: bool, telemetry: bool, matrix: bool, skip_runs: set[int]) -> None:
    dcols = {t: _cols(dst, t) for t in (
        "experiments", "datasets", *MANIFEST_TABLES, "cells", "runs", "engine_instances", "requests", "attempts",
        "responses", "followups", "events", "scores", *TELEMETRY_KEYS, "matrix_runs", "matrix_cells",
        "matrix_engines") if _has(dst, t)}
    cell_rows = [dict(r) for r in s.execute("SELECT * FROM cells")]
    if only is not None:
        cell_rows = [c for c in cell_rows if c["cell_id"] in only]
    wanted_ds = {c["dataset_id"] for c in cell_rows} | set(only_ds or ())
    skip_cells: set[str] = set()

    # experiments
    for r in s.execute("SELECT * FROM experiments"):
        if dst.execute("SELECT 1 FROM experiments WHERE group_id=?", (r["group_id"],)).fetchone():
            rep.same("experiments")
        else:
            _insert(dst, "experiments", dict(r), dcols["experiments"])
            rep.add("experiments")

    # datasets and their manifest rows
    if manifests:
        for r in s.execute("SELECT * FROM datasets"):
            if only is not None and r["dataset_id"] not in wanted_ds:
                continue
            have = dst.execute("SELECT content_hash FROM datasets WHERE dataset_id=?", (r["dataset_id"],)).fetchone()
            if have is not None:
                if have[0] == r["content_hash"]:
                    rep.same("datasets")
                else:
                    rep.conflicts.append(f"dataset {r['dataset_id']}: content {r['content_hash']} there, "
                                         f"{have[0]} here (prepared differently); its cells were not merged")
                    skip_cells |= {c["cell_id"] for c in cell_rows if c["dataset_id"] == r["dataset_id"]}
                continue
            _insert(dst, "datasets", dict(r), dcols["datasets"])
            rep.add("datasets")
            for t in ("examples", "bins", "manifest_entries"):
                n = 0
                for x in s.execute(f"SELECT * FROM {t} WHERE dataset_id=?", (r["dataset_id"],)):
                    _insert(dst, t, dict(x), dcols[t])
                    n += 1
                rep.add(t, n)

    run_map: dict[int, int] = {}
    req_map: dict[int, int] = {}
    att_map: dict[tuple[int, int], int] = {}   # (src request_id, src attempt_no) → dst attempt_no
    touched_cells: list[str] = []
    for c in cell_rows:
        cid = c["cell_id"]
        if cid in skip_cells:
            continue
        touched_cells.append(cid)
        d = dst.execute("SELECT updated_at, status FROM cells WHERE cell_id=?", (cid,)).fetchone()
        if d is None:
            _insert(dst, "cells", c, dcols["cells"])
            rep.add("cells")
        elif (c["updated_at"] or "") > (d["updated_at"] or ""):
            _update(dst, "cells", "cell_id=?", (cid,), c,
                    ("repeats", "config_json", "config_hash", "spec_json", "status", "reason", "n_requests",
                     "started_at", "finished_at", "updated_at", "attention_backend"))
            rep.upd("cells")
        else:
            rep.same("cells")
        # runs
        for r in s.execute("SELECT * FROM runs WHERE cell_id=? ORDER BY run_id", (cid,)):
            r = dict(r)
            d = dst.execute("SELECT run_id, status FROM runs WHERE cell_id=? AND host=? AND pid=? AND started_at=?",
                            (cid, r["host"], r["pid"], r["started_at"])).fetchone()
            if d is None:
                run_map[r["run_id"]] = _insert(dst, "runs", r, dcols["runs"], drop=("run_id",))
                rep.add("runs")
            else:
                run_map[r["run_id"]] = int(d["run_id"])
                if d["status"] == "running" and r["status"] != "running":
                    _update(dst, "runs", "run_id=?", (d["run_id"],), r,
                            ("status", "reason", "n_todo", "n_sent", "n_ok", "n_failed", "finished_at"))
                    rep.upd("runs")
                else:
                    rep.same("runs")
        # requests
        for r in s.execute("SELECT * FROM requests WHERE cell_id=? ORDER BY request_id", (cid,)):
            r = dict(r)
            d = dst.execute("SELECT request_id, status, n_attempts, updated_at FROM requests"
                            " WHERE cell_id=? AND example_id=? AND repeat=?",
                            (cid, r["example_id"], r["repeat"])).fetchone()
            if d is None:
                req_map[r["request_id"]] = _insert(dst, "requests", r, dcols["requests"], drop=("request_id",))
                rep.add("requests")
                continue
            req_map[r["request_id"]] = int(d["request_id"])
            forward = d["status"] != "ok" and (r["status"] == "ok" or (r["updated_at"] or "") > (d["updated_at"] or ""))
            if forward and r["status"] != d["status"]:
                _update(dst, "requests", "request_id=?", (d["request_id"],), r, ("status", "last_error", "updated_at"))
                rep.upd("requests")
            else:
                rep.same("requests")
            if (r["n_attempts"] or 0) > (d["n_attempts"] or 0):
                dst.execute("UPDATE requests SET n_attempts=? WHERE request_id=?", (r["n_attempts"], d["request_id"]))
        # attempts
        for a in s.execute("SELECT a.* FROM attempts a JOIN requests q USING(request_id) WHERE q.cell_id=?"
                           " ORDER BY a.request_id, a.attempt_no", (cid,)):
            a = dict(a)
            rid, run = req_map[a["request_id"]], run_map.get(a["run_id"])
            if run is None:
                continue  # a run not of this cell (cannot happen in a consistent DB)
            d = dst.execute("SELECT attempt_no FROM attempts WHERE request_id=? AND run_id=? AND started_at=?",
                            (rid, run, a["started_at"])).fetchone()
            if d is not None:
                att_map[(a["request_id"], a["attempt_no"])] = int(d[0])
                rep.same("attempts")
                continue
            no = a["attempt_no"]
            if dst.execute("SELECT 1 FROM attempts WHERE request_id=? AND attempt_no=?", (rid, no)).fetchone():
                no = int(dst.execute("SELECT MAX(attempt_no) FROM attempts WHERE request_id=?", (rid,)).fetchone()[0]) + 1
                rep.renumbered += 1
            att_map[(a["request_id"], a["attempt_no"])] = no
            _insert(dst, "attempts", {**a, "request_id": rid, "run_id": run, "attempt_no": no}, dcols["attempts"])
            dst.execute("UPDATE requests SET n_attempts=MAX(n_attempts, ?) WHERE request_id=?", (no, rid))
            rep.add("attempts")
        # responses
        for p in s.execute("SELECT p.* FROM responses p JOIN requests q USING(request_id) WHERE q.cell_id=?", (cid,)):
            p = dict(p)
            rid = req_map[p["request_id"]]
            d = dst.execute("SELECT text, finish_reason FROM responses WHERE request_id=?", (rid,)).fetchone()
            if d is not None:
                if d["text"] == p["text"] and d["finish_reason"] == p["finish_reason"]:
                    rep.same("responses")
                else:
                    q = s.execute("SELECT example_id, repeat FROM requests WHERE request_id=?", (p["request_id"],)).fetchone()
                    rep.conflicts.append(f"response of {cid} example {q[0]} repeat {q[1]}: a different answer there "
                                         f"({p['text'][:40]!r} vs {d['text'][:40]!r})")
                continue
            run = run_map.get(p["run_id"])
            if run is None:
                continue
            no = att_map.get((p["request_id"], p["attempt_no"]), p["attempt_no"])
            _insert(dst, "responses", {**p, "request_id": rid, "run_id": run, "attempt_no": no}, dcols["responses"])
            dst.execute("UPDATE requests SET status='ok', last_error=NULL WHERE request_id=?", (rid,))
            rep.add("responses")
        # follow-ups (the second request of a two-request example): like responses
        if "followups" in dcols and _has(s, "followups"):
            for p in s.execute("SELECT f.* FROM followups f JOIN requests q USING(request_id) WHERE q.cell_id=?", (cid,)):
                p = dict(p)
                rid, run = req_map.get(p["request_id"]), run_map.get(p["run_id"])
                if rid is None or run is None:
                    continue
                d = dst.execute("SELECT text FROM followups WHERE request_id=?", (rid,)).fetchone()
                if d is not None:
                    if d["text"] == p["text"]:
                        rep.same("followups")
                    else:
                        rep.conflicts.append(f"follow-up of {cid} request {p['request_id']}: a different answer there")
                    continue
                no = att_map.get((p["request_id"], p["attempt_no"]), p["attempt_no"])
                _insert(dst, "followups", {**p, "request_id": rid, "run_id": run, "attempt_no": no}, dcols["followups"])
                rep.add("followups")
        # scores
        for sc in s.execute("SELECT * FROM scores WHERE cell_id=?", (cid,)):
            sc = dict(sc)
            rid = req_map.get(sc["request_id"])
            if rid is None:
                continue
            d = dst.execute("SELECT score, scorer_version FROM scores WHERE request_id=?", (rid,)).fetchone()
            if d is None:
                _insert(dst, "scores", {**sc, "request_id": rid}, dcols["scores"])
                rep.add("scores")
            elif (d[0], d[1]) == (sc["score"], sc["scorer_version"]):
                rep.same("scores")
            else:
                rep.conflicts.append(f"score of {cid} example {sc['example_id']} repeat {sc['repeat']}: {sc['score']} "
                                     f"({sc['scorer_version']}) there, {d[0]} ({d[1]}) here")

    # per run: engine instances, telemetry, events
    for srun, drun in run_map.items():
        if srun in skip_runs:
            continue
        for e in s.execute("SELECT * FROM engine_instances WHERE run_id=? ORDER BY instance_id", (srun,)):
            e = dict(e)
            d = dst.execute("SELECT instance_id, stopped_at FROM engine_instances WHERE run_id=?"
                            " AND COALESCE(ident,'')=COALESCE(?,'') AND COALESCE(started_at,'')=COALESCE(?,'')",
                            (drun, e["ident"], e["started_at"])).fetchone()
            if d is None:
                _insert(dst, "engine_instances", {**e, "run_id": drun}, dcols["engine_instances"], drop=("instance_id",))
                rep.add("engine_instances")
            elif d["stopped_at"] is None and e["stopped_at"] is not None:
                _update(dst, "engine_instances", "instance_id=?", (d["instance_id"],), e,
                        ("ready_at", "stopped_at", "exit_code", "pids_json", "gpu_uuids_json", "error", "attention_backend"))
                rep.upd("engine_instances")
            else:
                rep.same("engine_instances")
        if telemetry:
            for t, key in TELEMETRY_KEYS.items():
                have = {tuple(r) for r in dst.execute(f"SELECT {','.join(key)} FROM {t} WHERE run_id=?", (drun,))}
                new = []
                for r in s.execute(f"SELECT * FROM {t} WHERE run_id=?", (srun,)):
                    r = dict(r)
                    k = tuple(r[c] for c in key)
                    if k in have:
                        continue
                    have.add(k)
                    new.append({**r, "run_id": drun})
                if new:
                    cols = [c for c in new[0] if c in dcols[t]]
                    dst.executemany(f"INSERT INTO {t}({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                                    [[r[c] for c in cols] for r in new])
                    rep.add(t, len(new))
        have_ev = {tuple(r) for r in dst.execute("SELECT t, kind, message FROM events WHERE run_id=?", (drun,))}
        for ev in s.execute("SELECT * FROM events WHERE run_id=? ORDER BY event_id", (srun,)):
            ev = dict(ev)
            k = (ev["t"], ev["kind"], ev["message"])
            if k in have_ev:
                rep.same("events")
                continue
            have_ev.add(k)
            _insert(dst, "events", {**ev, "run_id": drun}, dcols["events"], drop=("event_id",))
            rep.add("events")

    refresh_cells(dst, touched_cells)
    if matrix and _has(s, "matrix_runs"):
        _merge_matrix(dst, s, rep, dcols)


def refresh_cells(dst: sqlite3.Connection, cell_ids: Iterable[str]) -> None:
    """A cell's counters from its requests; every request answered → completed."""
    for cid in cell_ids:
        row = dst.execute("SELECT repeats, n_requests, status FROM cells WHERE cell_id=?", (cid,)).fetchone()
        if row is None:
            continue
        n_ok = dst.execute("SELECT COUNT(*) FROM requests WHERE cell_id=? AND status='ok' AND repeat<?",
                           (cid, row[0])).fetchone()[0]
        n_failed = dst.execute("SELECT COUNT(*) FROM requests WHERE cell_id=? AND status='failed' AND repeat<?",
                               (cid, row[0])).fetchone()[0]
        status = "completed" if row[1] and n_ok >= row[1] and row[2] != "running" else row[2]
        dst.execute("UPDATE cells SET n_ok=?, n_failed=?, status=?, reason=CASE WHEN ?='completed' THEN NULL"
                    " ELSE reason END WHERE cell_id=?", (n_ok, n_failed, status, status, cid))


def _merge_matrix(dst: sqlite3.Connection, s: sqlite3.Connection, rep: MergeReport, dcols: dict[str, list[str]]) -> None:
    mmap: dict[int, int] = {}
    for m in s.execute("SELECT * FROM matrix_runs ORDER BY matrix_run_id"):
        m = dict(m)
        d = dst.execute("SELECT matrix_run_id, status FROM matrix_runs WHERE group_id=? AND host=? AND pid=?"
                        " AND started_at=?", (m["group_id"], m["host"], m["pid"], m["started_at"])).fetchone()
        if d is None:
            mmap[m["matrix_run_id"]] = _insert(dst, "matrix_runs", m, dcols["matrix_runs"], drop=("matrix_run_id",))
            rep.add("matrix_runs")
        else:
            mmap[m["matrix_run_id"]] = int(d[0])
            if d[1] == "running" and m["status"] != "running":
                _update(dst, "matrix_runs", "matrix_run_id=?", (d[0],), m,
                        ("status", "n_completed", "n_failed", "finished_at"))
                rep.upd("matrix_runs")
            else:
                rep.same("matrix_runs")
    for c in s.execute("SELECT * FROM matrix_cells"):
        c = dict(c)
        mid = mmap[c["matrix_run_id"]]
        d = dst.execute("SELECT finished_at FROM matrix_cells WHERE matrix_run_id=? AND cell_id=?",
                        (mid, c["cell_id"])).fetchone()
        if d is None:
            _insert(dst, "matrix_cells", {**c, "matrix_run_id": mid}, dcols["matrix_cells"])
            rep.add("matrix_cells")
        else:
            rep.same("matrix_cells")
    for e in s.execute("SELECT * FROM matrix_engines ORDER BY load_id"):
        e = dict(e)
        mid = mmap[e["matrix_run_id"]]
        d = dst.execute("SELECT 1 FROM matrix_engines WHERE matrix_run_id=? AND engine_group=?"
                        " AND COALESCE(ident,'')=COALESCE(?,'') AND COALESCE(started_at,'')=COALESCE(?,'')",
                        (mid, e["engine_group"], e["ident"], e["started_at"])).fetchone()
        if d is None:
            _insert(dst, "matrix_engines", {**e, "matrix_run_id": mid}, dcols["matrix_engines"], drop=("load_id",))
            rep.add("matrix_engines")
        else:
            rep.same("matrix_engines")


# --- shards ----------------------------------------------------------------------------------------

def empty_db() -> sqlite3.Connection:
    """An in-memory database with this harness's schema (no foreign keys enforced: a shard holds only
    some tables' rows)."""
    from kv_transition.db.core import migrate

    mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    mem.row_factory = sqlite3.Row
    migrate(mem)
    return mem


def export_shard(src: sqlite3.Connection, cells: set[str], *, datasets: Optional[set[str]] = None,
                 manifests: bool = True, telemetry: bool = True, skip_runs: Optional[set[int]] = None) -> bytes:
    """The rows of `cells` (and, with `manifests`, the experiment and the datasets they — or `datasets` —
    send) as the bytes of an SQLite database: what a remote group starts from, and what it sends back."""
    mem = empty_db()
    try:
        merge_into(mem, src, cells=cells, datasets=datasets, manifests=manifests, telemetry=telemetry, matrix=False,
                   skip_runs=skip_runs)
        return mem.serialize()
    finally:
        mem.close()
