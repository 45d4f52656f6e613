"""Compress what the partitioner keeps: saved activations at ``saved_bits`` with stochastic rounding.

Every linear input of a transformer block is cheap to recompute; what dominates the bytes torch
keeps for the backward are the tensors the backward needs for dX: q, k, v and the attention output
(the attention backward), the MLP's up/gate outputs (the activation's backward), norm inputs. Which
of them are kept at all is the min-cut partitioner's decision (with ``activation_memory_budget``
its recompute knapsack), so this runs right after it, as Inductor's own fp8 activation pass does::

    joint graph ──min_cut_rematerialization_partition──> forward, backward
                  (its choice of saved tensors, recompute)        │
                                                                  ▼  compress_saved()
    forward:  s = producer(...) ──> quantize(rows of s) ──> (q uint8, lo, scale) returned instead of s
    backward: placeholder q, lo, scale ──> s^ = lo + q * scale, reshaped ──> every use of s

The format is the one ``estimator="sr"`` keeps X in (:mod:`pamm_fx.kernels.lowbit`): per row of the
last dimension a float32 lo and scale, ``bits`` per element, rounded up or down at random with
P(up) = the fraction, from a counter hash of the per-call seed, so E[s^] = s: every gradient that is
linear in the saved tensor is unbiased. Both sides are whole-tensor aten ops traced into the graphs,
so Inductor fuses the quantization into the producer's kernel and the decoding into the consumer's
(CPU and CUDA alike); nothing is opaque, nothing syncs with the host.

Which tensors (:class:`SavedPolicy`):

* ``"wgrad"``: only tensors the backward reads for parameters' weight gradients alone (found by
  following each saved tensor's uses to the backward's outputs): dX stays exact.
* ``"all"``: every saved activation, so dX is approximate too (an explicit choice).

Never: graph inputs (parameters, the user's tensors: alive anyway), tensors the forward also returns,
non-floating tensors (masks, indices, our own uint8 payloads), attention's statistics (an error in
logsumexp scales probabilities multiplicatively, which is not unbiased), tensors under
:data:`MIN_ELEMENTS` elements or with rows under :data:`MIN_ROW` elements (lo and scale would cost
more than they save).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx

from pamm_fx import _compat
from pamm_fx.config import SAVED_MODES
from pamm_fx.kernels import lowbit as fmt
from pamm_fx.ops.lowbit import quantize_rotated

__all__ = ["MIN_ELEMENTS", "MIN_ROW", "ROW_MAX", "ROW_TARGET", "SavedChoice", "SavedPartitioner", "SavedPolicy",
           "compress_saved", "memory_order", "partition_choices", "record_choices", "row_width"]

log = logging.getLogger(__name__)

#: Smaller saved tensors stay as they are (norm statistics, biases' partial sums): too small to matter.
MIN_ELEMENTS = 4096
#: Rows shorter than this stay as they are: 8 bytes of lo and scale per row would eat the saving.
MIN_ROW = 16
#: Rows are the innermost dims in memory, merged while shorter than ROW_TARGET into rows of at most ROW_MAX
#: (an attention output's heads and head dims: one token's row across heads, never several tokens' rows of
#: a wide tensor), so that per-row work and lo/scale bytes stay small against the row.
ROW_TARGET = 256
ROW_MAX = 512
#: Separates the salts of saved tensors from the groups' (which count up from the graph's salt base).
_SALT_DOMAIN = 1 << 40

aten = torch.ops.aten
#: Attention ops whose outputs past the first are statistics (logsumexp, seeds, offsets), never compressed.
_ATTENTION = {
    getattr(aten, name).default
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_flash_attention_forward", "_efficient_attention_forward")
    if hasattr(aten, name)
}
#: Log-domain outputs whose backward takes their exponential (log_softmax for the loss).
_LOG_DOMAIN = {aten._log_softmax.default}


@dataclasses.dataclass(frozen=True)
class SavedPolicy:
    """What :func:`compress_saved` may compress: ``mode`` (one of :data:`SAVED_MODES` but ``"exact"``)
    at ``bits`` per element (one of :data:`pamm_fx.kernels.lowbit.BITS`)."""

    mode: str
    bits: int

    def __post_init__(self) -> None:
        if self.mode not in SAVED_MODES[1:]:
            raise ValueError(f"pamm: saved-tensor mode must be one of {list(SAVED_MODES[1:])}, not {self.mode!r}")
        if self.bits not in fmt.BITS:
            raise ValueError(f"pamm: saved_bits must be one of {list(fmt.BITS)}, not {self.bits!r}")


@dataclasses.dataclass(frozen=True)
class SavedChoice:
    """One tensor the partitioner kept, and what happened to it (for the report and the log)."""

    name: str
    #: sizes as ints, a symbolic size as its text (``s0``): a choice outlives its compile and holds no
    #: SymInt, whose shape environment holds fake tensors (Inductor deep-copies its config, this included)
    shape: tuple[int | str, ...]
    dtype: torch.dtype
    #: bytes of the storage it holds, counted once: a second view of a compressed root says 0
    bytes_before: int
    bytes_after: int
    compressed: bool
    why: str
    #: the forward node whose storage it holds (itself, or the tensor it is a view of): what is compressed
    root: str = ""


def _shape(v: Any) -> tuple[int | str, ...]:
    """``v``'s sizes for a :class:`SavedChoice`: ints, a symbolic size as its text."""
    return tuple(str(d) if isinstance(d, torch.SymInt) else int(d) for d in getattr(v, "shape", ()))


def _hint(x: Any) -> int:
    """An int for a size that may be symbolic (its hint)."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint) if x.node.has_hint() else 0
    return int(x)


def _bytes(v: torch.Tensor) -> int:
    n = 1
    for s in v.shape:
        n *= _hint(s)
    return n * v.element_size()


#: Ops that pass a tensor on unchanged in value (views, copies, casts): a use through them is a use of it.
_PASS_THROUGH = {
    getattr(aten, name).default
    for name in ("view", "_unsafe_view", "reshape", "permute", "t", "transpose", "expand", "squeeze", "unsqueeze",
                 "alias", "detach", "clone", "contiguous", "_to_copy")
    if hasattr(aten, name) and hasattr(getattr(aten, name), "default")
} | {aten.squeeze.dim, aten.unsqueeze.default, aten.transpose.int, aten.slice.Tensor, aten.select.int,
     torch.ops.prims.convert_element_type.default}


def _grad_outputs_reached(bw: fx.GraphModule) -> dict[fx.Node, set[int]]:
    """For each backward node, the positions of the backward's outputs (gradients, one per forward
    input) that its value flows into."""
    out = bw.graph.output_node()
    reach: dict[fx.Node, set[int]] = {}
    positions: dict[fx.Node, set[int]] = {}
    for i, node in enumerate(out.args[0]):
        if isinstance(node, fx.Node):
            positions.setdefault(node, set()).add(i)
    for node in reversed(bw.graph.nodes):
        if node.op == "output":
            continue
        mine = set(positions.get(node, ()))
        for user in node.users:
            if user.op != "output":
                mine |= reach.get(user, set())
        reach[node] = mine
    return reach


def _uses(node: fx.Node) -> list[fx.Node]:
    """The nodes that compute with ``node``'s value: its users, looking through views, copies and casts."""
    found: list[fx.Node] = []
    for user in node.users:
        if user.op == "call_function" and user.target in _PASS_THROUGH:
            found += _uses(user) or [user]
        else:
            found.append(user)
    return found


def _weight_grad_only(target: fx.Node, reach: dict[fx.Node, set[int]], weight_grads: frozenset[int]) -> bool:
    """Whether the backward reads ``target`` only to form weight gradients: each use of it flows into one
    output, a trainable parameter's gradient. A use that reaches two or more outputs (an attention or
    activation backward, a norm's dX) carries it into the gradient propagated to earlier layers."""
    uses = _uses(target)
    return bool(uses) and all(len(reach.get(u, ())) == 1 and reach[u] <= weight_grads for u in uses)


def _why_not(node: fx.Node, target: fx.Node | None, policy: SavedPolicy, user_outputs: set[fx.Node],
             reach: dict[fx.Node, set[int]], weight_grads: frozenset[int], is_view: bool = False) -> str | None:
    """Why a saved forward node (``target``: its backward input), or the root a saved view holds (``target``
    None), stays as it is; None to compress it. A view is checked for what its backward uses need only."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return "not a tensor"
    if node.op == "placeholder":
        return "a graph input or a view of one (a parameter or the caller's tensor: alive anyway)"
    if node in user_outputs:
        return "shares its storage with a forward output (alive anyway)"
    if not v.dtype.is_floating_point:
        return f"{v.dtype} is not floating point"
    if node.target is operator.getitem and node.args[0].target in _ATTENTION and node.args[1] != 0:
        return "attention statistics (logsumexp), exponentiated by the backward: rounding would bias it"
    if node.target in _LOG_DOMAIN:
        return "log-probabilities, exponentiated by the backward: rounding would bias it"
    if target is not None and policy.mode == "wgrad" and not _weight_grad_only(target, reach, weight_grads):
        return "the backward needs it for dX (saved='all' compresses it)"
    if is_view:
        return None
    if v.dim() == 0:
        return "a scalar"
    order = memory_order(v)
    if order is None:
        return "not one dense block in any dim order (a broadcast or overlapping layout)"
    n = row_width(v, order)
    if n is None or n < MIN_ROW:
        return f"rows (its innermost dims in memory) of under {MIN_ROW} elements, or of a size that varies"
    if _bytes(v) // v.element_size() < MIN_ELEMENTS:
        return f"under {MIN_ELEMENTS} elements"
    return None


def _inline(graph: fx.Graph, fn: Callable[..., Any], inputs: Sequence[fx.Node],
            decompositions: dict[Any, Any]) -> list[fx.Node]:
    """Trace ``fn`` on the inputs' fake values into aten ops (with ``decompositions``, as AOTAutograd traced
    the rest) and copy them into ``graph`` at its insertion point; the copies of ``fn``'s outputs, in order."""
    from torch.fx.experimental.proxy_tensor import make_fx

    vals = [n.meta["val"] for n in inputs]
    with _compat.python_dispatcher():
        sub = make_fx(fn, decomposition_table=decompositions, tracing_mode="real")(*vals)
    env = dict(zip(sub.graph.find_nodes(op="placeholder"), inputs))
    outs = graph.graph_copy(sub.graph, env)
    return list(outs) if isinstance(outs, (tuple, list)) else [outs]


def memory_order(v: torch.Tensor) -> list[int] | None:
    """The permutation of ``v``'s dims, outermost first, under which its storage is dense row-major at every
    size the graph serves (strides proven symbolically, size-1 dims free), else None.

    Rows are quantized in memory order and the decoded tensor permuted back, so the backward sees the
    strides it was traced with (an attention output saved as a transposed view, say)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    order = sorted(range(v.dim()), key=lambda i: -_hint(v.stride(i)))
    expected: Any = 1
    for i in reversed(order):
        if not (statically_known_true(v.shape[i] == 1) or statically_known_true(v.stride(i) == expected)):
            return None
        expected = expected * v.shape[i]
    return order


def row_width(v: torch.Tensor, order: list[int]) -> int | None:
    """Elements per quantized row: the innermost dim in memory order, times the next ones while the row is
    under :data:`ROW_TARGET` and stays within :data:`ROW_MAX` (static sizes only); None when the innermost
    dim's size varies from call to call."""
    inner = v.shape[order[-1]]
    if not isinstance(inner, int):
        return None
    n = inner
    for i in reversed(order[:-1]):
        size = v.shape[i]
        if n >= ROW_TARGET or not isinstance(size, int) or n * size > ROW_MAX:
            break
        n *= size
    return n


def _quantizer(bits: int, salt: int, order: list[int], n: int) -> Callable[..., Any]:
    def quantize(s: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return quantize_rotated(s.permute(order).reshape(-1, n), seed, salt, bits)

    return quantize


def _decoder(bits: int, like: torch.Tensor, order: list[int], n: int, sym_inputs: int) -> Callable[..., torch.Tensor]:
    """decode(q, lo, scale, *sizes): the root in its shape and strides, from rows of ``n`` elements. Its sizes
    in memory order are ints, one size that varies (then derived from the row count), or taken from
    ``sym_inputs`` SymInt arguments (the backward's own saved sizes), in order of appearance."""
    shape = [like.shape[i] for i in order]
    dtype = like.dtype
    inverse = sorted(range(len(order)), key=order.__getitem__)
    varying = [i for i, d in enumerate(shape) if not isinstance(d, int)]

    def decode(q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, *sizes: Any) -> torch.Tensor:
        deq = fmt.decode(q, lo, scale, n, bits, dtype)
        dims = list(shape)
        if sym_inputs:
            for i, size in zip(varying, sizes):
                dims[i] = size
        elif varying:
            (i,) = varying
            rest = 1
            for j, d in enumerate(shape):
                rest = rest * (d if j != i else 1)
            dims[i] = q.shape[0] * n // rest
        return deq.view(dims).permute(inverse)

    return decode


def _sizes_for(like: torch.Tensor, order: list[int], bw: fx.GraphModule) -> list[fx.Node] | None:
    """The backward inputs carrying ``like``'s varying sizes when two or more vary (one is derived from the row
    count), in memory order; None if one of them is not a backward input."""
    varying = [like.shape[i] for i in order if not isinstance(like.shape[i], int)]
    if len(varying) < 2:
        return []
    by_expr = {}
    for n in bw.graph.find_nodes(op="placeholder"):
        v = n.meta.get("val")
        if isinstance(v, torch.SymInt):
            by_expr.setdefault(v.node.expr, n)
    found = [by_expr.get(d.node.expr) for d in varying]
    return None if any(f is None for f in found) else found


#: View ops a saved tensor may be reached by from the tensor whose storage it shares (its root): the
#: backward rebuilds the view from the decoded root with the same op and arguments.
_VIEWS = {
    getattr(aten, name).default
    for name in ("view", "_unsafe_view", "permute", "t", "expand", "unsqueeze", "alias", "detach")
} | {aten.squeeze.dim, aten.transpose.int, aten.slice.Tensor, aten.select.int, aten.split.Tensor,
     aten.split_with_sizes.default, aten.unbind.int}


def _root(node: fx.Node, replayable: Callable[[Any], bool]) -> tuple[fx.Node, list[fx.Node]]:
    """The node whose storage ``node`` views, and the chain of view nodes from it to ``node`` (first
    op first); a view whose other arguments the backward cannot see ends the chain."""
    chain: list[fx.Node] = []
    while True:
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0].target in _VIEWS:
            parent = node.args[0]  # one piece of a split / unbind
        elif node.op == "call_function" and node.target in _VIEWS:
            parent = node
        else:
            return node, chain
        src = parent.args[0]
        rest = [a for a in (*parent.args[1:], *parent.kwargs.values())]
        if not isinstance(src, fx.Node) or not all(replayable(a) for a in rest):
            return node, chain
        chain[:0] = [parent] if parent is node else [parent, node]
        node = src


def compress_saved(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, policy: SavedPolicy,
                   seed_name: str, salt_base: int, weight_grads: frozenset[int],
                   decompositions: dict[Any, Any]) -> list[SavedChoice]:
    """Replace the saved tensors the policy admits by the quantized form of the tensor whose storage they
    hold (their root: q, k and v may be three views of one projection's output), in place on both modules.

    ``seed_name``: the forward placeholder holding the per-call seed; ``weight_grads``: positions of the
    backward's outputs that are trainable parameters' gradients; ``decompositions``: the table to trace the
    inserted code with. Returns one :class:`SavedChoice` per saved tensor. The calling convention is kept:
    the forward returns its saved tensors before its saved SymInts, and the backward takes SymInts, then
    tensors, then tangents, in the same order; the backward rebuilds each view from the decoded root.
    """
    seeds = [n for n in fw.graph.find_nodes(op="placeholder") if n.name == seed_name]
    seed_val = seeds[0].meta.get("val") if seeds else None
    if not (isinstance(seed_val, torch.Tensor) and seed_val.dtype == torch.int64 and seed_val.dim() == 0):
        log.info("pamm: no per-call seed in this forward graph; saved tensors stay as they are")
        return []
    seed = seeds[0]
    out_node = fw.graph.output_node()
    outs = list(out_node.args[0])
    user_outputs = {n for n in outs[:num_fwd_outputs] if isinstance(n, fx.Node)}
    bw_inputs = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    saved = outs[num_fwd_outputs:]
    unmatched = [n for n in saved if not _is_sym(n) and n.name not in bw_inputs]
    if unmatched:
        log.info("pamm: saved tensors %s have no backward input of their name; all stay as they are", unmatched)
        return []
    reach = _grad_outputs_reached(bw)
    position = _order(bw.graph)

    def replayable(a: Any) -> bool:  # a view argument the backward has: a literal, or a saved SymInt
        if isinstance(a, (list, tuple)):
            return all(replayable(x) for x in a)
        return not isinstance(a, fx.Node) or (_is_sym(a) and a.name in bw_inputs)

    # Group the saved tensors by the root whose storage they hold, and decide per root.
    members: dict[fx.Node, list[tuple[fx.Node, list[fx.Node]]]] = {}
    for node in saved:
        if not _is_sym(node):
            root, chain = _root(node, replayable)
            members.setdefault(root, []).append((node, chain))
    why_root: dict[fx.Node, str | None] = {}
    for root, views in members.items():
        reasons = [_why_not(root, None, policy, user_outputs, reach, weight_grads)]
        reasons += [_why_not(n, bw_inputs[n.name], policy, user_outputs, reach, weight_grads, is_view=True)
                    for n, _ in views]
        why_root[root] = next((r for r in reasons if r is not None), None)

    choices: list[SavedChoice] = []
    tensors: list[tuple[fx.Node, fx.Node]] = []  # (forward output, backward input), in calling order
    parts: list[tuple[fx.Node, fx.Node]] = []  # lo and scale pairs, which go behind every saved tensor
    syms: list[Any] = []
    done: dict[fx.Node, fx.Node] = {}  # root -> its decoded value in the backward
    for index, node in enumerate(saved):
        if _is_sym(node):
            syms.append(node)
            continue
        target = bw_inputs[node.name]
        v = node.meta["val"]
        root, chain = _root(node, replayable)
        why = why_root[root]
        if why is not None:
            tensors.append((node, target))
            b = _bytes(v) if isinstance(v, torch.Tensor) else 0
            choices.append(SavedChoice(node.name, _shape(v), getattr(v, "dtype", None), b, b,
                                       False, why, root.name))
            continue
        rv = root.meta["val"]
        order = memory_order(rv)
        width = row_width(rv, order)
        first = root not in done
        sizes = _sizes_for(rv, order, bw) if first else []
        if sizes is None:
            why_root[root] = "two or more of its sizes vary and the backward does not have them"
            tensors.append((node, target))
            choices.append(SavedChoice(node.name, _shape(v), v.dtype, _bytes(v), _bytes(v), False,
                                       why_root[root], root.name))
            continue
        if first:
            with fw.graph.inserting_before(root.next):  # (inserting_after would reverse the copied nodes)
                quantize = _quantizer(policy.bits, (salt_base ^ _SALT_DOMAIN) | index, order, width)
                quantized = _inline(fw.graph, quantize, [root, seed], decompositions)
            inputs = []
            for part, suffix in zip(quantized, ("q", "lo", "scale")):
                with bw.graph.inserting_before(target):
                    p = bw.graph.placeholder(f"{root.name}_{suffix}")
                p.meta.update(part.meta)
                inputs.append(p)
            tensors.append((quantized[0], inputs[0]))
            parts += [(quantized[1], inputs[1]), (quantized[2], inputs[2])]
            uses = [u for n, _ in members[root] for u in bw_inputs[n.name].users]
            anchor = min(uses, key=position.__getitem__) if uses else None
            if anchor is not None:
                with bw.graph.inserting_before(anchor):
                    decode = _decoder(policy.bits, rv, order, width, len(sizes))
                    (done[root],) = _inline(bw.graph, decode, [*inputs, *sizes], decompositions)
            else:
                done[root] = None
        if target.users:
            env: dict[fx.Node, fx.Node] = {root: done[root]}
            value = done[root]
            with bw.graph.inserting_before(min(target.users, key=position.__getitem__)):
                for view in chain:
                    value = bw.graph.node_copy(view, lambda a, env=env: env[a] if a in env else bw_inputs[a.name])
                    env[view] = value
            target.replace_all_uses_with(value)
        bw.graph.erase_node(target)
        after = _bytes(rv) // rv.element_size() // width * fmt.bytes_per_row(width, policy.bits, rv.dtype)
        choices.append(SavedChoice(node.name, _shape(v), v.dtype, _bytes(rv) if first else 0,
                                   after if first else 0, True,
                                   f"{policy.bits} bits per element, per-row lo/scale, stochastic rounding", root.name))
    if not parts:
        return choices
    calling = tensors + parts
    out_node.args = ((*outs[:num_fwd_outputs], *(f for f, _ in calling), *syms),)
    _order_backward_inputs(bw, [b for _, b in calling])
    for gm in (fw, bw):
        gm.graph.eliminate_dead_code() if gm is fw else None
        gm.graph.lint()
        gm.recompile()
    return choices


def _is_sym(node: Any) -> bool:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) and not isinstance(
        v, torch.Tensor)


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _order_backward_inputs(bw: fx.GraphModule, saved: list[fx.Node]) -> None:
    """Put the backward's saved-tensor placeholders in the forward's order, after its SymInts and before
    the tangents: AOTAutograd calls it with (saved SymInts, saved tensors, tangents)."""
    placeholders = list(bw.graph.find_nodes(op="placeholder"))
    wanted = set(saved)
    syms = [n for n in placeholders if n not in wanted and _is_sym(n)]
    rest = [n for n in placeholders if n not in wanted and not _is_sym(n)]
    anchor = next(n for n in bw.graph.nodes if n.op != "placeholder")
    for node in [*syms, *saved, *rest]:
        anchor.prepend(node)


#: The open :func:`record_choices` blocks' lists, innermost last.
_recorders: list[list[list[SavedChoice]]] = []


@contextlib.contextmanager
def record_choices() -> Iterator[list[list[SavedChoice]]]:
    """A list that collects the choices of every partition run inside the block, in order (for the demo and
    tests: a compiled function hides its partitioner). Nothing is kept outside such a block."""
    got: list[list[SavedChoice]] = []
    _recorders.append(got)
    try:
        yield got
    finally:
        _recorders.remove(got)


class SavedPartitioner(_compat.CustomPartitionerFn):
    """The partition function of a compile: the partitioner Inductor would run (the user's
    ``custom_partitioner_fn`` if set, else min-cut), then :func:`compress_saved` on its result.

    Inductor takes it as ``config.custom_partitioner_fn``; ``backend="pamm_aot_eager"`` as AOTAutograd's
    ``partition_fn``. ``decompositions`` (a module-level function, so the object pickles into Inductor's
    cache key) gives the table the inserted code is traced with, as AOTAutograd traced the rest; ``key``
    joins Inductor's cache key through :meth:`uuid`.
    """

    def __init__(self, policy: SavedPolicy, seed_name: str, salt_base: int, weight_grads: frozenset[int],
                 num_inputs: int, key: str, decompositions: Callable[[], dict[Any, Any]], inner: Any = None) -> None:
        self.policy, self.seed_name, self.salt_base = policy, seed_name, salt_base
        self.weight_grads, self.num_inputs, self.key = weight_grads, num_inputs, key
        self.decompositions, self.inner = decompositions, inner
        #: the choices of the partitions this object ran, newest last (``explain()`` reads them)
        self.choices: list[list[SavedChoice]] = []

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("compiler", "inductor")
        fw, bw = (self.inner or _compat.min_cut_partition)(gm, joint_inputs, **kwargs)
        outputs = bw.graph.output_node().args[0]
        if len(outputs) != self.num_inputs:
            # The backward's outputs are not one per graph input (deduplicated or extra inputs): the
            # weight-gradient positions cannot be trusted, so nothing is compressed.
            log.info("pamm: backward has %d outputs for %d inputs; saved tensors stay as they are",
                     len(outputs), self.num_inputs)
            return fw, bw
        choices = compress_saved(fw, bw, kwargs["num_fwd_outputs"], self.policy, self.seed_name, self.salt_base,
                                 self.weight_grads, self.decompositions())
        for got in _recorders:
            got.append(choices)
        self.choices.append(choices)
        done = [c for c in choices if c.compressed]
        log.info("pamm: saved=%r compressed %d of %d saved tensors: %d -> %d bytes", self.policy.mode, len(done),
                 len(choices), sum(c.bytes_before for c in choices), sum(c.bytes_after for c in choices))
        return fw, bw

    def __deepcopy__(self, memo: dict[int, Any]) -> SavedPartitioner:
        """Itself: Inductor deep-copies its config (this object included) for every cache key, and the object
        is settings plus a record of its partitions, which a copy must not fork."""
        return self

    def uuid(self) -> Any:
        theirs = None if self.inner is None else getattr(self.inner, "uuid", lambda: None)()
        if self.inner is not None and theirs is None:
            return None
        return (self.key, self.policy.mode, self.policy.bits, self.seed_name, self.salt_base,
                tuple(sorted(self.weight_grads)), self.num_inputs, theirs)


def partition_choices(gm: fx.GraphModule, example_inputs: Sequence[Any], part: SavedPartitioner) -> list[SavedChoice]:
    """What ``part`` decides for the (rewritten, seed-taking) graph ``gm``: AOTAutograd traces the joint graph
    with the backend's decompositions and runs Inductor's own partition step (its joint-graph passes, then
    ``part``), with no code generated; for ``explain()``. Empty when no backward is traced (no input needs
    a gradient)."""
    _compat.partition_only(gm, list(example_inputs), part, part.decompositions())
    return part.choices[-1] if part.choices else []
