"""python -m kvpress_engine --model ... --host 127.0.0.1 --port ..."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    # quiet third-party progress bars before anything imports them
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # `kill -USR1 <pid>` dumps every thread's stack to stderr (diagnosing a stuck request)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    from .cli import parse_args

    cfg = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import uvicorn

    from .server import create_app

    app, state = create_app(cfg)
    server = uvicorn.Server(
        uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False, lifespan="off")
    )

    def stop() -> None:
        server.should_exit = True

    state.on_fatal = stop
    threading.Thread(target=state.load, name="kvpress-loader", daemon=True).start()
    server.run()
    if state.fatal:
        print(f"kvpress_engine: refusing to serve: {state.fatal}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
