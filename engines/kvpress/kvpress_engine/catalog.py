"""The engine.yaml method catalog, generated from the press table (presses.py).

    python -m kvpress_engine.catalog            # prints the `methods:` block of engine.yaml

tests/engine/test_catalog.py keeps engines/kvpress/engine.yaml equal to this (names, supports, properties,
request defaults). Pure Python: no torch.
"""

from __future__ import annotations

from typing import Any

from .presses import ALL, properties, supports

# request defaults that existed before the catalog was generated: kept, so those cells keep their ids
LEGACY_REQUEST = {
    "expected_attention": {"n_future_positions": 512, "n_sink": 4},
}


def request_for(name: str) -> dict[str, Any]:
    kind = ALL[name]
    kv: dict[str, Any] = {"method": name}
    if kind.recipe is None:
        if name in LEGACY_REQUEST:
            kv.update(LEGACY_REQUEST[name])
        else:
            kv.update({k: p.default for k, p in kind.params.items() if not p.required and p.default is not None})
    return {"kv_press": kv}


def catalog() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, kind in ALL.items():
        entry: dict[str, Any] = {"description": kind.description, "request": request_for(name)}
        sup = supports(kind)
        if sup:
            entry["supports"] = sup
        if name == "full":
            entry["baseline"] = True
        entry["properties"] = properties(kind)
        out[name] = entry
    return out


def render() -> str:
    import yaml

    lines = []
    for name, entry in catalog().items():
        flow = yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=10**6).strip()
        lines.append(f"  {name}: {flow}")
    return "methods:\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
