"""One visual vocabulary for every figure of a report: a colour per method, a line style (and marker) per
ratio / budget / KV dtype, a marker per engine. Assigned from the study's sorted values, so the same study
always gets the same picture and `snapkv` is the same colour in the heatmap legend, the small multiples,
the transition curve and the memory plot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

BASELINE_COLOUR = "#222222"
# colour-blind-aware first (Okabe-Ito without its yellow), then tab10-like hues, each darkened where needed to a
# WCAG contrast ≥ 3.2 on white (method names are printed in their colour); the most distinct hues come first;
# 14 before anything repeats
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#c6699c", "#b98000", "#9467bd", "#8c564b", "#1399a7",
           "#d62728", "#8d8d19", "#1f3a93", "#1b91d3", "#6b8e23", "#ff389c")
LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", ":", (0, (5, 1.5, 1, 1.5, 1, 1.5)), (0, (8, 2)), (0, (1, 1)),
                               (0, (3, 1, 1, 1)))
KNOB_MARKERS = ("o", "s", "^", "D", "v", "P", "X")   # 7 vs 8 line styles: 56 distinct pairs
ENGINE_MARKERS = ("o", "s", "^", "D", "P", "X", "v", "h")


@dataclass(frozen=True)
class Style:
    method_colour: dict[str, str]
    knob_style: dict[str, Any]
    knob_marker: dict[str, str]
    engine_marker: dict[str, str]

    def colour(self, method: str, is_baseline: bool = False) -> str:
        return BASELINE_COLOUR if is_baseline else self.method_colour.get(method, "#777777")

    def linestyle(self, knob: str) -> Any:
        return self.knob_style.get(knob, "-")

    def marker(self, knob: str) -> str:
        return self.knob_marker.get(knob, "o")


def _knob_order(k: tuple[str, float | str]) -> tuple[int, Any]:
    kind, v = k
    return ({"r": 0, "b": 1}.get(kind, 2), v if isinstance(v, (int, float)) else str(v))


def make_style(cells: Sequence[dict[str, Any]]) -> Style:
    methods = sorted({c["method"] for c in cells if not c.get("is_baseline")})
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    knobs = sorted({c["knob_sort"] for c in cells if c.get("knob")}, key=_knob_order)
    by_sort = {c["knob_sort"]: c["knob"] for c in cells if c.get("knob")}
    styles = {by_sort[k]: LINESTYLES[i % len(LINESTYLES)] for i, k in enumerate(knobs)}
    markers = {by_sort[k]: KNOB_MARKERS[i % len(KNOB_MARKERS)] for i, k in enumerate(knobs)}
    engines = sorted({c["engine"] for c in cells})
    return Style(colours, styles, markers, {e: ENGINE_MARKERS[i % len(ENGINE_MARKERS)] for i, e in enumerate(engines)})
