"""Parse an SGLang server argv with SGLang's own parser and validation — parse only: no GPU, no model load.

    python3 argcheck.py ARGV...     # ARGV = what follows `python3 -m sglang.launch_server`

Exit 0: accepted; one JSON line on stdout ({"engine": "sglang", "version": ..., "kv_cache_dtype": ...}).
Exit 2: rejected; ONE line on stderr with SGLang's own message. Any other exit: the check itself broke.

What runs is what `sglang.launch_server` runs first: sglang.srt.server_args.prepare_server_args(argv)
(its argparse parser from ServerArgs.add_cli_args, then ServerArgs.from_cli_args and the record's own
checks). The resolution pass that reads the model's config.json (ServerArgs.resolve_once) is not run.
Runs inside the pinned image (kvt preflight) or in a side venv with `sglang==<tag>` installed --no-deps
(tests/engines/test_argcheck.py).

`python3 argcheck.py --kvt-batch` reads a JSON list of argvs on stdin and prints one JSON result per argv
({"rc": 0, "out": {...}} or {"rc": 2, "error": "..."}), so a test pays SGLang's import once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys

REJECT, BROKEN = 2, 3


class Rejected(Exception):
    pass


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def _parser_error(self: argparse.ArgumentParser, message: str):  # noqa: ANN202 - replaces ArgumentParser.error
    raise Rejected(f"{self.prog}: error: {message}")


def _setup() -> None:
    os.environ.setdefault("SGLANG_DISABLE_CUDNN_CHECK", "1")
    logging.disable(logging.WARNING)
    argparse.ArgumentParser.error = _parser_error  # one line instead of usage + exit


def check(argv: list[str]) -> dict:
    import sglang
    from sglang.srt.server_args import prepare_server_args

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            sa = prepare_server_args(list(argv))
    except Rejected:
        raise
    except SystemExit as e:  # an action that exits (e.g. --help) is not a launch command
        raise Rejected(f"sglang exited with {e.code} while parsing") from None
    except Exception as e:  # noqa: BLE001 - SGLang's own validation (ValueError, AssertionError, ...)
        raise Rejected(f"{type(e).__name__}: {e}") from None
    logging.disable(logging.WARNING)  # prepare_server_args reconfigures logging
    keys = ("model_path", "kv_cache_dtype", "attention_backend", "disable_radix_cache", "radix_eviction_policy",
            "enable_hierarchical_cache", "hicache_ratio", "hicache_size", "hicache_write_policy")
    return {"engine": "sglang", "version": getattr(sglang, "__version__", None),
            **{k: getattr(sa, k, None) for k in keys}}


def _verdict(argv: list[str]) -> dict:
    try:
        return {"rc": 0, "out": check(argv)}
    except Rejected as e:
        return {"rc": REJECT, "error": _one_line(e)}


def main(argv: list[str]) -> int:
    _setup()
    try:
        if argv == ["--kvt-batch"]:
            for one in json.load(sys.stdin):
                print(json.dumps(_verdict(one), default=str), flush=True)
            return 0
        v = _verdict(argv)
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
