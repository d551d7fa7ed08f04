"""A tiny harness for signal tests: start the fake engine through a runtime's `running()`, print
`READY <ident>`, then sleep — so a test can SIGINT/SIGTERM/SIGKILL this process and look at what is left.

    python -m tests.fakes.run_engine_child RUNTIME GROUP LOG_PATH [REGISTRY_DIR] [-- FAULT ARGS…]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    fault: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, fault = argv[:i], argv[i + 1:]
    runtime, group, log_path = argv[:3]
    registry = argv[3] if len(argv) > 3 else None
    from kv_transition.runtime import get_runtime
    from tests.fakes.fake_engine import fake_spec

    rt = get_runtime(runtime, registry_dir=registry) if runtime == "process" else get_runtime(runtime)
    spec = fake_spec(runtime, fault)
    with rt.running(spec, {"group": group, "cell": "child"}, Path(log_path)) as inst:
        print("READY", inst.ident, inst.base_url, flush=True)
        time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
