"""Names and types as users know them, for logs, reports and golden tests.

Dynamo turns ``model.layers[0].self_attn.q_proj.weight`` into a placeholder called
``l_self_modules_layers_modules_0_...``; its source (``node.meta["grapharg"]``) still
says where the tensor came from, and :func:`param_name` turns that back into the
dotted name. Dynamo drops that metadata once compilation is over, so callers take
names while the graph is being compiled.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

from pamm_fx.fxutil import row_slice

__all__ = ["BACKEND", "param_name", "fmt_value"]

#: The backend's name as users pass it (``torch.compile(model, backend="pamm")``, the entry point in
#: pyproject.toml); also our key in Dynamo's counter table and our ``TORCH_LOGS`` alias.
BACKEND = "pamm"

_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "b8",
    torch.uint8: "u8",
}


def param_name(node: fx.Node) -> str:
    """``layers.0.self_attn.q_proj.weight`` for a Dynamo placeholder or get_attr; else the node name.

    A transposed view of one (``W.t()``, which normalize makes of a weight stored (in, out), as
    GPT-2's ``Conv1D``) is named ``<name>.T``; the rewrite's explicit autocast cast ``<name>.to(bf16)``.
    """
    if node.op == "call_method" and node.target == "t" and isinstance(node.args[0], fx.Node):
        return f"{param_name(node.args[0])}.T"
    if (part := row_slice(node)) is not None:  # a q/k/v part of nn.MultiheadAttention's packed in_proj_weight
        return f"{param_name(part[0])}[{part[1]}:{part[2]}]"
    if node.op == "call_method" and node.target == "to" and isinstance(node.args[0], fx.Node):
        dtype = node.args[1] if len(node.args) > 1 else None
        return f"{param_name(node.args[0])}.to({_DTYPES.get(dtype, dtype)})"  # autocast's cast, made explicit
    if node.op == "get_attr":
        return str(node.target)
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return node.name
    text = source.name if isinstance(source.name, str) else source.name()
    # The module path starts at the first ._modules/._parameters/._buffers; what precedes it is how the root
    # module reached the frame (L['self'], or L['args'][0] when forward is wrapped, as in Hugging Face models).
    root = re.search(r"\._(?:modules|parameters|buffers)\[", text)
    parts = re.findall(r"\['([^']+)'\]|\[(\d+)\]", text[root.start() :] if root else text)
    names = [a or b for a, b in parts]
    return ".".join(names) if names else node.name


def fmt_value(val: Any) -> str:
    """``f32[4, 64, 64]`` for a tensor (symbolic sizes printed as their expressions)."""
    if isinstance(val, torch.Tensor):
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(fmt_value(v) for v in val) + ")"
    return repr(val)
