"""A scan that changes nothing: parameters read by a product or an opaque call that is not a projection.

Runs after :func:`pamm_fx.passes.normalize.normalize_linears`. Every product or opaque call that reads
a parameter in a form normalize left as it is (``einsum``, ``W @ x``, a 3-D weight, ``nn.LSTM``'s fused
op, an ``nn.MultiheadAttention`` call :mod:`pamm_fx.passes.mha` could not write out) is a projection PAMM
cannot see; the scan names each, with the category
:data:`~pamm_fx.passes.categories.UNRECOGNISED`, so that it is never silent: its findings join the plan's
rejections, which the log, the backend's counters and ``explain()`` report.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from pamm_fx.fxutil import is_parameter, op_name
from pamm_fx.names import param_name
from pamm_fx.passes.categories import UNRECOGNISED, Rejection
from pamm_fx.passes.mha import NOT_DECOMPOSED

__all__ = ["unrecognised_products"]

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


def unrecognised_products(gm: fx.GraphModule) -> list[Rejection]:
    """A rejection (category ``unrecognised``) for every product or opaque call reading a parameter that
    is left as it is after :func:`~pamm_fx.passes.normalize.normalize_linears` (``einsum``, ``W @ x``,
    a 3-D weight, ``nn.LSTM``...), named by the parameter it reads."""
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
                found.append(Rejection(node, f"{what}; left exact", UNRECOGNISED.name, param_name(param)))
                break
    return found
