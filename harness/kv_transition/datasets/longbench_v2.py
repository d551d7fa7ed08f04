"""LongBench v2 (``THUDM/LongBench-v2``): 503 four-way multiple-choice questions over contexts of 8k to
2M words, loaded as canonical examples of the one task ``longbench_v2``.

The data is the Hub repo's ``data.json`` (a JSON list; ``url`` is downloaded once into
``<data_root>/raw/longbench_v2/<url-hash>/data.json`` with its sha256 recorded, or ``path`` names a
local ``data.json`` / ``.jsonl``). Each record has the fields LongBench v2's README lists: ``_id``,
``domain``, ``sub_domain``, ``difficulty`` (easy | hard), ``length`` (short | medium | long: its
length split), ``question``, ``choice_A`` … ``choice_D``, ``answer`` (A-D) and ``context``.

The example's context is the record's context and its question the record's question, both stripped
like LongBench v2's pred.py strips them; the choices are in ``meta["choices"]`` and fill the template's
``{choice_A}`` … ``{choice_D}``; ``answers`` is ``[answer]``. The category fields go into meta, where
scoring (accuracy per domain, sub-domain, difficulty and length split) reads them.

The prompt templates are LongBench v2's own files (``prompts/0shot.txt``, ``prompts/0shot_cot.txt``,
``prompts/0shot_cot_ans.txt``), fetched from ``prompt_config.url`` at prepare time and cached, or read
from ``prompt_config.path``; their ``$DOC$ $Q$ $C_A$ … $C_D$ $COT$`` placeholders become
``{context} {input} {choice_A} … {choice_D} {cot}``. Generation budgets are pred.py's: 128 new tokens;
with chain-of-thought (``pred.py --cot``) 1024 for the reasoning request, then a second request with
``0shot_cot_ans.txt`` (the question, the choices and the reasoning, stripped, in ``$COT$``; the real file
has no ``$DOC$``) and 128 new tokens, whose response is the one scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from kv_transition.config.schema import LONGBENCH_V2_URL, LongBenchV2Cfg, LongBenchV2PromptSource
from kv_transition.datasets.download import Progress, fetch_once, recorded, sha256_file
from kv_transition.datasets.schema import Example, stable_id
from kv_transition.errors import DataError

TASK = "longbench_v2"
METRIC = "accuracy"
FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question",
          "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")
CHOICES = ("A", "B", "C", "D")
LENGTHS = ("short", "medium", "long")
DIFFICULTIES = ("easy", "hard")
#: the six task categories (``domain``) of the paper / README
DOMAINS = (
    "Single-Document QA", "Multi-Document QA", "Long In-context Learning",
    "Long-dialogue History Understanding", "Code Repository Understanding", "Long Structured Data Understanding",
)

PROMPT_FILE = "0shot.txt"
PROMPT_FILE_COT = "0shot_cot.txt"
PROMPT_FILE_COT_ANS = "0shot_cot_ans.txt"
MAX_NEW_TOKENS = 128  # pred.py: query_llm(..., max_new_tokens=128)
MAX_NEW_TOKENS_COT = 1024  # pred.py --cot: the reasoning pass
MAX_NEW_TOKENS_COT_ANS = 128  # pred.py --cot: the answer pass (0shot_cot_ans.txt)
#: LongBench v2's placeholders → the harness's (prompts.fill); $COT$ only in 0shot_cot_ans.txt
PLACEHOLDERS = (("$DOC$", "{context}"), ("$Q$", "{input}"), ("$C_A$", "{choice_A}"),
                ("$C_B$", "{choice_B}"), ("$C_C$", "{choice_C}"), ("$C_D$", "{choice_D}"))
COT_PLACEHOLDER = ("$COT$", "{cot}")


def _raw_dir(data_root: Path) -> Path:
    return Path(data_root) / "raw" / "longbench_v2"


def download_path(url: str, data_root: Path) -> Path:
    return _raw_dir(data_root) / hashlib.sha256(url.encode()).hexdigest()[:12] / "data.json"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def record_to_example(rec: Any, where: str) -> Example:
    """Validate one LongBench v2 record and map it to the canonical example."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for f in FIELDS:
        if f not in rec or rec[f] is None:
            raise DataError(f"{where}: missing required LongBench v2 field {f!r}")
        if not isinstance(rec[f], str):
            raise DataError(f"{where}: field {f!r} must be a string")
    if rec["answer"] not in CHOICES:
        raise DataError(f"{where}: field 'answer' must be one of A, B, C, D (got {rec['answer']!r})")
    if rec["length"] not in LENGTHS:
        raise DataError(f"{where}: field 'length' must be one of {', '.join(LENGTHS)} (got {rec['length']!r})")
    if rec["difficulty"] not in DIFFICULTIES:
        raise DataError(
            f"{where}: field 'difficulty' must be one of {', '.join(DIFFICULTIES)} (got {rec['difficulty']!r})"
        )
    if not rec["_id"]:
        raise DataError(f"{where}: field '_id' is empty")
    meta = {
        "source": "longbench_v2",
        "task": TASK,
        "language": "en",
        "metric": METRIC,
        "orig_id": rec["_id"],
        "domain": rec["domain"],
        "sub_domain": rec["sub_domain"],
        "difficulty": rec["difficulty"],
        "length_split": rec["length"],
        "choices": {k: rec[f"choice_{k}"].strip() for k in CHOICES},
        "layout": "longbench-v2-json",
        "chat_template": True,
    }
    return Example(
        example_id=stable_id("longbench_v2", rec["_id"]),
        question=rec["question"].strip(),
        context=rec["context"].strip(),
        answers=[rec["answer"]],
        meta=meta,
    )


def _iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of a data.json (one JSON list) or a .jsonl file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        for i, rec in enumerate(data):
            yield f"{path} item {i}", rec
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path} line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None


def _data_file(cfg: LongBenchV2Cfg, data_root: Path, progress: Optional[Progress] = None) -> Path:
    if cfg.path:
        p = Path(cfg.path)
        if not p.is_file():
            raise DataError(f"dataset.longbench_v2.path {cfg.path!r}: file not found (data.json or .jsonl)")
        if cfg.sha256 is not None and sha256_file(p) != cfg.sha256:
            raise DataError(f"{p}: sha256 {sha256_file(p)} is not the {cfg.sha256} pinned by "
                            "dataset.longbench_v2.sha256")
        return p
    alternatives = ("alternatives: set dataset.longbench_v2.path to a local data.json (from " + LONGBENCH_V2_URL
                    + ", or the THUDM/LongBench-v2 dataset repo), or dataset.longbench_v2.url to a reachable mirror")
    return fetch_once(cfg.url, download_path(cfg.url, data_root), key="dataset.longbench_v2.url",
                      alternatives=alternatives, expected=cfg.sha256, progress=progress)


def load_longbench_v2(cfg: LongBenchV2Cfg, data_root: Path, progress: Optional[Progress] = None) -> list[Example]:
    """The configured LongBench v2 examples in file order, filtered by domain / length split /
    difficulty, then the first ``limit``. DataError on a malformed record, a duplicate ``_id``, an
    unknown filter value or an empty selection."""
    path = _data_file(cfg, Path(data_root), progress)
    out: list[Example] = []
    seen: set[str] = set()
    domains_seen: set[str] = set()
    for where, rec in _iter_records(path):
        ex = record_to_example(rec, where)
        if ex.example_id in seen:
            raise DataError(f"{where}: duplicate _id {ex.meta['orig_id']!r}")
        seen.add(ex.example_id)
        domains_seen.add(ex.meta["domain"])
        if cfg.domains and ex.meta["domain"] not in cfg.domains:
            continue
        if cfg.lengths and ex.meta["length_split"] not in cfg.lengths:
            continue
        if cfg.difficulties and ex.meta["difficulty"] not in cfg.difficulties:
            continue
        out.append(ex)
    unknown = [d for d in cfg.domains if d not in domains_seen]
    if unknown:
        raise DataError(f"dataset.longbench_v2.domains: {unknown[0]!r} is not a domain of {path} "
                        f"(domains: {', '.join(sorted(domains_seen))})")
    if cfg.limit is not None:
        out = out[: cfg.limit]
    if not out:
        raise DataError(f"{path}: no LongBench v2 records left after the domains/lengths/difficulties filters")
    return out


def provenance(cfg: LongBenchV2Cfg, data_root: Path) -> list[dict[str, Any]]:
    """The data file behind the examples (url, sha256, bytes, downloaded_at), for the manifest."""
    if cfg.path:
        p = Path(cfg.path)
        return [{"url": None, "path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}] if p.is_file() else []
    dest = download_path(cfg.url, Path(data_root))
    rec = recorded(dest)
    return [dict(rec, path=str(dest))] if rec else []


# --------------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------------


def to_template(text: str, where: str, *, answer: bool = False) -> str:
    """A LongBench v2 template ($DOC$ $Q$ $C_A$…) in the harness's placeholders. ``answer``: the
    0shot_cot_ans template, which needs $COT$ and may leave $DOC$ out (the real one does)."""
    required = [old for old, _new in PLACEHOLDERS if not (answer and old == "$DOC$")]
    if answer:
        required.append(COT_PLACEHOLDER[0])
    missing = [old for old in required if old not in text]
    if missing:
        raise DataError(f"{where}: LongBench v2 template without {', '.join(missing)}")
    if not answer and COT_PLACEHOLDER[0] in text:
        raise DataError(f"{where}: $COT$ belongs in {PROMPT_FILE_COT_ANS} only")
    for old, new in PLACEHOLDERS + ((COT_PLACEHOLDER,) if answer else ()):
        text = text.replace(old, new)
    return text


def load_answer_template(pc: LongBenchV2PromptSource, data_root: Path, *, timeout: float = 20.0) -> str:
    """The 0shot_cot_ans template of pred.py --cot's second request (``{cot}`` = the first response)."""
    return load_template(pc, data_root, cot=True, timeout=timeout, name=PROMPT_FILE_COT_ANS)


def load_template(pc: LongBenchV2PromptSource, data_root: Path, cot: bool, *, timeout: float = 20.0,
                  name: Optional[str] = None) -> str:
    """The 0shot (or 0shot_cot, or ``name``) template, from ``pc.path``, the cache of an earlier fetch from
    the same URL, or fetched from ``<pc.url>/<file>`` and cached under ``<data_root>/raw/longbench_v2/prompts/``."""
    name = name or (PROMPT_FILE_COT if cot else PROMPT_FILE)
    answer = name == PROMPT_FILE_COT_ANS
    if pc.path:
        d = Path(pc.path)
        if not d.is_dir():
            raise DataError(f"dataset.longbench_v2.prompt_config.path {pc.path!r}: directory not found")
        f = d / name
        try:
            return to_template(f.read_text(encoding="utf-8"), str(f), answer=answer)
        except FileNotFoundError:
            raise DataError(f"{f}: file not found (LongBench v2's prompts/{name})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {f}: {e}") from None
    url = pc.url.rstrip("/")
    cache = _raw_dir(Path(data_root)) / "prompts" / hashlib.sha256(url.encode()).hexdigest()[:12]
    cached = cache / name
    if cached.is_file():
        return to_template(cached.read_text(encoding="utf-8"), str(cached), answer=answer)
    import httpx

    try:
        r = httpx.get(f"{url}/{name}", timeout=timeout, follow_redirects=True)
        r.raise_for_status()
        text = r.content.decode("utf-8")
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeDecodeError) as e:
        raise DataError(
            f"cannot fetch LongBench v2 prompt template {url}/{name} ({type(e).__name__}: {' '.join(str(e).split())}) "
            f"and no cached copy under {cache}; set dataset.longbench_v2.prompt_config.path to a local "
            f"directory holding {PROMPT_FILE}, {PROMPT_FILE_COT} and {PROMPT_FILE_COT_ANS} (LongBench's prompts/)"
        ) from None
    template = to_template(text, f"{url}/{name}", answer=answer)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".part-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode("utf-8"))
    os.replace(tmp, cached)
    return template


def max_new_tokens(cot: bool) -> int:
    return MAX_NEW_TOKENS_COT if cot else MAX_NEW_TOKENS


def followup(pc: LongBenchV2PromptSource, data_root: Path) -> dict[str, Any]:
    """The manifest's description of pred.py --cot's second request for this task: the 0shot_cot_ans
    template (``{cot}`` = the first response, stripped), its budget, chat template on."""
    return {"template": load_answer_template(pc, data_root), "max_new_tokens": MAX_NEW_TOKENS_COT_ANS,
            "chat": True, "file": PROMPT_FILE_COT_ANS, "strip": True, "skip_empty": True}
