"""SQLite layer (one DB per experiment group). Read core.py and migrations.py in one sitting."""

from kv_transition.db.core import connect, dumps, insert_many, migrate, rows, schema_version, transaction, utcnow

__all__ = ["connect", "dumps", "insert_many", "migrate", "rows", "schema_version", "transaction", "utcnow"]
