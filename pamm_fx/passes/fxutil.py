"""Small facts about FX nodes that every pass asks: example values, sizes, which call a node is."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from pamm_fx import _compat

__all__ = ["LINEAR", "MATMUL_FUNCTIONS", "MATMUL_METHODS", "hint", "is_linear", "is_static", "op_name", "rows", "val"]

#: The one call form of a projection after :func:`pamm_fx.passes.normalize.normalize_linears`.
LINEAR = _compat.NN_LINEAR
#: Two-operand matrix products as functions and as tensor methods: normalize reads a projection
#: written as one (``x @ W``), structure reads attention's ``q @ k^T`` and ``p @ v`` as one.
MATMUL_FUNCTIONS = frozenset({torch.matmul, operator.matmul, torch.mm, torch.bmm})
MATMUL_METHODS = frozenset({"matmul", "__matmul__", "mm", "bmm"})


def val(node: Any) -> Any:
    """The example value Dynamo (``example_value``) or AOT (``val``) recorded for a node, else None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is LINEAR


def op_name(node: fx.Node) -> str:
    """The method or function name of a call ("view", "silu", ...); "" for anything else."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", "")
    return ""


def hint(value: Any) -> int:
    """A concrete int for a possibly symbolic size (its example value), without adding a guard."""
    if isinstance(value, torch.SymInt):
        return value.node.hint if value.node.hint is not None else value.node.shape_env.size_hint(value.node.expr)
    return int(value)


def is_static(value: Any) -> bool:
    """Whether a size is the same on every call the graph serves (a plain int, or a SymInt that is one)."""
    return not isinstance(value, torch.SymInt) or is_concrete_int(value)


def rows(t: torch.Tensor) -> Any:
    """b: the number of rows of a (..., n) activation (symbolic when a leading size is)."""
    return math.prod(t.shape[:-1]) if t.dim() > 1 else 1
