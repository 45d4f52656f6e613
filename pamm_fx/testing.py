"""Helpers to see and pin what the backend did to a graph (tests, CI checks).

``capture_rewrites()`` records every graph the ``pamm`` backend compiles while it
is active; ``describe(record)`` prints one as stable, readable text (parameter
names as the user knows them, shapes, which parameters went into which group),
the form the golden-graph tests compare with ``assertExpectedInline``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx

from pamm_fx import compiler as _backend
from pamm_fx.passes.match import MatchResult

__all__ = ["RewriteRecord", "capture_rewrites", "describe", "param_name", "fmt_value"]

_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "b8",
}


@dataclasses.dataclass
class RewriteRecord:
    """One graph the backend saw: the graph as captured, the match, and the rewritten copy (or None)."""

    original: fx.GraphModule
    result: MatchResult
    rewritten: fx.GraphModule | None
    #: :func:`describe` text, taken when the graph was seen: Dynamo drops the
    #: placeholders' source metadata (parameter names) once compilation is over.
    summary: str = ""


@contextlib.contextmanager
def capture_rewrites() -> Iterator[list[RewriteRecord]]:
    """Collect a :class:`RewriteRecord` for every graph compiled by the backend inside the block."""
    records: list[RewriteRecord] = []

    def observe(gm: fx.GraphModule, result: MatchResult, new: fx.GraphModule | None) -> None:
        record = RewriteRecord(gm, result, new)
        record.summary = _describe(record)
        records.append(record)

    _backend.add_observer(observe)
    try:
        yield records
    finally:
        _backend.remove_observer(observe)


def param_name(node: fx.Node) -> str:
    """``layers.0.self_attn.q_proj.weight`` for a Dynamo placeholder or get_attr; else the node name."""
    if node.op == "get_attr":
        return str(node.target)
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return node.name
    text = source.name if isinstance(source.name, str) else source.name()
    parts = re.findall(r"\['([^']+)'\]|\[(\d+)\]", text)
    names = [a or b for a, b in parts]
    if ("_parameters" in text or "_buffers" in text) and len(names) > 1:
        names = names[1:]
    return ".".join(names) if names else node.name


def fmt_value(val: Any) -> str:
    """``f32[4, 64, 64]`` for a tensor (symbolic sizes printed as their expressions)."""
    if isinstance(val, torch.Tensor):
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(fmt_value(v) for v in val) + ")"
    return repr(val)


def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def _arg(node: Any) -> str:
    if isinstance(node, fx.Node):
        if node.op in ("placeholder", "get_attr"):
            return f"{param_name(node)}: {fmt_value(_val(node))}"
        return f"{node.name}: {fmt_value(_val(node))}"
    return repr(node)


def describe(record: RewriteRecord) -> str:
    """Readable text of one rewrite: each pamm op in graph order, then each linear left alone and why."""
    return record.summary or _describe(record)


def _describe(record: RewriteRecord) -> str:
    lines: list[str] = []
    if record.rewritten is not None:
        for node in record.rewritten.graph.nodes:
            if node.target is torch.ops.pamm.compress.default:
                x, _, num, den, min_gen, eps, _ = node.args
                lines.append(
                    f"compress({_arg(x.args[0])}, ratio={num}/{den}, min_generators={min_gen}, eps={eps})"
                    f" -> {fmt_value(_val(node))}"
                )
            elif node.target is torch.ops.pamm.linear_group.default:
                x, weights, biases, has_bias, *_ = node.args
                lines.append(f"linear_group({_arg(x)})")
                bias_iter = iter(biases)
                outs = sorted(
                    (u for u in node.users if u.target is operator.getitem), key=lambda u: u.args[1]
                )
                for w, hb, out in zip(weights, has_bias, outs):
                    bias = f" + {param_name(next(bias_iter))}" if hb else ""
                    users = ", ".join(sorted(u.name for u in out.users))
                    lines.append(f"  {param_name(w)}{bias} -> {fmt_value(_val(out))} -> {users}")
    for rej in record.result.rejections:
        w = rej.node.args[1] if len(rej.node.args) > 1 else None
        name = param_name(w) if isinstance(w, fx.Node) else rej.node.name
        lines.append(f"untouched {name}: {rej.reason}")
    return "\n".join(lines)
