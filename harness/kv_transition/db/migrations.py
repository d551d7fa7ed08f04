"""Versioned schema migrations. Append only: never edit a released migration, add a new one.

Each migration is (version, name, SQL script). `docs/schema.md` documents the resulting schema.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "foundation: experiments, datasets, examples, bins, manifest entries",
        """
        CREATE TABLE experiments (
            group_id     TEXT PRIMARY KEY,
            name         TEXT NOT NULL DEFAULT '',
            created_at   TEXT NOT NULL,
            updated_at   TEXT NOT NULL,
            config_json  TEXT NOT NULL,
            config_hash  TEXT NOT NULL
        );
        CREATE TABLE datasets (
            dataset_id      TEXT PRIMARY KEY,
            group_id        TEXT NOT NULL REFERENCES experiments(group_id),
            source          TEXT NOT NULL,
            header_json     TEXT NOT NULL,      -- the manifest without bins/entries/examples
            content_hash    TEXT NOT NULL,
            manifest_path   TEXT NOT NULL,
            n_examples      INTEGER NOT NULL,
            n_entries       INTEGER NOT NULL,
            created_at      TEXT NOT NULL
        );
        CREATE TABLE examples (
            dataset_id    TEXT NOT NULL REFERENCES datasets(dataset_id) ON DELETE CASCADE,
            example_id    TEXT NOT NULL,
            task          TEXT NOT NULL,
            question      TEXT NOT NULL,
            context       TEXT NOT NULL,
            answers_json  TEXT NOT NULL,
            meta_json     TEXT NOT NULL,
            PRIMARY KEY (dataset_id, example_id)
        );
        CREATE TABLE bins (
            dataset_id    TEXT NOT NULL REFERENCES datasets(dataset_id) ON DELETE CASCADE,
            bin_id        INTEGER NOT NULL,
            label         TEXT NOT NULL,
            lo            INTEGER NOT NULL,
            hi            INTEGER,            -- NULL = unbounded
            n_candidates  INTEGER NOT NULL,
            n_selected    INTEGER NOT NULL,
            PRIMARY KEY (dataset_id, bin_id)
        );
        CREATE TABLE manifest_entries (
            dataset_id          TEXT NOT NULL REFERENCES datasets(dataset_id) ON DELETE CASCADE,
            example_id          TEXT NOT NULL,
            ordinal             INTEGER NOT NULL,
            task                TEXT NOT NULL,
            bin_id              INTEGER NOT NULL,
            prompt              TEXT NOT NULL,
            chat                INTEGER NOT NULL,
            add_special_tokens  INTEGER NOT NULL,
            original_tokens     INTEGER NOT NULL,
            final_tokens        INTEGER NOT NULL,
            truncated           INTEGER NOT NULL,
            max_new_tokens      INTEGER NOT NULL,
            question_start      INTEGER,       -- char offset of the question in prompt (context_only scope)
            PRIMARY KEY (dataset_id, example_id),
            UNIQUE (dataset_id, ordinal),
            FOREIGN KEY (dataset_id, example_id) REFERENCES examples(dataset_id, example_id),
            FOREIGN KEY (dataset_id, bin_id) REFERENCES bins(dataset_id, bin_id)
        );
        CREATE INDEX manifest_entries_bin ON manifest_entries(dataset_id, bin_id);
        """,
    ),
]
