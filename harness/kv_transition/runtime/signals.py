"""SIGINT/SIGTERM → stop the engine, then unwind.

    with stop_on_signals(lambda: runtime.stop(inst)):
        ...   # Ctrl-C or `kill -TERM` here: cb() runs, then KeyboardInterrupt / SystemExit(143) is raised

    with deferred_signals():
        ...   # a critical section (stop + remove): a signal arriving here is delivered when it ends

Signal handlers can only be installed from the main thread; elsewhere both are no-ops (the main
thread's handlers, if any, still apply). Previous handlers are restored on exit.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_defer_depth = 0
_pending: Optional[int] = None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _record(signum: int, frame: object) -> None:
    global _pending
    if _pending is None:
        _pending = signum


_record._kvt = True  # type: ignore[attr-defined]


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the duration of a short critical section, then deliver the first one."""
    global _defer_depth, _pending
    if not _in_main_thread():
        yield
        return
    installed: dict[int, object] = {}
    if _defer_depth == 0:
        for s in SIGNALS:
            if not getattr(signal.getsignal(s), "_kvt", False):  # our handlers already honour the depth
                installed[s] = signal.signal(s, _record)
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        for s, h in installed.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        if _defer_depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            signal.raise_signal(signum)  # to whatever handler is current now


@contextmanager
def stop_on_signals(cb: Callable[[], None], signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """Install handlers that call `cb()` once, then raise KeyboardInterrupt (SIGINT) or SystemExit(128+n)."""
    if not _in_main_thread():
        yield
        return
    done = False

    def handler(signum: int, frame: object) -> None:
        global _pending
        nonlocal done
        if _defer_depth:  # inside a critical section: deliver at its end
            if _pending is None:
                _pending = signum
            return
        if not done:
            done = True
            with deferred_signals():  # a second Ctrl-C while stopping waits for the stop to finish
                try:
                    cb()
                except Exception:  # noqa: BLE001 - the signal wins; cleanup errors must not mask it
                    pass
        _raise_for(signum)

    handler._kvt = True  # type: ignore[attr-defined]
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
