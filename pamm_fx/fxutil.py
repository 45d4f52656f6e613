"""Small facts about FX nodes that several passes (and the readers of a plan) ask: example values, sizes,
which call a node is, which region of grad mode and autocast it runs in, whether a weight is a trainable
parameter, what a node writes; and a copy of a graph module that keeps node metadata."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import operator
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, optimization_hint
from torch.multiprocessing.reductions import StorageWeakRef

from pamm_fx import _compat

__all__ = [
    "LINEAR", "MATMUL_FUNCTIONS", "MATMUL_METHODS", "UNBACKED_HINT", "Region", "copy_graph_module", "hint",
    "is_linear", "is_parameter", "is_static", "op_name", "regions", "requires_grad", "row_slice", "rows", "storage",
    "val", "written",
]

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


#: The size assumed for a data-dependent (unbacked) size in estimates, as Inductor assumes one.
UNBACKED_HINT = 8192


def hint(value: Any) -> int:
    """A concrete int for a possibly symbolic size (its example value), without adding a guard; a
    data-dependent size (``nonzero``'s row count) has no example value and reads as :data:`UNBACKED_HINT`."""
    if isinstance(value, torch.SymInt):
        return optimization_hint(value, fallback=UNBACKED_HINT)
    return int(value)


def is_static(value: Any) -> bool:
    """Whether a size is the same on every call the graph serves (a plain int, or a SymInt that is one)."""
    return not isinstance(value, torch.SymInt) or is_concrete_int(value)


def rows(t: torch.Tensor) -> Any:
    """b: the number of rows of a (..., n) activation (symbolic when a leading size is)."""
    return math.prod(t.shape[:-1]) if t.dim() > 1 else 1


_SPLITS = frozenset({"split", "chunk"})


def row_slice(node: Any) -> tuple[fx.Node, int, int] | None:
    """(W, start, stop) for ``W.split(...)[i]`` or ``W.chunk(n)[i]`` along dim 0, else None: how
    ``nn.MultiheadAttention`` cuts q/k/v weights and biases out of its packed ``in_proj_weight``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    parts, i = node.args
    if not isinstance(parts, fx.Node) or op_name(parts) not in _SPLITS or not isinstance(i, int):
        return None
    dim = parts.kwargs.get("dim", parts.args[2] if len(parts.args) > 2 else 0)
    values = val(parts)
    if dim != 0 or not isinstance(values, (tuple, list)) or not isinstance(parts.args[0], fx.Node):
        return None
    start = sum(hint(v.shape[0]) for v in values[:i])
    return parts.args[0], start, start + hint(values[i].shape[0])


#: Python's augmented assignments: in place on a tensor (``x += y`` is ``operator.iadd`` in Dynamo's graph).
_AUGMENTED = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
})
#: Trailing-underscore calls that change a tensor's metadata or autograd state, not its values.
_NOT_WRITES = frozenset({"requires_grad_", "detach_", "share_memory_", "retain_grad"})


def storage(node: Any) -> Any:
    """A key for the storage a node's tensor lives in (views and ``.data`` share their base's key), else None.

    Dynamo's fake example values keep the program's aliasing, so two nodes with the same key are
    views of one buffer: a write through either changes what the other reads.
    """
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.is_sparse:
        return None
    try:
        return StorageWeakRef(v.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None


@functools.cache
def _inplace_parameter(fn: Any) -> inspect.Signature | None:
    """The signature of a Python function with an ``inplace`` argument (``F.relu``, ``F.dropout``), else None."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return sig if "inplace" in sig.parameters else None


def written(node: fx.Node) -> list[fx.Node]:
    """The graph values whose storage ``node`` writes: in-place methods and functions (``mul_``,
    ``copy_``, ``set_``, ``torch.relu_``), setitem (``x[i] = v``, also on ``x.data``), augmented
    assignment, ``inplace=True`` and ``out=`` arguments."""
    if node.op not in ("call_function", "call_method"):
        return []
    targets: list[Any] = []
    name = op_name(node)
    if isinstance(node.target, _compat.OpOverload):  # an ATen op: its schema says which arguments it writes
        schema = node.target._schema
        writes = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        targets += [node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
                    for i, a in enumerate(schema.arguments) if a.name in writes]
    elif node.op == "call_function" and (node.target is operator.setitem or node.target in _AUGMENTED):
        targets.append(node.args[0] if node.args else None)
    elif name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES:
        targets.append(node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self")))
    elif node.op == "call_function" and callable(node.target) and (sig := _inplace_parameter(node.target)):
        try:
            arguments = sig.bind(*node.args, **node.kwargs).arguments
        except TypeError:
            arguments = {"inplace": node.kwargs.get("inplace", False), "input": node.args[0] if node.args else None}
        if arguments.get("inplace", False) is not False:  # True, or a value only known at run time
            targets.append(next(iter(arguments.values()), None))
    if "out" in node.kwargs:
        targets.append(node.kwargs["out"])
    flat: list[fx.Node] = []
    fx.node.map_arg(targets, flat.append)
    return [n for n in flat if isinstance(val(n), torch.Tensor)]


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of ``gm`` (node metadata included) and the map from its nodes to the copy's."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    new.meta = dict(getattr(gm, "meta", {}))
    return new, env


#: Calls that change grad mode or autocast state: each starts a new region.
_GRAD_MODE = frozenset({"_set_grad_enabled"})
_AUTOCAST_ENTER = frozenset({"_enter_autocast"})
_AUTOCAST_EXIT = frozenset({"_exit_autocast"})


@dataclasses.dataclass(frozen=True)
class Region:
    """A stretch of the graph between two grad-mode or autocast boundaries.

    index: the stretch's position (0 before the first boundary); grad_enabled: the grad mode in it;
    autocast: the (device, dtype) of each enabled autocast context open in it, outermost first.
    """

    index: int
    grad_enabled: bool
    autocast: tuple[tuple[str, torch.dtype | None], ...] = ()


def regions(graph: fx.Graph, grad_enabled: bool) -> dict[fx.Node, Region]:
    """The region of every node: Dynamo records ``with torch.no_grad()`` and ``torch.autocast`` blocks
    as ``_set_grad_enabled`` / ``_enter_autocast`` / ``_exit_autocast`` calls in the graph.

    grad_enabled: the grad mode the graph starts in (Dynamo guards on it)."""
    out: dict[fx.Node, Region] = {}
    index, stack = 0, []
    for node in graph.nodes:
        name = op_name(node) if node.op == "call_function" else ""
        if name in _GRAD_MODE and node.args and isinstance(node.args[0], bool):
            index, grad_enabled = index + 1, node.args[0]
        elif name in _AUTOCAST_ENTER:
            device, dtype, enabled = (list(node.args) + [None, None, True])[:3]
            index, stack = index + 1, [*stack, (node, (device, dtype) if enabled else None)]
        elif name in _AUTOCAST_EXIT:
            index, stack = index + 1, [s for s in stack if s[0] is not node.args[0]]
        out[node] = Region(index, grad_enabled, tuple(s[1] for s in stack if s[1] is not None))
    return out


def _base_weight(node: object) -> object:
    """W for ``W.t()`` (a (in, out) weight that normalize transposed) or a row slice of W (a q/k/v part
    of a packed in-projection weight), else the node itself."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "t" and node.args:
        return node.args[0]
    part = row_slice(node)
    return part[0] if part is not None else node


def _attribute(gm: fx.GraphModule, node: fx.Node) -> object:
    attr: object = gm
    for part in str(node.target).split("."):
        attr = getattr(attr, part, None)
    return attr


def is_parameter(gm: fx.GraphModule, node: object) -> bool:
    """Whether a weight node is a parameter of the model: a get_attr of an ``nn.Parameter``, or a graph
    input Dynamo lifted from one (its fake value carries ``_is_param``, its grapharg the real tensor)."""
    node = _base_weight(node)
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return isinstance(_attribute(gm, node), torch.nn.Parameter)
    if node.op != "placeholder":
        return False
    example = getattr(node.meta.get("grapharg"), "example", None)
    return isinstance(example, torch.nn.Parameter) or bool(getattr(val(node), "_is_param", False))


def requires_grad(gm: fx.GraphModule, node: object) -> bool:
    """Whether a weight node (or the parameter it is a transpose or row slice of) requires grad."""
    node = _base_weight(node)
    if isinstance(node, fx.Node) and node.op == "get_attr":
        attr = _attribute(gm, node)
        return isinstance(attr, torch.Tensor) and attr.requires_grad
    v = val(node)
    return isinstance(v, torch.Tensor) and v.requires_grad
