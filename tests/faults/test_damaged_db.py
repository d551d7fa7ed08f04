"""A truncated DB, a non-database file, a 0-byte file: every command that opens the DB says so in ONE
line (exit 2, no traceback) and changes nothing — not the file, not the tree around it."""

from __future__ import annotations

import hashlib

import pytest

from kv_transition.cli import main

from .conftest import one_error_line, tree_state

COMMANDS = [["report"], ["score", "-q"], ["analyze"], ["manifest", "verify"], ["run", "-q"], ["prepare", "-q"],
            ["matrix", "run", "--no-live", "-m", "MATRIX"]]


def _truncate(db):
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def _not_a_db(db):
    db.write_text("these are my notes, not a database\n" * 50)


def _garbled(db):  # same size, every page after the first two overwritten in part
    d = bytearray(db.read_bytes())
    for off in range(4096 * 2, len(d) - 4096, 4096):
        d[off:off + 200] = b"\xa5" * 200
    db.write_bytes(bytes(d))


def _empty(db):
    db.write_bytes(b"")


DAMAGE = {"truncated": (_truncate, "is damaged (truncated: "), "not_a_db": (_not_a_db, "is damaged (not an SQLite"),
          "garbled": (_garbled, "database is damaged (database disk image is malformed)"),
          "empty": (_empty, "is an empty file (0 bytes), not a kv-transition database; nothing was changed")}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_every_command_refuses_a_damaged_db_in_one_line_and_changes_nothing(project, monkeypatch, capsys,
                                                                             kind) -> None:
    p = project(n=3)
    monkeypatch.chdir(p.root)
    for k in ("KVT_ENGINES_DIR", "KVT_STATE_DIR"):
        monkeypatch.setenv(k, p.env[k])
    (p.root / "m.yaml").write_text("name: m\nengines:\n  fakekv:\n    methods: [full]\n")
    damage, expected = DAMAGE[kind]
    damage(p.db)
    digest = hashlib.sha256(p.db.read_bytes()).hexdigest()
    before = tree_state(p.root)
    for cmd in COMMANDS:
        argv = [a.replace("MATRIX", str(p.root / "m.yaml")) for a in cmd[:2]] + ["-c", str(p.config)] + \
               [a.replace("MATRIX", str(p.root / "m.yaml")) for a in cmd[2:]] if cmd[0] == "matrix" else \
            cmd[:2] + ["-c", str(p.config)] + cmd[2:] if cmd[0] == "manifest" else cmd + ["-c", str(p.config)]
        rc = main(argv)
        line = one_error_line(capsys.readouterr().err)
        assert rc == 2, (cmd, line)
        assert line == f"kvt: error: {p.db}: {expected}" or line.startswith(f"kvt: error: {p.db}: {expected}"), \
            (cmd, line)
        assert hashlib.sha256(p.db.read_bytes()).hexdigest() == digest, cmd
    assert tree_state(p.root) == before
    assert not p.engine_pids()
