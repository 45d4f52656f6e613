"""The decompositions Inductor compiles in place of our opaque ops, handed to every Inductor compile.

Inductor's own table is no place for them: ``select_decomp_table()`` returns a ``functools.cache``d
copy of the global table, made at the first Inductor compile of the process, so a decomposition
registered after any earlier compile (a loss function, an eval model, another block) never reaches
it, and the op then runs opaque and eager. Its FX graph and AOTAutograd caches do not key on the
table either, so such a compile poisons later processes with the same cache directory. The backend
therefore passes ``{**Inductor's table, **DECOMPOSITIONS}`` to ``compile_fx`` explicitly on every
compile (:func:`pamm_fx.compiler._inductor`): every artifact it compiles or loads was built with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["DECOMPOSITIONS", "decomposition"]

#: op overload -> the traceable function Inductor compiles instead of it.
DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {}


def decomposition(op: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make Inductor (through our backend) trace ``fn`` in place of ``op``."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if op in DECOMPOSITIONS:
            raise RuntimeError(f"a decomposition of {op} is registered already")
        DECOMPOSITIONS[op] = fn
        return fn

    return register
