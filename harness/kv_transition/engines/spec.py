"""Engine specs: `engines/<name>/engine.yaml` (data) → `ResolvedSpec` (a plain value).

Engine differences live in the YAML, never in if-branches of the runner: a KV method is either
server args (vLLM/SGLang: one container per method) or per-request body fields (kvpress: one
loaded model serves many methods/budgets).
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from kv_transition.config.secrets import SECRET_ENV, mask_env  # noqa: F401 - SECRET_ENV re-exported
from kv_transition.errors import ConfigError


def engines_root() -> Path:
    """The repo's engines/ dir (next to harness/), or $KVT_ENGINES_DIR."""
    import os

    env = os.environ.get("KVT_ENGINES_DIR")
    if env:
        return Path(env)
    return builtin_engines_root()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HealthDef(_Strict):
    path: str = "/health"
    # tried in order when `path` answers 404/405/501 (a server without a health route, e.g. llama-cpp-python)
    fallback_paths: list[str] = Field(default_factory=list)
    readiness_timeout_s: float = 900.0
    interval_s: float = 1.0


class MetricsDef(_Strict):
    path: Optional[str] = "/metrics"
    kv_usage: list[str] = Field(default_factory=list)  # metric names meaning "KV cache usage"


class BuildDef(_Strict):
    context: str
    dockerfile: str = "Dockerfile"
    args: dict[str, str] = Field(default_factory=dict)


RuntimeName = Literal["docker", "process", "external"]


class MethodRuntimeDef(_Strict):
    """What one method does differently under one runtime (e.g. another server binary's flags)."""

    args: Optional[list[str]] = None              # replaces the method's args
    request: Optional[dict[str, Any]] = None      # replaces the method's request fields
    unsupported: Optional[str] = None             # the reason this method cannot run under this runtime

class MountsDef(_Strict):
    """Where the engine's container sees what the harness mounts (docker runtime only)."""

    model_dir: str = "/models"           # a local model.path is mounted read-only at <model_dir>/<basename>
    hf_cache: Optional[str] = None       # the container's HF cache dir (HF_HOME); None = no shared cache


class AttentionBackendDef(_Strict):
    """How the engine takes a pinned attention backend, and how its startup log names the one it used."""

    args: list[str] = Field(default_factory=list)       # e.g. ["--attention-backend", "{attention_backend}"]
    env: dict[str, str] = Field(default_factory=dict)   # e.g. {SOME_ENV: "{attention_backend}"}
    log_patterns: list[str] = Field(default_factory=list)  # regexes with a (?P<backend>…) group; last match wins

    @field_validator("log_patterns")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for pat in v:
            try:
                rx = re.compile(pat)
            except re.error as e:
                raise ValueError(f"invalid regex {pat!r}: {e}") from None
            if "backend" not in rx.groupindex:
                raise ValueError(f"regex {pat!r} has no (?P<backend>...) group")
        return v


_CC = re.compile(r"^\d+\.\d+$")


class RequiresDef(_Strict):
    """The hardware a method needs, as data: the plan refuses a method the GPU cannot run."""

    min_compute_capability: Optional[str] = None  # "major.minor", e.g. "10.0" = SM100 (Blackwell)
    max_compute_capability: Optional[str] = None  # inclusive, e.g. "10.9": the SM100 family only

    @field_validator("min_compute_capability", "max_compute_capability")
    @classmethod
    def _cc(cls, cc: Optional[str]) -> Optional[str]:
        if cc is not None and not _CC.match(cc):
            raise ValueError(f"{cc!r} is not major.minor (e.g. \"9.0\", \"10.0\")")
        return cc

    def refusal(self, cc: tuple[int, int]) -> Optional[str]:
        """Why a GPU of compute capability `cc` cannot run the method (None: it can)."""
        lo = parse_cc(self.min_compute_capability) if self.min_compute_capability else None
        hi = parse_cc(self.max_compute_capability) if self.max_compute_capability else None
        if (lo and cc < lo) or (hi and cc > hi):
            want = (f"{self.min_compute_capability}..{self.max_compute_capability}" if lo and hi
                    else f">= {self.min_compute_capability}" if lo else f"<= {self.max_compute_capability}")
            return f"needs compute capability {want}, the GPU has {cc[0]}.{cc[1]}"
        return None


def parse_cc(text: str) -> tuple[int, int]:
    """ "9.0" / "sm90" / "sm_100" / "10.0" → (major, minor)."""
    t = str(text).strip().lower().removeprefix("sm").lstrip("_")
    if _CC.match(t):
        major, minor = t.split(".")
        return int(major), int(minor)
    if t.isdigit() and len(t) >= 2:
        return int(t[:-1]), int(t[-1])
    raise ValueError(f"{text!r} is not a compute capability (e.g. 9.0, sm90, 10.0)")


class ArgcheckDef(_Strict):
    """engines/<name>/<script>: parses the engine argv with the engine's own parser (see CONTRACT in docs)."""

    script: str
    python: str = "python3"


class MethodDef(_Strict):
    description: str = ""
    aliases: list[str] = Field(default_factory=list)         # other names of the SAME method (resolve to this one)
    requires: RequiresDef = Field(default_factory=RequiresDef)
    args: list[str] = Field(default_factory=list)           # server args (server-mode engines)
    request: dict[str, Any] = Field(default_factory=dict)   # body fields merged into every request
    env: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)    # defaults for {placeholders} in args
    supports: list[Literal["compression_ratio", "budget"]] = Field(default_factory=list)
    baseline: bool = False                                   # the full-cache reference of this engine
    runtimes: dict[RuntimeName, MethodRuntimeDef] = Field(default_factory=dict)
    properties: dict[str, Any] = Field(default_factory=dict)  # catalog data (attention, phase, memory, ...)


class PrefixCacheDef(_Strict):
    """How a retry or a repeat of a prompt is kept from being served by the engine's prefix cache.

    `bust_request` fields are merged into the body of every retry and every repeat > 0; a string value
    "{nonce}" becomes a value unique to that attempt (vLLM `cache_salt`). Empty = the engine has no such
    knob: those responses are flagged `cache_risk` and the report leaves their latencies out."""

    bust_request: dict[str, Any] = Field(default_factory=dict)
    note: str = ""


class VerifyDef(_Strict):
    """Proof, read from the engine's log after it is ready, that it runs what the cell claims.

    `log_regex` (Python re, MULTILINE) must match; each `expect` key names a group of it whose text must
    equal the value ({placeholders} filled like args). No match within `timeout_s` or a different value:
    the cell is refused with the reason."""

    log_regex: str
    expect: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = 10.0


class VersionDef(_Strict):
    """Where a running engine says its version (checked against the spec's tag after it is healthy)."""
    path: str                  # GET path, e.g. /version (vLLM)
    key: str = "version"       # JSON key of the version string


class EngineRuntimeDef(_Strict):
    """How the same engine runs under one runtime (e.g. a pip-installed vLLM, or llama-cpp-python's
    server, under the process runtime; the docker image's binary may take other flags). A key set here
    replaces the engine's; `env` is merged over it; `image` is what is recorded instead of the container
    image (its digest is dropped)."""

    description: str = ""
    image: Optional[str] = None
    command: Optional[list[str]] = None
    args: Optional[list[str]] = None
    env: Optional[dict[str, str]] = None
    health: Optional[HealthDef] = None
    models_path: Optional[str] = None
    metrics: Optional[MetricsDef] = None
    request: Optional[dict[str, Any]] = None
    prefix_cache: Optional[PrefixCacheDef] = None
    verify: Optional[VerifyDef] = None
    concurrency: Optional[int] = None
    gpu: Optional[bool] = None
    send_add_special_tokens: Optional[bool] = None


class EngineDef(_Strict):
    name: str
    description: str = ""
    image: Optional[str] = None   # required for the docker runtime only
    tag: Optional[str] = None
    digest: Optional[str] = None  # sha256:… when pinned (kvt lock fills a lock file instead)
    build: Optional[BuildDef] = None
    command: list[str] = Field(default_factory=list)  # entrypoint override; for process runtime the argv head
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    passthrough_env: list[str] = Field(default_factory=lambda: ["HF_TOKEN"])  # copied from the host env if set
    health: HealthDef = Field(default_factory=HealthDef)
    models_path: str = "/v1/models"
    metrics: MetricsDef = Field(default_factory=MetricsDef)
    concurrency: int = 8
    # true: needs a GPU unless engine.device is cpu; optional: runs on the CPU too (GPUs are given explicitly
    # when the device is cuda, or auto and NVML sees some); false: never gets one
    gpu: Union[bool, Literal["optional"]] = True
    ipc_mode: Optional[str] = "host"
    shm_size: Optional[str] = None
    method_mode: Literal["server", "request"] = "server"
    request: dict[str, Any] = Field(default_factory=dict)  # fields in every request body
    send_add_special_tokens: bool = True  # pass each manifest entry's add_special_tokens in the body
    version: Optional[VersionDef] = None   # checked after health: a mismatch with the tag is a start error
    # config: the body's model is model.id (the engine is started with it as its served name);
    # server: the id the server lists at models_path (model.id when listed, else the only one)
    served_model: Literal["config", "server"] = "config"
    prefix_cache: PrefixCacheDef = Field(default_factory=PrefixCacheDef)
    verify: Optional[VerifyDef] = None
    runtimes: dict[RuntimeName, EngineRuntimeDef] = Field(default_factory=dict)
    mounts: MountsDef = Field(default_factory=MountsDef)
    argcheck: Optional[ArgcheckDef] = None   # engines/<name>/<script>: the engine's own argv parser
    attention_backend: Optional[AttentionBackendDef] = None
    methods: dict[str, MethodDef]
    _dir: Optional[Path] = PrivateAttr(default=None)   # engines/<name>/ it was loaded from

    @property
    def engine_dir(self) -> Path:
        return self._dir or engines_root() / self.name

    @model_validator(mode="after")
    def _aliases(self) -> "EngineDef":
        seen: dict[str, str] = {}
        for name, m in self.methods.items():
            for a in m.aliases:
                if a in self.methods or a in seen:
                    raise ValueError(f"methods.{name}.aliases: {a!r} is already "
                                     + ("a method" if a in self.methods else f"an alias of {seen[a]!r}"))
                seen[a] = name
        return self

    def canonical_method(self, method: str) -> str:
        """The catalog name of `method` (an alias resolves to the method it names; unknown stays as is)."""
        if method in self.methods:
            return method
        return next((n for n, m in self.methods.items() if method in m.aliases), method)

    def for_runtime(self, runtime: Optional[str]) -> "EngineDef":
        """This engine with the `runtimes.<runtime>` replacements applied (itself when none)."""
        o = self.runtimes.get(runtime) if runtime else None  # type: ignore[call-overload]
        if o is None:
            return self
        upd = {k: v for k, v in o.model_dump(exclude_unset=True).items() if v is not None}
        upd.pop("description", None)
        for k in ("health", "metrics", "prefix_cache", "verify"):
            if k in upd:
                upd[k] = getattr(o, k)
        if o.env:
            upd["env"] = {**self.env, **o.env}
        if o.image:
            upd["digest"] = None
        return self.model_copy(update=upd)


#: engines that ship with the harness and stay available when $KVT_ENGINES_DIR points elsewhere
BUILTIN_ENGINES = ("openai",)


def builtin_engines_root() -> Path:
    return Path(__file__).resolve().parents[3] / "engines"


def load_engine(name: str, root: Optional[Path] = None) -> EngineDef:
    root = root or engines_root()
    path = root / name / "engine.yaml"
    if not path.is_file() and name in BUILTIN_ENGINES:
        path = builtin_engines_root() / name / "engine.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in root.glob("*/engine.yaml"))
        raise ConfigError(f"engine.name: unknown engine {name!r} (known: {', '.join(known) or 'none'}; looked in {root})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        eng = EngineDef.model_validate(data)
        eng._dir = path.parent
        return eng
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    except ValidationError as e:
        er = e.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(map(str, er['loc']))}: {er['msg']}") from None


def list_engines(root: Optional[Path] = None) -> list[str]:
    root = root or engines_root()
    return sorted(p.parent.name for p in root.glob("*/engine.yaml"))


@dataclass(frozen=True)
class Mount:
    """One bind mount into the engine container: host `source` → container `target`."""

    source: str
    target: str
    read_only: bool = True
    kind: str = "extra"          # model | hf_cache | extra

    def volume(self) -> str:
        return f"{self.source}:{self.target}:{'ro' if self.read_only else 'rw'}"


@dataclass(frozen=True)
class ResolvedSpec:
    """Everything needed to start one engine for one KV method — a plain, printable value."""

    engine: str
    method: str
    compression_ratio: Optional[float]
    budget: Optional[int]
    method_mode: str
    image: str
    tag: str
    digest: Optional[str]
    command: list[str]
    args: list[str]
    env: dict[str, str]
    gpus: list[int]
    host: str
    port: int
    ipc_mode: Optional[str]
    shm_size: Optional[str]
    health_path: str
    readiness_timeout_s: float
    health_interval_s: float
    models_path: str
    metrics_path: Optional[str]
    kv_usage_metrics: list[str]
    concurrency: int
    request_extras: dict[str, Any] = field(default_factory=dict)
    served_model: str = ""
    build: Optional[dict[str, Any]] = None
    gpu: Union[bool, str] = True                      # engine.yaml gpu: true | false | "optional"
    send_add_special_tokens: bool = True
    health_fallback_paths: list[str] = field(default_factory=list)
    served_model_from: str = "config"                   # config | server (see EngineDef.served_model)
    cache_bust_request: dict[str, Any] = field(default_factory=dict)  # merged into retries and repeats
    verify: Optional[dict[str, Any]] = None             # log_regex, expect (filled), timeout_s
    baseline: bool = False
    runtime: Optional[str] = None                 # the runtime variant applied (None = the engine's defaults)
    version_path: Optional[str] = None            # GET → JSON {version_key: "<version>"}, compared with tag
    version_key: str = "version"
    device: str = "auto"                             # engine.device: cpu | cuda | auto
    mounts: list[Mount] = field(default_factory=list)
    attention_backend: Optional[str] = None          # the pinned backend (None = the engine chooses)
    backend_log_patterns: list[str] = field(default_factory=list)
    argcheck: Optional[dict[str, str]] = None        # {"script": relative to engine_dir, "engine_dir", "python"}

    @property
    def needs_gpu(self) -> bool:
        """A GPU engine not told to run on the CPU: it must get explicit GPUs (never none)."""
        if self.gpu == "optional":
            return self.device == "cuda"
        return bool(self.gpu) and self.device != "cpu"

    @property
    def wants_gpu(self) -> bool:
        """Gets GPUs when some can be resolved: needs_gpu, or an optional-GPU engine on device auto."""
        return self.needs_gpu or (self.gpu == "optional" and self.device == "auto")

    @property
    def image_ref(self) -> str:
        if not self.image:
            return ""
        return f"{self.image}@{self.digest}" if self.digest else f"{self.image}:{self.tag}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def server_key(self) -> str:
        """Cells with the same server key can share one running engine (request-mode methods)."""
        return "|".join([self.engine, self.image_ref, shlex.join(self.command + self.args),
                         ",".join(map(str, self.gpus))])

    def masked_env(self) -> dict[str, str]:
        return mask_env(self.env)

    def to_dict(self, mask: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if mask:
            d["env"] = self.masked_env()
        d["image_ref"] = self.image_ref
        return d

    def docker_run(self) -> str:
        """The exact `docker run` equivalent (secrets masked), for dry runs."""
        parts = ["docker", "run", "--rm", "--network", "host"]
        if self.ipc_mode:
            parts += ["--ipc", self.ipc_mode]
        if self.shm_size:
            parts += ["--shm-size", self.shm_size]
        if self.gpu and self.gpus:
            parts += ["--gpus", f'"device={",".join(map(str, self.gpus))}"']
        elif self.needs_gpu:
            parts += ["--gpus", '"device=<none resolved>"']
        for m in self.mounts:
            parts += ["-v", m.volume()]
        for k, v in sorted(self.masked_env().items()):
            parts += ["-e", f"{k}={v}"]
        if self.command:
            parts += ["--entrypoint", self.command[0]]
        parts.append(self.image_ref)
        parts += self.command[1:] + self.args
        return shlex.join(parts).replace("'\"device=", "\"device=").replace("\"'", "\"")


def _fill(items: list[str], values: dict[str, Any], where: str) -> list[str]:
    out = []
    for a in items:
        try:
            out.append(a.format(**values))
        except KeyError as e:
            raise ConfigError(f"{where}: placeholder {{{e.args[0]}}} has no value") from None
    return out


def resolve(
    eng: EngineDef,
    method: str,
    *,
    compression_ratio: Optional[float] = None,
    budget: Optional[int] = None,
    model_path: str,
    served_model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    gpus: Optional[list[int]] = None,
    device: str = "auto",
    dtype: str = "auto",
    max_context: int = 8192,
    tensor_parallel: int = 1,
    extra_args: Optional[list[str]] = None,
    env: Optional[dict[str, str]] = None,
    host_env: Optional[dict[str, str]] = None,
    digest: Optional[str] = None,
    params: Optional[dict[str, Any]] = None,
    request_params: Optional[dict[str, Any]] = None,
    runtime: Optional[str] = None,
    tag: Optional[str] = None,
    mounts: Optional[list[Mount]] = None,
    attention_backend: Optional[str] = None,
) -> ResolvedSpec:
    """`runtime` applies that runtime's variant from `runtimes:` (command, args, image, env, health, …)
    and the method's `runtimes:` entry; `tag` overrides the engine's tag (e.g. the version of a
    pip-installed engine)."""
    method = eng.canonical_method(method)  # an alias is the same method, recorded under one name
    if method not in eng.methods:
        hint = " (declare variants in an engine.yaml: docs/engines.md)" if eng.name == "openai" else ""
        raise ConfigError(f"kv.method: engine {eng.name!r} has no method {method!r} "
                          f"(known: {', '.join(eng.methods)}){hint}")
    variant = eng.runtimes.get(runtime) if runtime else None  # type: ignore[call-overload]
    eng = eng.for_runtime(runtime)
    m = eng.methods[method]
    mr = m.runtimes.get(runtime) if runtime else None  # type: ignore[call-overload]
    if mr is not None and mr.unsupported:
        raise ConfigError(f"kv.method: {eng.name}/{method} cannot run under the {runtime} runtime: {mr.unsupported}")
    if mr is not None:
        m = m.model_copy(update={k: v for k, v in (("args", mr.args), ("request", mr.request)) if v is not None})
    if runtime == "docker" and not (eng.image and (tag or eng.tag or eng.digest or digest)):
        raise ConfigError(f"engines/{eng.name}/engine.yaml: image and tag: required for the docker runtime")
    for name, val in (("compression_ratio", compression_ratio), ("budget", budget)):
        if val is not None and name not in m.supports:
            raise ConfigError(f"kv.{name}: method {eng.name}/{method} does not take a {name}")
    values = {"model_path": model_path, "served_model": served_model, "host": host, "port": port,
              "device": device, "dtype": dtype, "max_context": max_context, "tp": tensor_parallel,
              **m.params, **(params or {})}
    args = _fill(eng.args, values, f"engines/{eng.name}/engine.yaml: args")
    args += _fill(m.args, values, f"engines/{eng.name}/engine.yaml: methods.{method}.args")
    ab_env: dict[str, str] = {}
    if attention_backend is not None:
        if eng.attention_backend is None or not (eng.attention_backend.args or eng.attention_backend.env):
            raise ConfigError(f"engine.attention_backend: engine {eng.name!r} does not declare how it takes an "
                              f"attention backend (engines/{eng.name}/engine.yaml: attention_backend)")
        v = {**values, "attention_backend": attention_backend}
        args += _fill(eng.attention_backend.args, v, f"engines/{eng.name}/engine.yaml: attention_backend.args")
        ab_env = {k: str(x).format(**v) for k, x in eng.attention_backend.env.items()}
    args += list(extra_args or [])
    full_env = dict(eng.env)
    full_env.update(m.env)
    full_env.update(ab_env)
    for k in eng.passthrough_env:
        if host_env and host_env.get(k):
            full_env[k] = host_env[k]
    full_env.update(env or {})
    verify = None
    if eng.verify is not None:
        verify = {"log_regex": eng.verify.log_regex, "timeout_s": eng.verify.timeout_s,
                  "expect": dict(zip(eng.verify.expect, _fill(list(eng.verify.expect.values()), values,
                                                               f"engines/{eng.name}/engine.yaml: verify.expect")))}
    extras = copy.deepcopy(eng.request)
    _merge_into(extras, copy.deepcopy(m.request))
    if eng.method_mode == "request":
        # the per-request method carrier: the first dict field of the method's request (e.g. kv_press)
        carrier = next((k for k, v in m.request.items() if isinstance(v, dict)), None)
        if carrier is not None:
            # kv.params (a matrix method entry's fields) go into the request's method object: parameters and,
            # for wrappers, their nested presses ({inner: {method: snapkv}}) — so they are in the cell id too
            _merge_into(extras[carrier], copy.deepcopy(request_params or {}))
            for slot in str(m.properties.get("takes") or "").split("+"):
                if slot and slot not in extras[carrier]:
                    raise ConfigError(
                        f"kv.params.{slot}: method {eng.name}/{method} wraps other presses: give {slot} "
                        f"(e.g. a matrix entry {{method: {method}, {slot}: {{method: snapkv}}}})")
            if compression_ratio is not None:
                extras[carrier]["compression_ratio"] = compression_ratio
            if budget is not None:
                extras[carrier]["budget"] = budget
    return ResolvedSpec(
        engine=eng.name, method=method, compression_ratio=compression_ratio, budget=budget,
        method_mode=eng.method_mode, image=eng.image or "", tag=tag or eng.tag or "",
        digest=None if variant is not None and variant.image else (digest or eng.digest),
        command=list(eng.command), args=args, env=full_env, gpus=list(gpus or []), host=host, port=port,
        ipc_mode=eng.ipc_mode, shm_size=eng.shm_size, health_path=eng.health.path,
        readiness_timeout_s=eng.health.readiness_timeout_s, health_interval_s=eng.health.interval_s,
        health_fallback_paths=list(eng.health.fallback_paths),
        models_path=eng.models_path, metrics_path=eng.metrics.path, kv_usage_metrics=list(eng.metrics.kv_usage),
        concurrency=eng.concurrency, request_extras=extras, served_model=served_model,
        build=eng.build.model_dump() if eng.build else None, gpu=eng.gpu,
        send_add_special_tokens=eng.send_add_special_tokens, served_model_from=eng.served_model,
        cache_bust_request=copy.deepcopy(eng.prefix_cache.bust_request), verify=verify,
        baseline=m.baseline, runtime=runtime if variant is not None else None,
        version_path=eng.version.path if eng.version else None,
        version_key=eng.version.key if eng.version else "version",
        device=device, mounts=list(mounts or []),
        attention_backend=attention_backend,
        backend_log_patterns=list(eng.attention_backend.log_patterns) if eng.attention_backend else [],
        argcheck=({"script": eng.argcheck.script, "engine_dir": str(eng.engine_dir),
                   "python": eng.argcheck.python} if eng.argcheck else None),
    )


def _merge_into(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge_into(dst[k], v)
        else:
            dst[k] = v


def parse_backend(log_text: str, patterns: list[str]) -> Optional[str]:
    """The attention backend an engine's log names: the last match of any pattern, in log order."""
    best: tuple[int, Optional[str]] = (-1, None)
    for pat in patterns:
        for mt in re.finditer(pat, log_text, re.M):
            if mt.start() >= best[0]:
                best = (mt.start(), mt.group("backend"))
    return best[1]
