"""Bring every linear projection in a Dynamo graph into one call form.

Dynamo shows a projection as ``torch._C._nn.linear(x, w, b)`` when it inlines
``nn.Module`` calls (the default), but as ``call_module`` when inlining is off,
and user code may pass ``weight=``/``bias=`` by keyword. Some models write the
projection as a matrix product with a weight stored transposed, (n, m) instead of
F.linear's (m, n): GPT-2's ``Conv1D`` is ``addmm(bias, x.view(-1, n), W)``, and
hand-written code has ``x @ W`` or ``x @ W + b``. After this pass every projection
is ``call_function(torch._C._nn.linear, (x, w, b_or_None))`` with positional
arguments, where ``w`` may be ``W.t()``, a view of the parameter (no copy)::

    addmm(b, x2d, W)  =>  t = W.t() ; linear(x2d, t, b)
    matmul(x, W)      =>  t = W.t() ; linear(x, t, None)
    matmul(x, W.t())  =>  linear(x, W, None)
    linear(x, W.T)    =>  t = W.t() ; linear(x, t, None)

"Transposed" is any chain of 2-D transposes (``.t()``, ``.T``, ``.mT``, ``transpose(0, 1)``,
``permute(1, 0)`` and their ``torch.`` functions; ``W.T.T`` is W). Only products whose right
operand is a 2-D graph input or attribute (a parameter, possibly transposed) are rewritten:
``q @ k.transpose(-2, -1)`` in attention has an activation there and stays as it is. The result
is the same math, so linears the matcher does not group compile exactly as before. Products
that read a parameter in any other form (``einsum``, ``W @ x``, a 3-D weight, ``nn.LSTM``'s
fused op) are listed by :func:`unrecognised_products`, so explain() names each with a reason.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import operator
from typing import Any

import torch
from torch import fx

from pamm_fx import _compat
from pamm_fx.passes.checks import is_parameter
from pamm_fx.passes.fxutil import LINEAR, MATMUL_FUNCTIONS, MATMUL_METHODS, op_name, val
from pamm_fx.passes.structure import Region, regions

__all__ = [
    "LINEAR_TARGETS", "NOT_DECOMPOSED", "decompose_attention", "normalize_linears", "unrecognised_products",
    "weight_view",
]

log = logging.getLogger(__name__)

LINEAR_TARGETS = (LINEAR, torch.nn.functional.linear)
_ADDMM = (torch.addmm,)


def _positional(node: fx.Node) -> tuple:
    values = list(node.args) + [None] * (3 - len(node.args))
    for i, name in enumerate(("input", "weight", "bias")):
        if name in node.kwargs:
            values[i] = node.kwargs[name]
    return tuple(values[:3])


def _is_weight(node: Any) -> bool:
    """A 2-D floating graph input or attribute: what a parameter looks like in Dynamo's graph."""
    v = val(node)
    return (
        isinstance(node, fx.Node)
        and node.op in ("placeholder", "get_attr")
        and isinstance(v, torch.Tensor)
        and v.dim() == 2
        and v.is_floating_point()
    )


def _swaps_2d(dims: tuple) -> bool:
    """``transpose(a, b)`` of a 2-D tensor that swaps its two dims (0/1 or -2/-1 in any mix)."""
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % 2 for d in dims} == {0, 1}


def _permutes_2d(dims: tuple) -> bool:
    """``permute(1, 0)`` (or ``permute((1, 0))``, negative dims too) of a 2-D tensor."""
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and [d % 2 for d in dims] == [1, 0]


def _transpose_source(node: Any) -> fx.Node | None:
    """X for a node that transposes a 2-D X (``X.t()``, ``X.T``, ``X.mT``, ``X.transpose(0, 1)``,
    ``X.permute(1, 0)``, ``torch.t(X)``, ``torch.transpose(X, 0, 1)``, ``torch.permute(X, (1, 0))``), else None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node) or node.kwargs:
        return None
    name, rest = op_name(node), node.args[1:]
    if node.op == "call_function" and node.target is getattr:
        ok = rest in (("T",), ("mT",))
    elif node.op == "call_function" and node.target not in (torch.t, torch.transpose, torch.permute):
        ok = False
    else:
        ok = (name == "t" and not rest) or (name == "transpose" and _swaps_2d(rest)) or (
            name == "permute" and _permutes_2d(rest))
    return node.args[0] if ok else None


def weight_view(node: Any) -> tuple[fx.Node, bool] | None:
    """(W, transposed) when ``node`` is a weight W or a chain of 2-D transposes of one
    (``W.T.T`` is W itself), else None."""
    flipped = False
    while isinstance(node, fx.Node) and not _is_weight(node):
        node = _transpose_source(node)
        flipped = not flipped
    return (node, flipped) if _is_weight(node) else None


def _product(node: fx.Node) -> tuple[Any, Any] | None:
    """(x, right operand) of a plain matrix product node, else None."""
    if node.kwargs:
        return None
    if node.op == "call_function" and node.target in MATMUL_FUNCTIONS and len(node.args) == 2:
        return node.args[0], node.args[1]
    if node.op == "call_method" and node.target in MATMUL_METHODS and len(node.args) == 2:
        return node.args[0], node.args[1]
    return None


def _addmm(node: fx.Node) -> tuple[Any, Any, Any] | None:
    """(bias, x, W) of ``addmm(bias, x, W)`` with beta = alpha = 1 and a 1-D bias, else None."""
    if node.op != "call_function" or node.target not in _ADDMM or len(node.args) != 3:
        return None
    if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or set(node.kwargs) - {"beta", "alpha"}:
        return None
    bias, x, w = node.args
    bv = val(bias)
    if not isinstance(bv, torch.Tensor) or bv.dim() != 1:
        return None
    return bias, x, w


def _x_fits(x: Any, n: Any) -> bool:
    """X is a floating (..., n) activation; sizes compared as text so a symbolic size adds no guard."""
    xv = val(x)
    return isinstance(xv, torch.Tensor) and xv.dim() >= 2 and xv.is_floating_point() and str(xv.shape[-1]) == str(n)


def _linear_args(node: fx.Node) -> tuple[Any, Any, Any, bool] | None:
    """(x, weight in F.linear layout or the (n, m) weight to transpose, bias, needs_t) of a product form."""
    addmm = _addmm(node)
    if addmm is not None:
        bias, x, w = addmm
    else:
        product = _product(node)
        if product is None:
            return None
        (x, w), bias = product, None
    view = weight_view(w)
    if view is None:
        return None
    base, flipped = view
    if flipped:
        weight, needs_t, n = base, False, val(base).shape[1]
    else:
        weight, needs_t, n = base, True, val(base).shape[0]
    if not _x_fits(x, n):
        log.debug("not a projection: %s (its weight operand fits, X %s does not)", node.format_node(), x)
        return None
    return x, weight, bias, needs_t


def _transpose_node(graph: fx.Graph, weight: fx.Node, cache: dict[fx.Node, fx.Node]) -> fx.Node:
    """One ``weight.t()`` per weight, right after the last placeholder or the get_attr, so that it
    precedes every use (a weight shared by several projections gets one view)."""
    if weight in cache:
        return cache[weight]
    if weight.op == "placeholder":
        where = list(graph.find_nodes(op="placeholder"))[-1]
    else:
        where = weight
    with graph.inserting_after(where):
        t = graph.call_method("t", (weight,))
    wv = val(weight)
    if wv is not None:
        t.meta["example_value"] = wv.t()
    cache[weight] = t
    return t


def _erase_dead_views(graph: fx.Graph, node: Any) -> None:
    """Erase a weight's transpose chain that nothing reads any more (``W.T.T`` left by a rewrite)."""
    while isinstance(node, fx.Node) and not node.users and (src := _transpose_source(node)) is not None:
        graph.erase_node(node)
        node = src


def normalize_linears(gm: fx.GraphModule) -> int:
    """Rewrite ``call_module(nn.Linear)``, keyword calls and product forms in place; return how many changed."""
    changed = decompose_attention(gm)
    graph = gm.graph
    transposes: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if type(mod) is not torch.nn.Linear or len(node.args) != 1 or node.kwargs:
                if isinstance(mod, torch.nn.Linear):
                    log.debug("left as call_module: %s (%s, not a plain nn.Linear(x) call)", node.target,
                              type(mod).__name__)
                continue
            with graph.inserting_before(node):
                w = graph.get_attr(f"{node.target}.weight")
                b = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
                new = graph.call_function(LINEAR, (node.args[0], w, b))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed += 1
        elif node.op == "call_function" and node.target in LINEAR_TARGETS:
            x, w, b = _positional(node)
            view = weight_view(w) if not _is_weight(w) else None
            if view is not None:  # F.linear(x, W.T) of a (n, m) weight W: the canonical W.t() view
                w = _transpose_node(graph, view[0], transposes) if view[1] else view[0]
            if node.target is not LINEAR or node.kwargs or len(node.args) != 3 or view is not None:
                old_w = node.args[1] if len(node.args) > 1 else None
                node.target, node.args, node.kwargs = LINEAR, (x, w, b), {}
                _erase_dead_views(graph, old_w)
                changed += 1
        else:
            form = _linear_args(node)
            if form is None:
                continue
            x, weight, bias, needs_t = form
            w = _transpose_node(graph, weight, transposes) if needs_t else weight
            log.debug("normalized %s to linear (weight %s, transposed=%s)", node.format_node(), weight.name, needs_t)
            old_w = node.args[1] if len(node.args) == 2 else node.args[2]
            node.op, node.target, node.args, node.kwargs = "call_function", LINEAR, (x, w, bias), {}
            _erase_dead_views(graph, old_w)
            changed += 1
    if changed:
        log.debug("normalized %d linear call(s)", changed)
        gm.recompile()
    return changed


#: Products that multiply by a weight but that normalize does not turn into a projection.
_OTHER_PRODUCTS = (
    torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.addbmm, torch.einsum,
    torch.tensordot, torch.mv, torch.addmv, torch.inner, torch.nn.functional.bilinear,
)
_OTHER_PRODUCT_METHODS = frozenset({
    "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "mv", "addmv",
})
#: Calls that run whole projections inside one op (what Dynamo keeps opaque), with what they are.
_OPAQUE = {
    torch.nn.functional.multi_head_attention_forward: "nn.MultiheadAttention in a form normalize does not decompose",
    torch.lstm: "nn.LSTM (one fused op)",
    torch.gru: "nn.GRU (one fused op)",
    torch.rnn_tanh: "nn.RNN (one fused op)",
    torch.rnn_relu: "nn.RNN (one fused op)",
}
#: Steps between a parameter and the product that reads it (views, casts): at most :data:`_VIEW_HOPS`.
_VIEWS = frozenset({"view", "reshape", "to", "contiguous", "expand", "unsqueeze", "squeeze", "flatten", "float",
                    "half", "bfloat16", "type", "t", "transpose", "permute", "getattr", "clone"})
_VIEW_HOPS = 4


def _parameter_behind(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The parameter ``node`` is, or is a view or cast of (a few steps back), else None."""
    for _ in range(_VIEW_HOPS + 1):
        if not isinstance(node, fx.Node):
            return None
        if node.op in ("placeholder", "get_attr"):
            return node if is_parameter(gm, node) else None
        if op_name(node) not in _VIEWS or not node.args:
            return None
        node = node.args[0]
    return None


def unrecognised_products(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, str]]:
    """(node, parameter, reason) for every product or opaque call reading a parameter that is left as it
    is after :func:`normalize_linears` (``einsum``, ``W @ x``, a 3-D weight, ``nn.LSTM``...): explain()
    names each, so that a projection PAMM cannot see is never silent."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _OPAQUE:
            why = f" ({node.meta[NOT_DECOMPOSED]})" if NOT_DECOMPOSED in node.meta else ""
            what = f"{_OPAQUE[node.target]}{why}: its projections run inside one opaque call"
        elif (node.op == "call_function" and node.target in _OTHER_PRODUCTS) or (
                node.op == "call_method" and node.target in _OTHER_PRODUCT_METHODS):
            what = (f"{op_name(node)} is not a projection form the matcher rewrites (it rewrites F.linear, x @ W, "
                    "x @ W.T/.mT/.t()/.transpose/.permute and addmm(b, x, W) with a 2-D weight W on the right)")
        else:
            continue
        for arg in node.all_input_nodes:
            param = _parameter_behind(gm, arg)
            if param is not None:
                found.append((node, param, f"{what}; left exact"))
                break
    return found


# --- nn.MultiheadAttention -------------------------------------------------------------------------

_MHA = torch.nn.functional.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_MHA)
#: Why an MHA call stays opaque, per its node (unrecognised_products reads it).
NOT_DECOMPOSED = "pamm_not_decomposed"


class _Emit:
    """Adds calls before ``anchor``, each with the example value its target computes on the fake inputs,
    so that the passes after this one see shapes as on Dynamo's own nodes."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode: Any, region: Region) -> None:
        self.graph, self.anchor, self.fake_mode, self.region = graph, anchor, fake_mode, region
        self.meta = {k: anchor.meta[k] for k in ("stack_trace", "nn_module_stack", "source_fn_stack")
                     if k in anchor.meta}

    def _add(self, op: str, target: Any, args: tuple, kwargs: dict) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs)
        node.meta.update(self.meta)
        a, k = fx.node.map_arg((args, kwargs), val)
        fn = getattr(a[0], target) if op == "call_method" else target
        a = a[1:] if op == "call_method" else a
        with contextlib.ExitStack() as stack:  # the example value as the call computes it in its region
            if self.fake_mode is not None:
                stack.enter_context(self.fake_mode)
                stack.enter_context(_compat.python_dispatcher())
            stack.enter_context(torch.set_grad_enabled(self.region.grad_enabled))
            for device, dtype in self.region.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            node.meta["example_value"] = fn(*a, **k)
        return node

    def fn(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self._add("call_function", target, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self._add("call_method", name, args, kwargs)

    def size(self, node: fx.Node, dim: int) -> Any:
        """A size as a graph value when it is symbolic, else the int."""
        s = val(node).shape[dim]
        return s if isinstance(s, int) else self.method("size", node, dim)

    def prod(self, a: Any, b: Any) -> Any:
        """a * b, as a graph value when either is one."""
        return a * b if isinstance(a, int) and isinstance(b, int) else self.fn(operator.mul, a, b)

    def parts(self, node: fx.Node, n: int) -> list[fx.Node]:
        return [self.fn(operator.getitem, node, i) for i in range(n)]


def _mha_unsupported(a: dict[str, Any]) -> str | None:
    """Why an MHA call cannot be written out here (its projections then stay exact), else None."""
    q, k, v = (val(a[n]) for n in ("query", "key", "value"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (q, k, v)):
        return "unbatched (2-D) inputs"
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            return f"{name} is set"
    if a["add_zero_attn"]:
        return "add_zero_attn=True"
    if not all(isinstance(a[n], (int, float, bool)) for n in ("embed_dim_to_check", "num_heads", "dropout_p",
                                                                "training", "need_weights", "is_causal",
                                                                "average_attn_weights", "use_separate_proj_weight")):
        return "a size or flag is only known at run time"
    if a["is_causal"] and a["attn_mask"] is None:
        return "is_causal without attn_mask (torch refuses it)"
    if not isinstance(q.shape[-1], int):
        return "a symbolic embedding size"
    return None


def _in_projection(e: _Emit, a: dict[str, Any], dim: int) -> tuple[fx.Node, fx.Node, fx.Node]:
    """q, k, v as F.multi_head_attention_forward computes them (``_in_projection_packed`` / ``_in_projection``)."""
    query, key, value, w, b = a["query"], a["key"], a["value"], a["in_proj_weight"], a["in_proj_bias"]

    def unpack(proj: fx.Node, n: int) -> list[fx.Node]:
        proj = e.method("unflatten", proj, -1, (n, dim))
        proj = e.method("contiguous", e.method("squeeze", e.method("transpose", e.method("unsqueeze", proj, 0),
                                                                     0, -2), -2))
        return e.parts(proj, n)

    if a["use_separate_proj_weight"]:
        ws = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
        bs = [None] * 3 if b is None else e.parts(e.method("chunk", b, 3), 3)
        return tuple(e.fn(LINEAR, x, wi, bi) for x, wi, bi in zip((query, key, value), ws, bs))
    if key is value and query is key:
        return tuple(unpack(e.fn(LINEAR, query, w, b), 3))
    if key is value:
        w_q, w_kv = e.parts(e.method("split", w, [dim, dim * 2]), 2)
        b_q, b_kv = (None, None) if b is None else e.parts(e.method("split", b, [dim, dim * 2]), 2)
        return (e.fn(LINEAR, query, w_q, b_q), *unpack(e.fn(LINEAR, key, w_kv, b_kv), 2))
    ws = e.parts(e.method("chunk", w, 3), 3)
    bs = [None] * 3 if b is None else e.parts(e.method("chunk", b, 3), 3)
    return tuple(e.fn(LINEAR, x, wi, bi) for x, wi, bi in zip((query, key, value), ws, bs))


def _canonical(e: _Emit, mask: Any, dtype: torch.dtype) -> Any:
    """A bool mask as the float mask F.multi_head_attention_forward makes of it (``-inf`` where True)."""
    if mask is None or val(mask).is_floating_point():
        return mask
    return e.method("masked_fill", e.fn(torch.zeros_like, mask, dtype=dtype), mask, float("-inf"))


def _write_mha(e: _Emit, a: dict[str, Any]) -> tuple[fx.Node, fx.Node | None]:
    """F.multi_head_attention_forward's batched math, op for op, as graph nodes: (output, weights or None)."""
    query, key = a["query"], a["key"]
    heads, dim = a["num_heads"], val(query).shape[-1]
    head_dim = dim // heads
    tgt, bsz, src = e.size(query, 0), e.size(query, 1), e.size(key, 0)
    dtype = val(query).dtype
    kpm = _canonical(e, a["key_padding_mask"], dtype)
    is_causal, need_weights = a["is_causal"], a["need_weights"]
    if is_causal and kpm is None and not need_weights:
        mask = None
    else:
        mask = _canonical(e, a["attn_mask"], dtype)
        if kpm is not None:
            is_causal = False
    q, k, v = _in_projection(e, a, dim)
    if mask is not None and val(mask).dim() == 2:
        mask = e.method("unsqueeze", mask, 0)
    bh = e.prod(bsz, heads)
    q = e.method("transpose", e.method("view", q, tgt, bh, head_dim), 0, 1)
    k = e.method("transpose", e.method("view", k, e.size(k, 0), bh, head_dim), 0, 1)
    v = e.method("transpose", e.method("view", v, e.size(v, 0), bh, head_dim), 0, 1)
    if kpm is not None:
        kpm = e.method("reshape", e.method("expand", e.method("view", kpm, bsz, 1, 1, src), -1, heads, -1, -1),
                       bh, 1, src)
        mask = kpm if mask is None else e.fn(operator.add, mask, kpm)
    dropout_p = a["dropout_p"] if a["training"] else 0.0
    out_w, out_b = a["out_proj_weight"], a["out_proj_bias"]
    if need_weights:
        scaled = e.fn(operator.mul, q, math.sqrt(1.0 / float(head_dim)))
        kt = e.method("transpose", k, -2, -1)
        weights = e.fn(torch.baddbmm, mask, scaled, kt) if mask is not None else e.fn(torch.bmm, scaled, kt)
        weights = e.fn(torch.nn.functional.softmax, weights, dim=-1)
        if dropout_p > 0.0:
            weights = e.fn(torch.nn.functional.dropout, weights, p=dropout_p)
        out = e.fn(torch.bmm, weights, v)
        out = e.method("reshape", e.method("transpose", out, 0, 1), e.prod(tgt, bsz), dim)
        out = e.fn(LINEAR, out, out_w, out_b)
        out = e.method("view", out, tgt, bsz, e.size(out, 1))
        weights = e.method("view", weights, bsz, heads, tgt, src)
        if a["average_attn_weights"]:
            weights = e.method("mean", weights, dim=1)
        return out, weights
    if mask is not None:
        if val(mask).shape[0] == 1 and val(mask).dim() == 3:
            mask = e.method("unsqueeze", mask, 0)
        else:
            mask = e.method("view", mask, bsz, heads, -1, src)
    q = e.method("view", q, bsz, heads, tgt, head_dim)
    k = e.method("view", k, bsz, heads, src, head_dim)
    v = e.method("view", v, bsz, heads, src, head_dim)
    out = e.fn(_compat.NN_SDPA, q, k, v, mask, dropout_p, is_causal)
    out = e.method("reshape", e.method("permute", out, 2, 0, 1, 3), e.prod(bsz, tgt), dim)
    out = e.fn(LINEAR, out, out_w, out_b)
    return e.method("view", out, tgt, bsz, e.size(out, 1)), None


def decompose_attention(gm: fx.GraphModule) -> int:
    """Write each ``F.multi_head_attention_forward`` call (Dynamo keeps ``nn.MultiheadAttention``'s
    attention as one opaque call) out as its math: in-projection linears on the packed weight or its
    row slices, SDPA or the explicit softmax when weights are needed, and ``out_proj``, so that its
    projections are matched like any fused QKV projection. The ops are F.multi_head_attention_forward's
    own, in its order (same values, same random stream for dropout). Forms not written out keep their
    reason in ``node.meta[NOT_DECOMPOSED]``. Returns how many calls were written out."""
    graph, count = gm.graph, 0
    where = regions(graph, torch.is_grad_enabled())
    fake_mode = next((mode for n in graph.find_nodes(op="placeholder")
                      if (mode := _compat.fake_mode_of(val(n))) is not None), None)
    for node in list(graph.find_nodes(op="call_function", target=_MHA)):
        try:
            bound = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
        except TypeError:
            node.meta[NOT_DECOMPOSED] = "unexpected arguments"
            continue
        bound.apply_defaults()
        a = dict(bound.arguments)
        reason = _mha_unsupported(a)
        users = list(node.users)
        if reason is None and not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)
                                      for u in users):
            reason = "its result is used other than as (output, weights)"
        if reason is None and not a["need_weights"] and any(u.args[1] == 1 and u.users for u in users):
            reason = "the weights it returns (None) are read"
        if reason is not None:
            node.meta[NOT_DECOMPOSED] = reason
            log.debug("left %s opaque: %s", node.name, reason)
            continue
        out, weights = _write_mha(_Emit(graph, node, fake_mode, where[node]), a)
        for user in users:
            replacement = out if user.args[1] == 0 else weights
            if replacement is not None:
                user.replace_all_uses_with(replacement)
            graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count
