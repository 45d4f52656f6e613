"""The import graph of ``pamm_fx``: floors, passes in order, no circle (docs/architecture.md, "Floors").

Read from the source with ``ast`` (nothing is imported), counting imports inside functions too: a lazy import
is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pamm_fx"

#: Each module's floor, by its most specific prefix: a module imports only from its own floor or below.
FLOORS: dict[str, int] = {
    "pamm_fx._compat": 0, "pamm_fx.kernels": 0,
    "pamm_fx.fxutil": 1, "pamm_fx.names": 1, "pamm_fx.seed": 1, "pamm_fx.sideeffects": 1, "pamm_fx.logs": 1,
    "pamm_fx.ops": 2,
    "pamm_fx.estimators": 3, "pamm_fx.config": 3,
    "pamm_fx.passes": 4,
    "pamm_fx.plan": 5, "pamm_fx.saved": 5, "pamm_fx.capture": 5,
    "pamm_fx.compiler": 6,
    "pamm_fx.report": 7, "pamm_fx.render": 7, "pamm_fx.snapshot": 7, "pamm_fx.explain": 7, "pamm_fx.testing": 7,
    "pamm_fx.cli": 7, "pamm_fx.demo": 7, "pamm_fx": 7,
}

#: The passes in the order ``plan()``/``apply()`` run them (structure and checks are match's first steps;
#: categories is the table every pass reports into): none imports a later one.
PASS_ORDER = ["categories", "mha", "normalize", "unrecognised", "structure", "checks", "match", "rewrite"]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts).removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's pamm_fx imports (module level or not), as modules of ``mods``."""

    def owner(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *base.split(".")])
                    base = base.rstrip(".")
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            out |= {owner(n) for n in names if n == "pamm_fx" or n.startswith("pamm_fx.")}
        graph[mod] = out - {mod}
    return graph


def _floor(mod: str) -> int:
    while mod not in FLOORS:
        mod = mod.rpartition(".")[0]
    return FLOORS[mod]


def test_every_module_has_a_floor_and_imports_none_above_it() -> None:
    graph = _imports(_modules())
    up = [f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
          for m, targets in graph.items() for t in sorted(targets) if _floor(t) > _floor(m)]
    assert not up, "\n".join(up)


def test_no_pass_imports_a_later_pass() -> None:
    graph = _imports(_modules())
    passes = {m.removeprefix("pamm_fx.passes."): m for m in graph if m.startswith("pamm_fx.passes.")}
    assert set(passes) == set(PASS_ORDER), "a pass module is missing from PASS_ORDER (or gone)"
    later = [f"{p} imports the later pass {q}" for i, p in enumerate(PASS_ORDER)
             for q in PASS_ORDER[i + 1:] if passes[q] in graph[passes[p]]]
    assert not later, "\n".join(later)


def test_no_import_circle() -> None:
    graph = _imports(_modules())
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []
    circles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join([*path[path.index(t):], t]))
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "\n".join(circles)
