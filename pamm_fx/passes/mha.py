"""Write ``nn.MultiheadAttention``'s opaque call out as its own ops, so that its projections are linears.

The first pass of :func:`pamm_fx.plan.plan`. Dynamo keeps ``nn.MultiheadAttention``'s attention as one
``F.multi_head_attention_forward`` call; :func:`decompose_attention` writes each such call out as that
function's math, op for op and in its order (in-projection on the packed weight or its row slices, SDPA
or the explicit softmax when weights are needed, ``out_proj``), so that the passes after it see its
in-projection as a fused QKV projection and ``out_proj`` as an attention output projection. A form it
does not write out keeps its reason in ``node.meta[NOT_DECOMPOSED]``, which the unrecognised-products
scan (:mod:`pamm_fx.passes.unrecognised`) reports.
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
from pamm_fx.fxutil import LINEAR, Region, regions, val

__all__ = ["NOT_DECOMPOSED", "decompose_attention"]

log = logging.getLogger(__name__)

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


def decompose_attention(gm: fx.GraphModule, grad_enabled: bool) -> int:
    """Write each ``F.multi_head_attention_forward`` call (Dynamo keeps ``nn.MultiheadAttention``'s
    attention as one opaque call) out as its math: in-projection linears on the packed weight or its
    row slices, SDPA or the explicit softmax when weights are needed, and ``out_proj``, so that its
    projections are matched like any fused QKV projection. The ops are F.multi_head_attention_forward's
    own, in its order (same values, same random stream for dropout). Forms not written out keep their
    reason in ``node.meta[NOT_DECOMPOSED]``. Returns how many calls were written out.

    grad_enabled: the grad mode the graph starts in (Dynamo guards on it): the new nodes' example values
    are computed in each call's own grad-mode and autocast region."""
    graph, count = gm.graph, 0
    where = regions(graph, grad_enabled)
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
