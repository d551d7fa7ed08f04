"""Example-major sending across the cells of one engine group.

The cells of a request-mode group (one kvpress engine serving every press and ratio) each run their own
`Runner` (own run row, writer, resume and telemetry), in threads of their own. An `ExampleGate` shared by them
makes them send example-major: a cell sends its request at position p (manifest order, repeat-major, as the
cell's work list is built) only while p is within `window` positions of the group's frontier — the lowest
position some member cell has not finished yet. So all (press, ratio) requests of one example go out together
and reach the engine together (which can then prefill the prompt once for all of them), and at most `window`
examples are in flight in the group at a time.

No deadlock: the member holding the frontier can always send it (p = frontier < frontier + window), and each
cell's workers take its items in order. Nothing is sent before every expected member has joined (with its
positions) or left; a member that ends for any reason (done, failed, aborted, engine start failure) leaves, and
what it had not finished stops holding the others back.
"""

from __future__ import annotations

import asyncio
import heapq
import threading
from typing import Callable, Hashable, Iterable, Optional

Position = tuple[int, int]  # (repeat, index of the example in the manifest)

POLL_S = 0.005


class ExampleGate:
    def __init__(self, expected: Iterable[Hashable], window: int = 1):
        self.window = max(1, int(window))
        self._lock = threading.Lock()
        self._waiting_for = set(expected)  # members that have neither joined nor left
        self._pending: dict[Hashable, list[Position]] = {}  # member → heap of unfinished positions
        self._order: dict[Position, int] = {}  # every position any member has → its rank in the group's order
        self._done: dict[Hashable, set[Position]] = {}

    def join(self, key: Hashable, positions: Iterable[Position]) -> None:
        with self._lock:
            pos = list(positions)
            self._waiting_for.discard(key)
            if not pos:
                return
            heapq.heapify(pos)
            self._pending[key] = pos
            self._done[key] = set()
            for p in pos:
                self._order.setdefault(p, 0)
            for i, p in enumerate(sorted(self._order)):
                self._order[p] = i

    def leave(self, key: Hashable) -> None:
        with self._lock:
            self._waiting_for.discard(key)
            self._pending.pop(key, None)
            self._done.pop(key, None)

    def _frontier(self) -> Optional[int]:
        heads = [self._order[h[0]] for h in self._pending.values() if h]
        return min(heads) if heads else None

    def may_send(self, key: Hashable, pos: Position) -> bool:
        with self._lock:
            if self._waiting_for:
                return False
            f = self._frontier()
            return f is None or self._order.get(pos, 0) < f + self.window

    def done(self, key: Hashable, pos: Position) -> None:
        with self._lock:
            heap, done = self._pending.get(key), self._done.get(key)
            if heap is None or done is None:
                return
            done.add(pos)
            while heap and heap[0] in done:  # positions may finish out of order
                done.discard(heapq.heappop(heap))
            if not heap:
                self._pending.pop(key, None)
                self._done.pop(key, None)

    def handle(self, key: Hashable, position_of: Callable[[object], Position]) -> "CellGate":
        return CellGate(self, key, position_of)


class CellGate:
    """One cell's side of the gate, as its Runner uses it."""

    def __init__(self, gate: ExampleGate, key: Hashable, position_of: Callable[[object], Position]):
        self.gate, self.key, self.position_of = gate, key, position_of

    async def wait(self, item: object, stop: Callable[[], bool]) -> None:
        pos = self.position_of(item)
        while not self.gate.may_send(self.key, pos) and not stop():
            await asyncio.sleep(POLL_S)

    def done(self, item: object) -> None:
        self.gate.done(self.key, self.position_of(item))
