"""The matrix file (`config/matrix/*.yaml`): models × engines × KV methods × ratios/budgets × repeats,
with exclusions and per-engine/model overrides. Typed, unknown keys forbidden.

    name: smoke
    repeats: 1
    models:                      # each entry is merged over the config's `model:` section
      - {id: SmolLM2-135M-Instruct, tp: 1}
    engines:
      kvpress:
        runtime: process         # default: the config's engine.runtime
        compression_ratios: [0.5]           # default knobs for methods that take a ratio
        methods: [full, snapkv, streamingllm, knorm]
      vllm:
        tp: 2
        methods:
          full: {}
          fp8_e4m3: {}
    exclude:
      - {engine: kvpress, method: knorm, compression_ratio: 0.75}
    overrides:
      - match: {engine: vllm, model: meta-llama/Llama-3.1-70B-Instruct}
        tp: 4
        args: [--gpu-memory-utilization, "0.92"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from kv_transition.config.schema import SAFE_ID, TokenizerCfg
from kv_transition.errors import ConfigError

Runtime = Literal["docker", "process", "external"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Knobs(_Strict):
    """Per-engine (or per-engine-and-model) settings that do not multiply cells."""

    runtime: Optional[Runtime] = None
    tag: Optional[str] = None                                # engine version/tag override (enters the cell id)
    tp: Optional[int] = Field(default=None, ge=1, le=64)     # tensor-parallel size = GPUs per engine
    args: list[str] = Field(default_factory=list)            # appended to engine.extra_args (enter the cell id)
    env: dict[str, str] = Field(default_factory=dict)        # engine env (not in the cell id)
    concurrency: Optional[int] = Field(default=None, ge=1)
    device: Optional[Literal["cpu", "cuda", "auto"]] = None
    dtype: Optional[str] = None
    readiness_timeout_s: Optional[float] = Field(default=None, gt=0)
    attention_backend: Optional[str] = None  # pin the attention kernel (enters the cell id); None = engine's choice


class MethodEntry(_Strict):
    compression_ratios: Optional[list[float]] = None  # None = the engine entry's list
    budgets: Optional[list[int]] = None
    params: dict[str, Any] = Field(default_factory=dict)  # kv.params for this method's cells

    @field_validator("compression_ratios")
    @classmethod
    def _ratios(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and any(not 0.0 <= x < 1.0 for x in v):
            raise ValueError(f"compression ratios must lie in [0, 1) (got {v})")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and any(x <= 0 for x in v):
            raise ValueError(f"budgets must be positive token counts (got {v})")
        return v


class EngineEntry(Knobs):
    # names, or {name: entry}, or a list mixing names and full method specs:
    #   - {method: adakv, inner: {method: snapkv}, compression_ratios: [0.5]}
    # (a spec's other fields become the cell's kv.params: parameters and nested presses, in the cell id)
    methods: Union[list[Union[str, dict[str, Any]]], dict[str, Optional[MethodEntry]]]
    compression_ratios: list[float] = Field(default_factory=list)
    budgets: list[int] = Field(default_factory=list)

    @field_validator("compression_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= x < 1.0 for x in v):
            raise ValueError(f"compression ratios must lie in [0, 1) (got {v})")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[int]) -> list[int]:
        if any(x <= 0 for x in v):
            raise ValueError(f"budgets must be positive token counts (got {v})")
        return v

    @field_validator("methods")
    @classmethod
    def _specs(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, m in enumerate(v):
                if isinstance(m, dict) and not isinstance(m.get("method"), str):
                    raise ValueError(f"methods[{i}]: a method spec needs method: <name>")
                if isinstance(m, dict):
                    MethodEntry(**{k: m[k] for k in ("compression_ratios", "budgets") if k in m})
        return v

    def method_entries(self) -> list[tuple[str, MethodEntry]]:
        if isinstance(self.methods, list):
            out = []
            for m in self.methods:
                if isinstance(m, str):
                    out.append((m, MethodEntry()))
                    continue
                rest = {k: v for k, v in m.items() if k not in ("method", "compression_ratios", "budgets")}
                out.append((m["method"], MethodEntry(compression_ratios=m.get("compression_ratios"),
                                                     budgets=m.get("budgets"), params=rest)))
            return out
        return [(m, e or MethodEntry()) for m, e in self.methods.items()]


class ModelEntry(_Strict):
    """Merged over the config's `model:` section (a different tokenizer means a different manifest)."""

    id: str
    path: Optional[str] = None
    revision: Optional[str] = None
    max_context: Optional[int] = Field(default=None, gt=0)
    chat_template: Optional[bool] = None
    tokenizer: Optional[TokenizerCfg] = None
    tp: Optional[int] = Field(default=None, ge=1, le=64)

    def model_section(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude={"tp"}, exclude_none=True)
        return d


Sel = Union[str, list[str], None]


class Match(_Strict):
    model: Sel = None
    engine: Sel = None
    method: Sel = None
    compression_ratio: Union[float, list[float], None] = None
    budget: Union[int, list[int], None] = None

    def matches(self, model: str, engine: str, method: Optional[str] = None,
                compression_ratio: Optional[float] = None, budget: Optional[int] = None) -> bool:
        def ok(sel: Any, val: Any) -> bool:
            if sel is None:
                return True
            return val in sel if isinstance(sel, list) else val == sel

        return (ok(self.model, model) and ok(self.engine, engine) and (method is None or ok(self.method, method))
                and ok(self.compression_ratio, compression_ratio) and ok(self.budget, budget))


class Override(Knobs):
    match: Match


class MatrixFile(_Strict):
    name: str
    description: str = ""
    repeats: Optional[int] = Field(default=None, ge=1)   # None = the config's decoding.repeats
    base_port: Optional[int] = Field(default=None, gt=0, lt=65536)  # None = the config's engine.port
    models: list[ModelEntry] = Field(default_factory=list)  # empty = the config's model
    engines: dict[str, EngineEntry]
    exclude: list[Match] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)
    # request-mode groups (one engine serves every method/ratio): run the group's cells at the same time and
    # send example-major, so each example's (press, ratio) requests reach the engine together (it can share
    # their prefill); false = one cell after the other (baseline first)
    interleave: bool = True
    interleave_window: int = Field(default=2, ge=1)  # examples in flight in an interleaved group at a time
    _source: Optional[str] = PrivateAttr(default=None)  # the file it was read from (for error messages)

    @property
    def source(self) -> str:
        """What error messages name: the matrix file, or `matrix <name>` for one built in code."""
        return self._source or f"matrix {self.name}"

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not SAFE_ID.match(v):
            raise ValueError(f"{v!r} is not a safe identifier")
        return v

    @model_validator(mode="after")
    def _nonempty(self) -> "MatrixFile":
        if not self.engines:
            raise ValueError("engines: at least one engine")
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError("models: duplicate model id")
        return self


def load_matrix(path: str | Path) -> MatrixFile:
    """Read and validate a matrix file; every error is one line naming the file and the key path."""
    from kv_transition.config.loader import format_validation_error, interpolate
    from kv_transition.config.yamlio import read_yaml_mapping

    p = Path(path)
    data = read_yaml_mapping(p, "matrix")
    data.setdefault("name", p.name.split(".")[0])
    import os

    data = interpolate(data, dict(os.environ), "", str(p))  # ${VAR} / ${VAR:-default}, as in configs
    try:
        m = MatrixFile.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(p), model=MatrixFile)) from None
    m._source = str(p)
    return m
