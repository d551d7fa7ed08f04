"""LongBench v1 and LongBench-E: task registry, loaders and the official prompt configuration.

Sources (``dataset.longbench.source``):

- ``zip`` (the default): the official ``data.zip`` of LongBench's README
  (``https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip``, members
  ``data/<task>.jsonl``). ``url`` (or ``path`` naming another URL) is downloaded once into
  ``<data_root>/raw/longbench/zip/<url-hash>/data.zip`` with its sha256 recorded next to it
  (``data.zip.source.json``) and checked on every reuse; ``path`` may also name a local file.
  Members are extracted next to it.
- ``parquet``: a parquet copy in one of the known layouts (``PARQUET_LAYOUTS``), either on the Hub
  (``parquet_repo`` + ``parquet_revision``; the default names the Hub's parquet export of the
  official repo, branch ``refs/convert/parquet``, laid out as ``<task>/test/0000.parquet``) or in a
  local directory (``path``, or ``parquet_repo`` naming an existing directory). Hub files are
  downloaded once into ``<data_root>/raw/longbench/parquet/…`` and then read by exactly the same
  local-directory code, through ``datasets``' parquet builder.
- ``kvpress``: kvpress's evaluation mirror ``Xnhyacinth/LongBench`` (``kvpress_repo``), one config per
  task pushed with ``push_to_hub`` (``<task>/test-00000-of-00001.parquet``), or a local copy
  (``path``). Its rows are LongBench's, re-formatted by kvpress: ``context`` already holds the task's
  instruction around the document, ``question`` the templated question, plus ``answer_prefix``,
  ``task`` and ``max_new_tokens`` (LongBench's budget + 20). They map onto canonical examples with the
  context/question split kept (see :func:`kvpress_record_to_example`). A parquet/jsonl/dir copy with
  these columns is recognised by its columns as well.
- ``dir``: an extracted directory (``<dir>/data/<task>.jsonl`` or ``<dir>/<task>.jsonl``).
- ``jsonl``: one jsonl file with the LongBench fields. Its task is the file name when that is a
  task key, otherwise each record's ``dataset`` field.

Every record becomes a canonical :class:`Example` with the id
``stable_id("longbench", task, _id)`` (kvpress rows: ``stable_id("longbench", task, _id, "kvpress")``;
a hash of question+context when ``_id`` is missing), and ``meta["layout"]`` naming where it came
from: ``official-jsonl`` (zip/dir/jsonl), ``kvpress``, or the parquet layout name.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional
from urllib.parse import quote

from kv_transition.config.schema import LongBenchCfg, PromptConfigSource
from kv_transition.config.schema import LONGBENCH_ZIP_URL
from kv_transition.datasets.download import Progress, fetch_once, recorded, sha256_file
from kv_transition.datasets.schema import Example, stable_id
from kv_transition.errors import DataError

# --------------------------------------------------------------------------------------------
# Task registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    name: str  # exact, case-sensitive key (e.g. "hotpotqa", "hotpotqa_e")
    base: str  # the LongBench v1 task it derives from (itself for v1 tasks)
    language: str  # "en" | "zh" | "code"
    metric: str  # name of the function in LongBench's eval.py dataset2metric
    category: str
    longbench_e: bool

    @property
    def chat_template(self) -> bool:
        """False for the tasks LongBench's pred.py feeds without the chat template."""
        return self.base not in _NO_CHAT_BASE


_V1: tuple[tuple[str, str, str, str], ...] = (
    # name, language, metric (eval.py dataset2metric), category
    ("narrativeqa", "en", "qa_f1_score", "single_doc_qa"),
    ("qasper", "en", "qa_f1_score", "single_doc_qa"),
    ("multifieldqa_en", "en", "qa_f1_score", "single_doc_qa"),
    ("multifieldqa_zh", "zh", "qa_f1_zh_score", "single_doc_qa"),
    ("hotpotqa", "en", "qa_f1_score", "multi_doc_qa"),
    ("2wikimqa", "en", "qa_f1_score", "multi_doc_qa"),
    ("musique", "en", "qa_f1_score", "multi_doc_qa"),
    ("dureader", "zh", "rouge_zh_score", "multi_doc_qa"),
    ("gov_report", "en", "rouge_score", "summarization"),
    ("qmsum", "en", "rouge_score", "summarization"),
    ("multi_news", "en", "rouge_score", "summarization"),
    ("vcsum", "zh", "rouge_zh_score", "summarization"),
    ("trec", "en", "classification_score", "few_shot"),
    ("triviaqa", "en", "qa_f1_score", "few_shot"),
    ("samsum", "en", "rouge_score", "few_shot"),
    ("lsht", "zh", "classification_score", "few_shot"),
    ("passage_count", "en", "count_score", "synthetic"),
    ("passage_retrieval_en", "en", "retrieval_score", "synthetic"),
    ("passage_retrieval_zh", "zh", "retrieval_zh_score", "synthetic"),
    ("lcc", "code", "code_sim_score", "code"),
    ("repobench-p", "code", "code_sim_score", "code"),
)

LONGBENCH_V1_TASKS: tuple[str, ...] = tuple(t[0] for t in _V1)

LONGBENCH_E_BASE_TASKS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
    "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
LONGBENCH_E_TASKS: tuple[str, ...] = tuple(f"{t}_e" for t in LONGBENCH_E_BASE_TASKS)

#: the tasks of kvpress's mirror Xnhyacinth/LongBench (the 16 English v1 tasks, code included)
KVPRESS_MIRROR_TASKS: tuple[str, ...] = tuple(t[0] for t in _V1 if t[1] != "zh")

_NO_CHAT_BASE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})

TASKS: dict[str, TaskInfo] = {}
for _name, _lang, _metric, _cat in _V1:
    TASKS[_name] = TaskInfo(_name, _name, _lang, _metric, _cat, False)
for _base in LONGBENCH_E_BASE_TASKS:
    _b = TASKS[_base]
    TASKS[f"{_base}_e"] = TaskInfo(f"{_base}_e", _base, _b.language, _b.metric, _b.category, True)
del _name, _lang, _metric, _cat, _base, _b

#: tasks fed to the model without the chat template (LongBench pred.py), with their _e variants
NO_CHAT_TEMPLATE_TASKS: frozenset[str] = frozenset(
    n for n, info in TASKS.items() if info.base in _NO_CHAT_BASE
)


def task_info(task: str) -> TaskInfo:
    """The registry entry of an exact task key; DataError listing the valid keys otherwise."""
    info = TASKS.get(task)
    if info is None:
        raise DataError(_unknown_task_message(task))
    return info


def _unknown_task_message(task: str) -> str:
    near = difflib.get_close_matches(task, list(TASKS), n=1, cutoff=0.6)
    if not near:
        near = [n for n in TASKS if n.lower() == str(task).lower()]
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return (
        f"unknown LongBench task {task!r}.{hint} "
        f"Valid tasks: {', '.join(TASKS)}"
    )


def prompt_key(task: str) -> str:
    """The key of a task in dataset2prompt/dataset2maxlen (LongBench-E uses its base task's)."""
    return task_info(task).base


# --------------------------------------------------------------------------------------------
# Record validation and mapping
# --------------------------------------------------------------------------------------------

LAYOUT_OFFICIAL = "official-jsonl"
LAYOUT_KVPRESS = "kvpress"

LONGBENCH_FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")
REQUIRED_FIELDS = ("input", "context", "answers")


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def record_to_example(rec: Any, task: str, where: str, layout: str = LAYOUT_OFFICIAL) -> Example:
    """Validate one LongBench record and map it to the canonical Example.

    ``where`` names the record in error messages, e.g. ``"data/hotpotqa.jsonl line 3"``.
    """
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for f in REQUIRED_FIELDS:
        if f not in rec or rec[f] is None:
            raise DataError(f"{where}: missing required field {f!r} (task {task})")
    if not isinstance(rec["input"], str):
        raise DataError(f"{where}: field 'input' must be a string")
    if not isinstance(rec["context"], str):
        raise DataError(f"{where}: field 'context' must be a string")
    answers = rec["answers"]
    if not _is_str_list(answers) or not answers:
        raise DataError(f"{where}: field 'answers' must be a non-empty list of strings")
    all_classes = rec.get("all_classes")
    if all_classes is not None and not _is_str_list(all_classes):
        raise DataError(f"{where}: field 'all_classes' must be a list of strings or null")
    length = rec.get("length")
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, (int, float)) or int(length) != length:
            raise DataError(f"{where}: field 'length' must be an integer")
        length = int(length)
    orig_id = rec.get("_id")
    if orig_id is not None and not isinstance(orig_id, str):
        raise DataError(f"{where}: field '_id' must be a string")
    info = TASKS[task]
    language = rec.get("language")
    if language is not None and not isinstance(language, str):
        raise DataError(f"{where}: field 'language' must be a string")
    if orig_id:
        example_id = stable_id("longbench", task, orig_id)
    else:
        digest = hashlib.sha256((rec["input"] + "\x00" + rec["context"]).encode("utf-8")).hexdigest()
        example_id = stable_id("longbench", task, "sha256:" + digest)
    meta = {
        "source": "longbench",
        "task": task,
        "language": language or info.language,
        "length": length,
        "all_classes": list(all_classes) if all_classes is not None else None,
        "orig_id": orig_id,
        "dataset": rec.get("dataset") if isinstance(rec.get("dataset"), str) else None,
        "metric": info.metric,
        "category": info.category,
        "longbench_e": info.longbench_e,
        "chat_template": info.chat_template,
        "layout": layout,
    }
    return Example(
        example_id=example_id,
        question=rec["input"],
        context=rec["context"],
        answers=list(answers),
        meta=meta,
    )


#: the columns that mark a row of kvpress's reformatted mirror (``Xnhyacinth/LongBench``)
KVPRESS_FIELDS = ("context", "question", "answer_prefix", "answers")


def is_kvpress_record(rec: Any) -> bool:
    """A kvpress mirror row: ``question`` + ``answer_prefix`` columns instead of LongBench's ``input``."""
    return isinstance(rec, dict) and "input" not in rec and "question" in rec and "answer_prefix" in rec


def kvpress_record_to_example(rec: Any, task: str, where: str) -> Example:
    """Map one row of kvpress's LongBench mirror onto a canonical example.

    The mirror's ``context`` (instruction + document, as kvpress feeds it) stays the example's context
    and its ``question`` the example's question, so the context-only scope still sees the split;
    ``answer_prefix`` (e.g. ``"Answer:"``) and ``max_new_tokens`` go into meta, where the prompt
    builder takes them from (kvpress puts the prefix after the chat template's assistant header).
    """
    for f in KVPRESS_FIELDS:
        if f not in rec or rec[f] is None:
            raise DataError(f"{where}: missing required kvpress column {f!r} (task {task})")
    for f in ("context", "question", "answer_prefix"):
        if not isinstance(rec[f], str):
            raise DataError(f"{where}: kvpress column {f!r} must be a string")
    mnt = rec.get("max_new_tokens")
    if mnt is not None and (isinstance(mnt, bool) or not isinstance(mnt, int) or mnt <= 0):
        raise DataError(f"{where}: kvpress column 'max_new_tokens' must be a positive integer")
    row_task = rec.get("task")
    if isinstance(row_task, str) and row_task and row_task.replace("-e", "_e") not in (task, TASKS[task].base):
        raise DataError(f"{where}: row of task {row_task!r} in the files of LongBench task {task!r}")
    mapped = dict(rec)
    mapped["input"] = rec["question"]
    ex = record_to_example(mapped, task, where)
    if ex.meta.get("orig_id"):
        example_id = stable_id("longbench", task, ex.meta["orig_id"], LAYOUT_KVPRESS)
    else:
        digest = hashlib.sha256((rec["question"] + "\x00" + rec["context"]).encode("utf-8")).hexdigest()
        example_id = stable_id("longbench", task, "sha256:" + digest, LAYOUT_KVPRESS)
    meta = dict(ex.meta)
    meta.update({
        "layout": LAYOUT_KVPRESS,
        "answer_prefix": rec["answer_prefix"],
        "max_new_tokens": mnt,
        # kvpress applies the chat template to every task (KVPressTextGenerationPipeline.preprocess)
        "chat_template": True,
    })
    return Example(example_id=example_id, question=ex.question, context=ex.context, answers=ex.answers, meta=meta)


def any_record_to_example(rec: Any, task: str, where: str, layout: str = LAYOUT_OFFICIAL) -> Example:
    """A record in LongBench's own fields or a kvpress mirror row (told apart by its columns)."""
    if is_kvpress_record(rec):
        return kvpress_record_to_example(rec, task, where)
    return record_to_example(rec, task, where, layout)


def _iter_jsonl(lines: Iterable[bytes | str], name: str) -> Iterator[tuple[int, Any]]:
    for lineno, raw in enumerate(lines, start=1):
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} line {lineno}: invalid JSON ({e.msg})") from None


def _examples_from_jsonl(lines: Iterable[bytes | str], name: str, task: str) -> list[Example]:
    return [any_record_to_example(rec, task, f"{name} line {n}") for n, rec in _iter_jsonl(lines, name)]


def _read_jsonl_file(path: Path, task: str) -> list[Example]:
    try:
        with path.open("rb") as fh:
            return _examples_from_jsonl(fh, str(path), task)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

#: parquet layouts, tried in order; the first that has files for the task wins.
PARQUET_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("hub-parquet-export", "{task}/{split}/*.parquet"),  # refs/convert/parquet: <task>/test/0000.parquet
    ("hub-parquet-export-partial", "{task}/partial-{split}/*.parquet"),
    ("hub-parquet-export-legacy", "{task}/*-{split}.parquet"),  # <task>/long_bench-test.parquet
    ("push-to-hub-config", "{task}/{split}-*.parquet"),  # <task>/test-00000-of-00001.parquet
    ("data-config-dir", "data/{task}/{split}-*.parquet"),
    ("data-flat", "data/{task}.parquet"),
    ("flat", "{task}.parquet"),
)


def _raw_dir(data_root: Path) -> Path:
    return Path(data_root) / "raw" / "longbench"


def _safe_component(s: str) -> str:
    """A filesystem-safe single path component for repo ids / revisions."""
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in s)
    out = out.strip(".") or "_"
    return out[:120]


def _parquet_files_for(root: Path, task: str, split: str) -> tuple[str, list[Path]] | None:
    for layout, pattern in PARQUET_LAYOUTS:
        files = sorted(p for p in root.glob(pattern.format(task=task, split=split)) if p.is_file())
        if files:
            return layout, files
    return None


def _layout_list(split: str) -> str:
    return ", ".join(p.format(task="<task>", split=split) for _, p in PARQUET_LAYOUTS)


def _load_parquet_dir(
    root: Path, task: str, split: str, data_root: Path, expect_kvpress: bool = False
) -> list[Example]:
    found = _parquet_files_for(root, task, split)
    if found is None:
        raise DataError(
            f"no parquet files for LongBench task {task!r} (split {split!r}) under {root}; "
            f"expected one of the layouts: {_layout_list(split)}"
        )
    _layout, files = found
    ds = _datasets_load_parquet(files, split, data_root, task)
    kvpress = "input" not in ds.column_names and "answer_prefix" in ds.column_names
    if expect_kvpress and not kvpress:
        raise DataError(
            f"{files[0]}: not kvpress's LongBench layout (no 'question'/'answer_prefix' columns; columns: "
            f"{', '.join(ds.column_names)}); use dataset.longbench.source parquet for LongBench's own fields"
        )
    required = KVPRESS_FIELDS if kvpress else REQUIRED_FIELDS
    missing = [f for f in required if f not in ds.column_names]
    if missing:
        raise DataError(
            f"{files[0]}: missing required column {missing[0]!r} for LongBench task {task!r} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    where = files[0] if len(files) == 1 else f"{root}/{_layout}"
    return [any_record_to_example(rec, task, f"{where} row {i}", _layout) for i, rec in enumerate(ds)]


def _datasets_load_parquet(files: list[Path], split: str, data_root: Path, task: str):
    import datasets  # heavy; imported only when parquet is actually read

    cache = _raw_dir(data_root) / "hf" / "datasets"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        return datasets.load_dataset(
            "parquet",
            data_files={split: [str(f) for f in files]},
            split=split,
            cache_dir=str(cache),
        )
    except Exception as e:  # pyarrow/datasets errors on corrupt files
        raise DataError(
            f"cannot read parquet for LongBench task {task!r} from {files[0]}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


@contextmanager
def _hub_cache(cache: Path) -> Iterator[None]:
    """Point huggingface_hub's cache at the repo-local cache for the duration of a download."""
    from huggingface_hub import constants

    saved = {k: getattr(constants, k) for k in ("HF_HUB_CACHE", "HF_XET_CACHE") if hasattr(constants, k)}
    cache.mkdir(parents=True, exist_ok=True)
    try:
        for k in saved:
            setattr(constants, k, str(cache / k.lower()))
        yield
    finally:
        for k, v in saved.items():
            setattr(constants, k, v)


def _topmost_missing(path: Path) -> Optional[Path]:
    """The outermost directory of ``path`` that does not exist yet (None if ``path`` exists)."""
    if path.exists():
        return None
    top = path
    while not top.parent.exists():
        top = top.parent
    return top


def _hub_snapshot(
    repo: str, revision: Optional[str], tasks: list[str], split: str, data_root: Path, keys: str = "parquet"
) -> Path:
    """Download the parquet files of `tasks` from a Hub repo into a repo-local directory.

    Files already there are reused without touching the network.
    """
    rev = revision or "main"
    local = _raw_dir(data_root) / "parquet" / _safe_component(repo.replace("/", "__")) / _safe_component(rev)
    wanted = [t for t in tasks if _parquet_files_for(local, t, split) is None]
    if not wanted:
        return local
    from huggingface_hub import snapshot_download

    patterns = [p.format(task=t, split=split) for t in wanted for _, p in PARQUET_LAYOUTS]
    hub_cache = _raw_dir(data_root) / "hf" / "hub"
    fresh = {_topmost_missing(d) for d in (local, hub_cache)} - {None}
    try:
        with _hub_cache(hub_cache):
            snapshot_download(
                repo_id=repo,
                repo_type="dataset",
                revision=rev,
                allow_patterns=patterns,
                local_dir=str(local),
                cache_dir=str(hub_cache),
            )
    except Exception as e:
        for d in sorted(fresh, key=lambda x: len(x.parts)):  # what this call created, nothing older
            shutil.rmtree(d, ignore_errors=True)
        raise DataError(
            f"cannot download LongBench parquet files for {', '.join(wanted)} from the Hub "
            f"(dataset.longbench.{keys}_repo={repo!r}, {keys}_revision={rev!r}): "
            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}; {_alternatives(keys)}"
        ) from None
    return local


def hub_parquet_url(repo: str, revision: Optional[str], task: str, split: str = "test") -> str:
    """The hf:// glob of the default (parquet export) layout; for documentation and debugging."""
    rev = quote(revision or "main", safe="")
    return f"hf://datasets/{repo}@{rev}/" + PARQUET_LAYOUTS[0][1].format(task=task, split=split)


def _load_parquet_source(cfg: LongBenchCfg, data_root: Path) -> dict[str, list[Example]]:
    if cfg.path:
        root = Path(cfg.path)
        if not root.is_dir():
            raise DataError(f"dataset.longbench.path {cfg.path!r}: not a directory of parquet files")
    elif Path(cfg.parquet_repo).is_dir():
        root = Path(cfg.parquet_repo)
    else:
        if cfg.parquet_repo.count("/") != 1 or cfg.parquet_repo.startswith((".", "/")):
            raise DataError(
                f"dataset.longbench.parquet_repo {cfg.parquet_repo!r} is neither an existing "
                "directory nor a Hub dataset id (owner/name)"
            )
        root = _hub_snapshot(cfg.parquet_repo, cfg.parquet_revision, cfg.tasks, cfg.split, data_root)
    return {t: _load_parquet_dir(root, t, cfg.split, data_root) for t in cfg.tasks}


def _load_kvpress_source(cfg: LongBenchCfg, data_root: Path) -> dict[str, list[Example]]:
    """kvpress's mirror: the Hub repo (kvpress loads it as ``load_dataset(repo, data_dir=<task>,
    split="test")``, i.e. the files ``<task>/test-*.parquet``) or a local copy of it."""
    if cfg.path:
        root = Path(cfg.path)
        if not root.is_dir():
            raise DataError(f"dataset.longbench.path {cfg.path!r}: not a directory (a local copy of "
                            f"{cfg.kvpress_repo}, <task>/{cfg.split}-*.parquet)")
    elif Path(cfg.kvpress_repo).is_dir():
        root = Path(cfg.kvpress_repo)
    else:
        if cfg.kvpress_repo.count("/") != 1 or cfg.kvpress_repo.startswith((".", "/")):
            raise DataError(
                f"dataset.longbench.kvpress_repo {cfg.kvpress_repo!r} is neither an existing "
                "directory nor a Hub dataset id (owner/name)"
            )
        root = _hub_snapshot(cfg.kvpress_repo, cfg.kvpress_revision, cfg.tasks, cfg.split, data_root, "kvpress")
    return {t: _load_parquet_dir(root, t, cfg.split, data_root, expect_kvpress=True) for t in cfg.tasks}


def _alternatives(used: str) -> str:
    """The other ways to get LongBench, for a source that cannot be reached."""
    alts = {
        "zip": "set dataset.longbench.path to a local data.zip (downloaded elsewhere from " + LONGBENCH_ZIP_URL + ")",
        "parquet": "use source parquet with a reachable parquet_repo or a local parquet dir in path",
        "kvpress": "use source kvpress with path = a local copy of the Xnhyacinth/LongBench mirror",
        "dir": "use source dir/jsonl with an extracted copy in path",
    }
    first = [alts[used]] if used in alts else []
    return "alternatives: " + "; or ".join(first + [v for k, v in alts.items() if k != used])


def _jsonl_in_dir(root: Path, task: str) -> Path:
    for cand in (root / "data" / f"{task}.jsonl", root / f"{task}.jsonl"):
        if cand.is_file():
            return cand
    raise DataError(
        f"no jsonl for LongBench task {task!r} in {root} (looked for data/{task}.jsonl and {task}.jsonl)"
    )


def _load_dir_source(cfg: LongBenchCfg) -> dict[str, list[Example]]:
    if not cfg.path:
        raise DataError("dataset.longbench.path must name the extracted LongBench directory for source 'dir'")
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"dataset.longbench.path {cfg.path!r}: directory not found")
    return {t: _read_jsonl_file(_jsonl_in_dir(root, t), t) for t in cfg.tasks}


def zip_download_path(url: str, data_root: Path) -> Path:
    """Where a data.zip URL is kept: ``<data_root>/raw/longbench/zip/<sha256(url)[:12]>/data.zip``."""
    return _raw_dir(data_root) / "zip" / hashlib.sha256(url.encode()).hexdigest()[:12] / "data.zip"


def _zip_location(cfg: LongBenchCfg) -> tuple[str, str]:
    """(path-or-URL, the config key that set it)."""
    if cfg.path:
        return cfg.path, "dataset.longbench.path"
    return cfg.url, "dataset.longbench.url"


def _load_zip_source(cfg: LongBenchCfg, data_root: Path, progress: Optional[Progress] = None) -> dict[str, list[Example]]:
    raw = _raw_dir(data_root)
    where, key = _zip_location(cfg)
    if where.startswith(("http://", "https://")):
        zpath = fetch_once(where, zip_download_path(where, data_root), key=key,
                           alternatives=_alternatives("zip"), expected=cfg.sha256, progress=progress)
    else:
        zpath = Path(where)
        if not zpath.is_file():
            raise DataError(f"{key} {where!r}: zip file not found")
        if cfg.sha256 is not None and sha256_file(zpath) != cfg.sha256:
            raise DataError(f"{zpath}: sha256 {sha256_file(zpath)} is not the {cfg.sha256} pinned by "
                            "dataset.longbench.sha256")
    st = zpath.stat()
    extract_key = hashlib.sha256(f"{zpath.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    extract_root = raw / "extracted" / extract_key
    out: dict[str, list[Example]] = {}
    try:
        with zipfile.ZipFile(zpath) as zf:
            names = set(zf.namelist())
            for task in cfg.tasks:
                member = next((m for m in (f"data/{task}.jsonl", f"{task}.jsonl") if m in names), None)
                if member is None:
                    raise DataError(f"{zpath}: no member data/{task}.jsonl for LongBench task {task!r}")
                target = extract_root / "data" / f"{task}.jsonl"  # fixed name: no zip-slip
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
                    with os.fdopen(fd, "wb") as fh, zf.open(member) as src:
                        shutil.copyfileobj(src, fh)
                    os.replace(tmp, target)
                with target.open("rb") as fh:
                    out[task] = _examples_from_jsonl(fh, f"{zpath}:{member}", task)
    except zipfile.BadZipFile:
        raise DataError(f"{zpath}: not a valid zip archive") from None
    return out


def _load_jsonl_source(cfg: LongBenchCfg) -> dict[str, list[Example]]:
    if not cfg.path:
        raise DataError("dataset.longbench.path must name a jsonl file for source 'jsonl'")
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"dataset.longbench.path {cfg.path!r}: jsonl file not found")
    stem_task = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else None
    out: dict[str, list[Example]] = {t: [] for t in cfg.tasks}
    with path.open("rb") as fh:
        for n, rec in _iter_jsonl(fh, str(path)):
            where = f"{path} line {n}"
            if stem_task in TASKS:
                task = stem_task
            else:
                task = rec.get("dataset") if isinstance(rec, dict) else None
                if not isinstance(task, str) or not task:
                    raise DataError(
                        f"{where}: missing field 'dataset' (needed to tell the task, since the file "
                        "name is not a LongBench task key)"
                    )
                if task not in TASKS:
                    raise DataError(f"{where}: {_unknown_task_message(task)}")
            if task in out:
                out[task].append(any_record_to_example(rec, task, where))
    for task, exs in out.items():
        if not exs:
            raise DataError(f"{path}: no records for LongBench task {task!r}")
    return out


def load_longbench(cfg: LongBenchCfg, data_root: Path, progress: Optional[Progress] = None) -> list[Example]:
    """Load the configured LongBench tasks as canonical examples (task order, then record order).

    ``cfg.limit`` keeps the first N records of each task. Raises DataError for unknown tasks,
    missing files, malformed records and duplicate ids.
    """
    if not cfg.tasks:
        raise DataError("dataset.longbench.tasks is empty")
    for t in cfg.tasks:
        task_info(t)
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise DataError(f"dataset.longbench.tasks lists a task twice: {cfg.tasks}")
    data_root = Path(data_root)
    if cfg.source == "parquet":
        by_task = _load_parquet_source(cfg, data_root)
    elif cfg.source == "zip":
        by_task = _load_zip_source(cfg, data_root, progress)
    elif cfg.source == "kvpress":
        by_task = _load_kvpress_source(cfg, data_root)
    elif cfg.source == "dir":
        by_task = _load_dir_source(cfg)
    elif cfg.source == "jsonl":
        by_task = _load_jsonl_source(cfg)
    else:  # pragma: no cover - excluded by the config schema
        raise DataError(f"unknown LongBench source {cfg.source!r}")
    out: list[Example] = []
    seen: dict[str, str] = {}
    for task in cfg.tasks:
        exs = by_task[task]
        if cfg.limit is not None:
            exs = exs[: cfg.limit]
        for ex in exs:
            if ex.example_id in seen:
                raise DataError(
                    f"LongBench task {task!r}: duplicate record (_id {ex.meta.get('orig_id')!r}) "
                    f"gives example id {ex.example_id} twice"
                )
            seen[ex.example_id] = task
            out.append(ex)
    return out


def provenance(cfg: LongBenchCfg, data_root: Path) -> list[dict[str, Any]]:
    """The downloaded files behind a loaded zip source (url, sha256, bytes, downloaded_at), for the
    manifest; [] for sources that are not a downloaded file."""
    if cfg.source != "zip":
        return []
    where, _key = _zip_location(cfg)
    if where.startswith(("http://", "https://")):
        rec = recorded(zip_download_path(where, Path(data_root)))
        return [dict(rec, path=str(zip_download_path(where, Path(data_root))))] if rec else []
    p = Path(where)
    return [{"url": None, "path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}] if p.is_file() else []


# --------------------------------------------------------------------------------------------
# Prompt configuration (dataset2prompt.json / dataset2maxlen.json)
# --------------------------------------------------------------------------------------------

PROMPT_FILE = "dataset2prompt.json"
MAXLEN_FILE = "dataset2maxlen.json"


def _validate_prompt_config(prompts: Any, maxlen: Any, where: str) -> tuple[dict[str, str], dict[str, int]]:
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise DataError(f"{where}/{PROMPT_FILE}: expected a JSON object of task -> template string")
    if not isinstance(maxlen, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
        for k, v in maxlen.items()
    ):
        raise DataError(f"{where}/{MAXLEN_FILE}: expected a JSON object of task -> positive integer")
    missing = [t for t in LONGBENCH_V1_TASKS if t not in prompts or t not in maxlen]
    if missing:
        raise DataError(f"{where}: prompt configuration lacks LongBench tasks: {', '.join(missing)}")
    bad = [t for t in LONGBENCH_V1_TASKS if "{context}" not in prompts[t]]
    if bad:
        raise DataError(f"{where}/{PROMPT_FILE}: templates without {{context}}: {', '.join(bad)}")
    return dict(prompts), dict(maxlen)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read JSON ({e})") from None


def load_prompt_config(
    pc: PromptConfigSource, data_root: Path, *, timeout: float = 20.0
) -> tuple[dict[str, str], dict[str, int]]:
    """LongBench's (dataset2prompt, dataset2maxlen).

    From ``pc.path`` (a local directory) when set; otherwise from the cache under
    ``<data_root>/raw/longbench/config/`` when it was fetched from the same URL before; otherwise
    fetched with httpx from ``<pc.url>/dataset2prompt.json`` and ``…/dataset2maxlen.json`` and
    cached. LongBench-E tasks use their base task's key (see :func:`prompt_key`).
    """
    if pc.path:
        d = Path(pc.path)
        if not d.is_dir():
            raise DataError(f"dataset.longbench.prompt_config.path {pc.path!r}: directory not found")
        return _validate_prompt_config(_read_json(d / PROMPT_FILE), _read_json(d / MAXLEN_FILE), str(d))

    cache = _raw_dir(Path(data_root)) / "config"
    url = pc.url.rstrip("/")
    source_file = cache / "source.json"
    cached = [cache / PROMPT_FILE, cache / MAXLEN_FILE]
    if all(p.is_file() for p in cached) and source_file.is_file():
        try:
            same = json.loads(source_file.read_text(encoding="utf-8")).get("url") == url
        except (OSError, json.JSONDecodeError, AttributeError):
            same = False
        if same:
            return _validate_prompt_config(_read_json(cached[0]), _read_json(cached[1]), str(cache))

    import httpx

    bodies: dict[str, bytes] = {}
    for name in (PROMPT_FILE, MAXLEN_FILE):
        try:
            r = httpx.get(f"{url}/{name}", timeout=timeout, follow_redirects=True)
            r.raise_for_status()
            bodies[name] = r.content
        except httpx.HTTPError as e:
            raise DataError(
                f"cannot fetch LongBench prompt configuration {url}/{name} ({type(e).__name__}: {e}) "
                f"and no cached copy under {cache}; set dataset.longbench.prompt_config.path to a "
                f"local directory holding {PROMPT_FILE} and {MAXLEN_FILE}"
            ) from None
    try:
        prompts = json.loads(bodies[PROMPT_FILE])
        maxlen = json.loads(bodies[MAXLEN_FILE])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{url}: prompt configuration is not valid JSON ({e})") from None
    result = _validate_prompt_config(prompts, maxlen, url)
    cache.mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        _atomic_write(cache / name, body)
    _atomic_write(source_file, json.dumps({"url": url}).encode())
    return result


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


#: alias used by the prompt builder
NO_CHAT_TASKS = NO_CHAT_TEMPLATE_TASKS
