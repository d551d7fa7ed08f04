"""Parse a `vllm serve` argv with vLLM's own parser and validation — parse only: no GPU, no model load.

    python3 argcheck.py ARGV...     # ARGV = what follows `vllm serve` (model path, --host, --port, ...)

Exit 0: accepted; one JSON line on stdout ({"engine": "vllm", "version": ..., "kv_cache_dtype": ...}).
Exit 2: rejected; ONE line on stderr with vLLM's own message. Any other exit: the check itself broke.

What runs is what `vllm serve` runs before it starts the engine: the FlexibleArgumentParser with the
`serve` subcommand (ServeSubcommand.subparser_init → make_arg_parser), ServeSubcommand.validate,
AsyncEngineArgs.from_cli_args, then vLLM's CacheConfig built from those engine args (that is where a bad
--kv-cache-dtype / --kv-offloading-backend is rejected; argparse has no choices for the dtype). The model
config is not built (it reads the model's config.json), so "auto" stays "auto". Runs inside the pinned image
(kvt preflight) or in a side venv with `vllm==<tag>` installed --no-deps (tests/engines/test_argcheck.py).

`python3 argcheck.py --kvt-batch` reads a JSON list of argvs on stdin and prints one JSON result per argv
({"rc": 0, "out": {...}} or {"rc": 2, "error": "..."}), so a test pays vLLM's import once; the parser is
built anew for each argv.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import types

REJECT, BROKEN = 2, 3


class Rejected(Exception):
    pass


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def _stub_cuda_ops() -> list[str]:
    """vLLM's compiled op libraries cannot load without CUDA (a CPU box, or an image started without a GPU);
    parsing never calls them, so an empty module stands in for each one that fails to import."""
    stubbed = []
    for name in ("vllm._C_stable_libtorch", "vllm._C"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - ImportError/OSError from a missing libcuda
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
    return stubbed


def _cuda_platform() -> str:
    """The images are CUDA builds: without a visible GPU vLLM cannot detect its platform, so pin the
    CUDA platform the server would detect on the GPU host (parse-time defaults depend on it)."""
    import vllm.platforms as platforms

    if not platforms.current_platform.device_type:
        from vllm.platforms.cuda import CudaPlatform

        platforms.current_platform = CudaPlatform()
    return type(platforms.current_platform).__name__


def _parser_error(self: argparse.ArgumentParser, message: str):  # noqa: ANN202 - replaces ArgumentParser.error
    raise Rejected(f"{self.prog}: error: {message}")


def _setup() -> dict:
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.disable(logging.WARNING)
    stubbed = _stub_cuda_ops()
    platform = _cuda_platform()
    argparse.ArgumentParser.error = _parser_error  # one line instead of usage + exit
    return {"platform": platform, "stubbed": stubbed}


def check(argv: list[str], env: dict) -> dict:
    import vllm
    from vllm.config import CacheConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM < 0.11 kept it in vllm.utils
        from vllm.utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm", description="vLLM CLI")  # what `vllm` builds (cli/main.py)
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    cmd = ServeSubcommand()
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    try:
        args = parser.parse_args(["serve", *argv])
        if getattr(args, "model_tag", None) is not None:  # what ServeSubcommand.cmd does first
            args.model = args.model_tag
        cmd.validate(args)
        ea = AsyncEngineArgs.from_cli_args(args)
        # the CacheConfig EngineArgs.create_engine_config builds, less what needs the model's config.json
        # (only the fields this vLLM version has: the script runs against the version in the image)
        fields = set(getattr(CacheConfig, "__dataclass_fields__", {})) or set(getattr(CacheConfig, "model_fields", {}))
        wanted = {"block_size": "block_size", "gpu_memory_utilization": "gpu_memory_utilization",
                  "kv_cache_memory_bytes": "kv_cache_memory_bytes", "cache_dtype": "kv_cache_dtype",
                  "num_gpu_blocks_override": "num_gpu_blocks_override",
                  "enable_prefix_caching": "enable_prefix_caching",
                  "prefix_caching_hash_algo": "prefix_caching_hash_algo",
                  "kv_cache_dtype_skip_layers": "kv_cache_dtype_skip_layers",
                  "kv_offloading_size": "kv_offloading_size", "kv_offloading_backend": "kv_offloading_backend"}
        kw = {f: getattr(ea, a) for f, a in wanted.items() if f in fields and hasattr(ea, a)}
        if kw.get("enable_prefix_caching", False) is None:  # decided later from the model; not a parse input
            kw["enable_prefix_caching"] = True
        if kw.get("block_size", 0) is None and "block_size" in fields:
            kw.pop("block_size")
        cache = CacheConfig(**kw)
    except Rejected:
        raise
    except SystemExit as e:  # an action that exits (e.g. --help) is not a launch command
        raise Rejected(f"vllm serve exited with {e.code} while parsing") from None
    except Exception as e:  # noqa: BLE001 - vLLM's own validation (ValueError, pydantic ValidationError, ...)
        raise Rejected(f"{type(e).__name__}: {e}") from None
    return {"engine": "vllm", "version": vllm.__version__, **env, "model": ea.model,
            "kv_cache_dtype": cache.cache_dtype, "enable_prefix_caching": ea.enable_prefix_caching,
            "kv_cache_dtype_skip_layers": list(getattr(cache, "kv_cache_dtype_skip_layers", None) or []),
            "kv_offloading_size": getattr(cache, "kv_offloading_size", None),
            "kv_offloading_backend": (getattr(cache, "kv_offloading_backend", None)
                                      if getattr(cache, "kv_offloading_size", None) else None),
            "attention_backend": _name(getattr(ea, "attention_backend", None)) or os.environ.get("VLLM_ATTENTION_BACKEND")}


def _name(v: object) -> object:
    return getattr(v, "name", v)


def _verdict(argv: list[str], env: dict) -> dict:
    try:
        return {"rc": 0, "out": check(argv, env)}
    except Rejected as e:
        return {"rc": REJECT, "error": _one_line(e)}


def main(argv: list[str]) -> int:
    try:
        env = _setup()
        if argv == ["--kvt-batch"]:
            for one in json.load(sys.stdin):
                print(json.dumps(_verdict(one, env), default=str), flush=True)
            return 0
        v = _verdict(argv, env)
    except Exception as e:  # noqa: BLE001 - the check itself broke (import error, ...): not a verdict
        print(f"argcheck broke: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return BROKEN
    if v["rc"]:
        print(v["error"], file=sys.stderr)
        return v["rc"]
    print(json.dumps(v["out"], default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
