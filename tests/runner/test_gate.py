"""runner.gate.ExampleGate: example-major order across cells, window, out-of-order completion, leaving."""

from __future__ import annotations

import asyncio

from kv_transition.runner.gate import ExampleGate


def P(i: int) -> tuple[int, int]:
    return (0, i)


def test_nothing_goes_before_every_member_joined_or_left() -> None:
    g = ExampleGate(["a", "b"], window=1)
    g.join("a", [P(0), P(1)])
    assert not g.may_send("a", P(0))  # b has not said what it has
    g.join("b", [P(1)])  # resume: b already answered example 0
    assert g.may_send("a", P(0)) and not g.may_send("b", P(1)) and not g.may_send("a", P(1))
    g.done("a", P(0))
    assert g.may_send("a", P(1)) and g.may_send("b", P(1))


def test_window_and_out_of_order_completion() -> None:
    g = ExampleGate(["a", "b"], window=2)
    g.join("a", [P(0), P(1), P(2)])
    g.join("b", [P(0), P(1), P(2)])
    assert g.may_send("a", P(1)) and not g.may_send("a", P(2))
    g.done("a", P(1))  # finished before example 0: the frontier stays at 0
    g.done("b", P(0))
    assert not g.may_send("b", P(2))
    g.done("a", P(0))
    assert g.may_send("b", P(2))


def test_a_member_that_leaves_stops_holding_the_others_back() -> None:
    g = ExampleGate(["a", "b", "c"], window=1)
    g.join("a", [P(0), P(1)])
    g.join("b", [P(0), P(1)])
    g.leave("c")  # nothing to send (complete) or failed before sending
    g.done("a", P(0))
    assert not g.may_send("a", P(1))
    g.leave("b")  # aborted with example 0 unfinished
    assert g.may_send("a", P(1))


def test_cell_gate_waits_until_its_turn_or_stop() -> None:
    g = ExampleGate(["a", "b"], window=1)
    g.join("a", [P(0), P(1)])
    g.join("b", [P(0)])
    ha = g.handle("a", lambda it: it)

    async def run() -> list[str]:
        seen = []

        async def second() -> None:
            await ha.wait(P(1), lambda: False)
            seen.append("a1")

        t = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        seen.append("b0-done")
        g.done("a", P(0))
        g.done("b", P(0))
        await asyncio.wait_for(t, 2)
        await asyncio.wait_for(ha.wait(P(5), lambda: True), 2)  # a stop condition ends the wait at once
        return seen

    assert asyncio.run(run()) == ["b0-done", "a1"]
