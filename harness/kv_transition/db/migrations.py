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

MIGRATIONS.append(
    (
        2,
        "run layer: cells, runs, engine instances, requests, attempts, responses, telemetry, events",
        """
        CREATE TABLE cells (
            cell_id            TEXT PRIMARY KEY,   -- stable: engine-method-budget-<hash of every result-affecting input>
            group_id           TEXT NOT NULL,
            dataset_id         TEXT NOT NULL,
            engine             TEXT NOT NULL,
            method             TEXT NOT NULL,
            compression_ratio  REAL,
            budget             INTEGER,
            kv_scope           TEXT NOT NULL,
            model_id           TEXT NOT NULL,
            repeats            INTEGER NOT NULL,
            inputs_json        TEXT NOT NULL,      -- exactly what cell_id hashes
            config_json        TEXT NOT NULL,      -- full resolved config of the latest run
            config_hash        TEXT NOT NULL,
            spec_json          TEXT NOT NULL,      -- ResolvedSpec (env secrets masked) of the latest run
            status             TEXT NOT NULL,      -- pending | running | completed | incomplete | failed
            reason             TEXT,
            n_requests         INTEGER NOT NULL DEFAULT 0,
            n_ok               INTEGER NOT NULL DEFAULT 0,
            n_failed           INTEGER NOT NULL DEFAULT 0,
            created_at         TEXT NOT NULL,
            started_at         TEXT,
            finished_at        TEXT,
            updated_at         TEXT NOT NULL
        );
        CREATE INDEX cells_group ON cells(group_id, engine, method);
        CREATE TABLE runs (
            run_id        INTEGER PRIMARY KEY AUTOINCREMENT,
            cell_id       TEXT NOT NULL REFERENCES cells(cell_id),
            runtime       TEXT NOT NULL,
            config_hash   TEXT NOT NULL,
            host          TEXT NOT NULL,
            pid           INTEGER NOT NULL,
            harness_version TEXT NOT NULL,
            status        TEXT NOT NULL,       -- running | completed | incomplete | failed | interrupted
            reason        TEXT,
            n_todo        INTEGER,             -- requests without a successful response when the run began
            n_sent        INTEGER,
            n_ok          INTEGER,
            n_failed      INTEGER,
            started_at    TEXT NOT NULL,
            finished_at   TEXT
        );
        CREATE INDEX runs_cell ON runs(cell_id);
        CREATE TABLE engine_instances (
            instance_id   INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id        INTEGER NOT NULL REFERENCES runs(run_id),
            cell_id       TEXT NOT NULL REFERENCES cells(cell_id),
            runtime       TEXT NOT NULL,
            ident         TEXT,                -- container id / pid / url
            base_url      TEXT,
            image         TEXT,
            image_digest  TEXT,
            command_json  TEXT NOT NULL,
            args_json     TEXT NOT NULL,
            env_json      TEXT NOT NULL,       -- secrets masked
            gpus_json     TEXT NOT NULL,       -- configured GPU indices
            gpu_uuids_json TEXT NOT NULL,
            pids_json     TEXT NOT NULL,
            started_at    TEXT,
            ready_at      TEXT,
            stopped_at    TEXT,
            exit_code     INTEGER,
            log_path      TEXT,
            error         TEXT                 -- start error / crash description
        );
        CREATE INDEX engine_instances_run ON engine_instances(run_id);
        CREATE TABLE requests (
            request_id    INTEGER PRIMARY KEY AUTOINCREMENT,
            cell_id       TEXT NOT NULL REFERENCES cells(cell_id),
            dataset_id    TEXT NOT NULL,
            example_id    TEXT NOT NULL,
            repeat        INTEGER NOT NULL,
            status        TEXT NOT NULL,       -- pending | ok | failed
            n_attempts    INTEGER NOT NULL DEFAULT 0,
            last_error    TEXT,
            created_at    TEXT NOT NULL,
            updated_at    TEXT NOT NULL,
            UNIQUE (cell_id, example_id, repeat)
            -- no FK to manifest_entries: `kvt prepare` may rewrite a dataset's rows
        );
        CREATE INDEX requests_status ON requests(cell_id, status);
        CREATE TABLE attempts (
            request_id    INTEGER NOT NULL REFERENCES requests(request_id),
            attempt_no    INTEGER NOT NULL,    -- 1, 2, … across all runs of the cell
            run_id        INTEGER NOT NULL REFERENCES runs(run_id),
            started_at    TEXT NOT NULL,
            duration_s    REAL NOT NULL,
            ok            INTEGER NOT NULL,
            error_kind    TEXT,                -- http_4xx | http_5xx | connect | timeout | stall | malformed | stream_error | incomplete | aborted | other
            error         TEXT,
            http_status   INTEGER,
            body          TEXT,                -- error response body (truncated to 64 KiB)
            retryable     INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (request_id, attempt_no)
        );
        CREATE INDEX attempts_run ON attempts(run_id);
        CREATE TABLE responses (
            request_id        INTEGER PRIMARY KEY REFERENCES requests(request_id),
            attempt_no        INTEGER NOT NULL,
            run_id            INTEGER NOT NULL REFERENCES runs(run_id),
            text              TEXT NOT NULL,
            finish_reason     TEXT,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            total_tokens      INTEGER,
            ttft_s            REAL,
            tpot_s            REAL,
            e2e_s             REAL NOT NULL,
            itl_json          TEXT NOT NULL,   -- inter-chunk latencies after the first token, seconds
            n_chunks          INTEGER NOT NULL,
            kv_applied_json   TEXT,            -- the engine's kv_press_applied, when it reports one
            streamed          INTEGER NOT NULL,
            created_at        TEXT NOT NULL
        );
        CREATE TABLE telemetry_gpu (
            run_id        INTEGER NOT NULL REFERENCES runs(run_id),
            t             REAL NOT NULL,       -- unix time, seconds
            gpu_uuid      TEXT NOT NULL,
            gpu_index     INTEGER,
            mem_used      INTEGER,             -- bytes
            mem_total     INTEGER,
            util_gpu      REAL,                -- percent
            util_mem      REAL,
            power_w       REAL,
            temp_c        REAL
        );
        CREATE INDEX telemetry_gpu_run ON telemetry_gpu(run_id, t);
        CREATE TABLE telemetry_host (
            run_id        INTEGER NOT NULL REFERENCES runs(run_id),
            t             REAL NOT NULL,
            cpu_percent   REAL,                -- host, all cores
            ram_used      INTEGER,
            ram_total     INTEGER,
            proc_cpu_percent REAL,             -- engine process tree (100 = one core)
            proc_rss      INTEGER,
            proc_count    INTEGER
        );
        CREATE INDEX telemetry_host_run ON telemetry_host(run_id, t);
        CREATE TABLE telemetry_engine_metric (
            run_id        INTEGER NOT NULL REFERENCES runs(run_id),
            t             REAL NOT NULL,
            metric        TEXT NOT NULL,
            labels_json   TEXT NOT NULL,
            value         REAL
        );
        CREATE INDEX telemetry_engine_metric_run ON telemetry_engine_metric(run_id, metric, t);
        CREATE TABLE events (
            event_id      INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id        INTEGER REFERENCES runs(run_id),
            cell_id       TEXT,
            t             REAL NOT NULL,
            level         TEXT NOT NULL,       -- info | warning | error
            kind          TEXT NOT NULL,
            message       TEXT NOT NULL,
            data_json     TEXT
        );
        CREATE INDEX events_run ON events(run_id);
        """,
    )
)

MIGRATIONS.append(
    (
        3,
        "scoring and analysis: scores, analysis_bins, transitions",
        """
        CREATE TABLE scores (
            request_id      INTEGER PRIMARY KEY REFERENCES requests(request_id),
            cell_id         TEXT NOT NULL REFERENCES cells(cell_id),
            example_id      TEXT NOT NULL,
            repeat          INTEGER NOT NULL,
            task            TEXT NOT NULL,
            metric          TEXT NOT NULL,       -- eval.py metric name, or exact / contains_all
            score           REAL NOT NULL,       -- in [0, 1]; LongBench tables show x100
            flags_json      TEXT NOT NULL,       -- e.g. ["rouge_recursion_error"]
            scorer_version  TEXT NOT NULL,       -- changes when the metric code changes
            scored_at       TEXT NOT NULL
        );
        CREATE INDEX scores_cell ON scores(cell_id);
        CREATE TABLE analysis_bins (
            cell_id          TEXT NOT NULL REFERENCES cells(cell_id),
            bin_id           INTEGER NOT NULL,
            n                INTEGER NOT NULL,   -- examples (repeats averaged)
            mean             REAL,
            ci_lo            REAL,
            ci_hi            REAL,
            mean_tokens      REAL,
            baseline_cell    TEXT,
            n_paired         INTEGER,
            baseline_mean    REAL,
            rel              REAL,               -- mean(cell) / mean(baseline), paired by example
            rel_ci_lo        REAL,
            rel_ci_hi        REAL,
            kv_tokens_before REAL,               -- means, from the engine's kv_press_applied
            kv_tokens_after  REAL,
            kv_bytes_after   REAL,
            kv_saved_frac    REAL,               -- 1 - KV kept / baseline KV (bytes, else tokens)
            peak_gpu_mem     REAL,               -- bytes, max over the bin's request window (NVML)
            peak_kv_usage    REAL,               -- engine /metrics KV-usage gauge, max in the window
            peak_rss         REAL,               -- bytes, engine process tree (CPU runs)
            ttft_p50         REAL,
            ttft_p90         REAL,
            tpot_p50         REAL,
            tpot_p90         REAL,
            output_tok_s     REAL,               -- completion tokens / e2e seconds, summed over the bin
            prefill_tok_s    REAL,               -- median of prompt tokens / TTFT
            params_json      TEXT NOT NULL,      -- threshold, bootstrap, seed, scorer_version
            computed_at      TEXT NOT NULL,
            PRIMARY KEY (cell_id, bin_id)
        );
        CREATE TABLE transitions (
            cell_id           TEXT PRIMARY KEY REFERENCES cells(cell_id),
            baseline_cell     TEXT,
            threshold         REAL NOT NULL,
            bin_id            INTEGER,           -- NULL: no transition
            tokens            REAL,              -- interpolated crossing length
            max_tokens_tested INTEGER NOT NULL,
            label             TEXT NOT NULL,
            reason            TEXT NOT NULL,
            inputs_json       TEXT NOT NULL,     -- the per-bin relative scores it was computed from
            params_json       TEXT NOT NULL,
            computed_at       TEXT NOT NULL
        );
        """,
    )
)

MIGRATIONS.append(
    (
        4,
        "matrix: matrix runs, their cells and engine loads; runs.git_sha",
        """
        ALTER TABLE runs ADD COLUMN git_sha TEXT;   -- harness commit (+ '-dirty'), or $KVT_GIT_SHA in images
        CREATE TABLE matrix_runs (
            matrix_run_id   INTEGER PRIMARY KEY AUTOINCREMENT,
            group_id        TEXT NOT NULL,
            matrix_name     TEXT NOT NULL,
            matrix_path     TEXT,
            matrix_sha256   TEXT,              -- of the matrix file's bytes
            lock_json       TEXT,              -- the lock file used (image digests), if any
            inventory_json  TEXT NOT NULL,     -- {"kind": "gpu"|"slot", "devices": [...]}
            harness_version TEXT NOT NULL,
            git_sha         TEXT,
            host            TEXT NOT NULL,
            pid             INTEGER NOT NULL,
            status          TEXT NOT NULL,     -- running | completed | failed | interrupted
            n_cells         INTEGER NOT NULL,
            n_completed     INTEGER,
            n_failed        INTEGER,           -- not completed (failed, incomplete, skipped)
            started_at      TEXT NOT NULL,
            finished_at     TEXT
        );
        CREATE TABLE matrix_cells (
            matrix_run_id     INTEGER NOT NULL REFERENCES matrix_runs(matrix_run_id),
            cell_id           TEXT NOT NULL,   -- cells.cell_id (absent there if the cell never started)
            engine_group      TEXT NOT NULL,   -- cells of one request-mode group share one engine
            model_id          TEXT NOT NULL,
            engine            TEXT NOT NULL,
            method            TEXT NOT NULL,
            compression_ratio REAL,
            budget            INTEGER,
            gpus_json         TEXT NOT NULL,   -- GPU indices (or CPU slots) it ran on
            port              INTEGER,
            image_lock        TEXT,            -- the lock file's digest for its image (sha256:… | local:sha256:…)
            status            TEXT NOT NULL,   -- completed | incomplete | failed | skipped
            reason            TEXT,
            started_at        TEXT,
            finished_at       TEXT,
            PRIMARY KEY (matrix_run_id, cell_id)
        );
        CREATE TABLE matrix_engines (           -- one row per engine load of a shared (request-mode) group
            load_id        INTEGER PRIMARY KEY AUTOINCREMENT,
            matrix_run_id  INTEGER NOT NULL REFERENCES matrix_runs(matrix_run_id),
            engine_group   TEXT NOT NULL,
            model_id       TEXT NOT NULL,
            engine         TEXT NOT NULL,
            runtime        TEXT NOT NULL,
            gpus_json      TEXT NOT NULL,
            port           INTEGER,
            ident          TEXT,
            image_digest   TEXT,
            started_at     TEXT,
            ready_at       TEXT,
            stopped_at     TEXT,
            exit_code      INTEGER,
            error          TEXT
        );
        CREATE INDEX matrix_engines_run ON matrix_engines(matrix_run_id, engine_group);
        """,
    )
)

MIGRATIONS.append(
    (
        5,
        "engine mounts and attention backends: what each engine instance saw and ran with",
        """
        ALTER TABLE engine_instances ADD COLUMN mounts_json TEXT;     -- [{"source","target","read_only","kind"}]
        ALTER TABLE engine_instances ADD COLUMN attention_backend_requested TEXT;  -- pinned (NULL = engine's choice)
        ALTER TABLE engine_instances ADD COLUMN attention_backend TEXT;  -- parsed from the engine's startup log
        ALTER TABLE cells ADD COLUMN attention_backend TEXT;          -- the last backend parsed for this cell
        """,
    )
)

MIGRATIONS.append(
    (
        7,
        "responses: cached prompt tokens, cache busting and cache flag, token count source",
        """
        ALTER TABLE responses ADD COLUMN cached_tokens INTEGER;  -- prompt tokens the engine served from its cache
        ALTER TABLE responses ADD COLUMN cached_source TEXT;     -- the response field that number came from
        ALTER TABLE responses ADD COLUMN cache_bust TEXT;        -- JSON body fields sent to defeat the prefix cache
        ALTER TABLE responses ADD COLUMN cache_flag TEXT;        -- cached | unprotected | NULL (a clean timing)
        ALTER TABLE responses ADD COLUMN token_source TEXT;      -- server | harness | mixed | NULL (none reported)
        """,
    )
)

MIGRATIONS.append(
    (
        11,
        "follow-up requests: the second request of a two-request example (LongBench v2 chain of thought)",
        """
        CREATE TABLE followups (
            request_id        INTEGER PRIMARY KEY REFERENCES requests(request_id),
            attempt_no        INTEGER NOT NULL,    -- the attempts row (step 2) that produced it
            run_id            INTEGER NOT NULL REFERENCES runs(run_id),
            prompt            TEXT NOT NULL,       -- the follow-up prompt as sent (built from responses.text)
            prompt_truncated  INTEGER NOT NULL,
            text              TEXT NOT NULL,
            finish_reason     TEXT,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            total_tokens      INTEGER,
            ttft_s            REAL,
            tpot_s            REAL,
            e2e_s             REAL NOT NULL,
            itl_json          TEXT NOT NULL,
            n_chunks          INTEGER NOT NULL,
            kv_applied_json   TEXT,
            streamed          INTEGER NOT NULL,
            created_at        TEXT NOT NULL,
            cached_tokens     INTEGER,
            cached_source     TEXT,
            cache_bust        TEXT,
            cache_flag        TEXT,
            token_source      TEXT
        );
        CREATE INDEX followups_run ON followups(run_id);
        ALTER TABLE attempts ADD COLUMN step INTEGER NOT NULL DEFAULT 1;  -- 1: the manifest prompt, 2: its follow-up
        """,
    )
)

MIGRATIONS.append(
    (
        12,
        "analysis_bins: the engine's KV-bytes gauge apart from its KV-usage fraction",
        """
        ALTER TABLE analysis_bins ADD COLUMN peak_kv_bytes REAL;  -- engine /metrics *_bytes gauge, max in the window
        """,
    )
)
