"""One way to see the plan without training: Dynamo capture with a backend that plans and runs eagerly.

:func:`explain` and the test helpers (:func:`pamm_fx.testing.describe_rewrites`) both call
:func:`capture`: the model runs once under ``torch.compile`` with a backend that makes the
backend's own :func:`~pamm_fx.plan.plan` of each graph, hands it to ``on_graph`` while Dynamo's
placeholder metadata (parameter names) still exists, and runs the graph as captured (no
Inductor, no backward). The config comes from :func:`pamm_fx.config.resolve`, as in the backend.
The capture leaves no trace: :func:`pamm_fx.sideeffects.preserved` puts back the modules' Python state
(attributes, counters, caches in dicts), buffers such as BatchNorm's statistics and the random generators,
and :func:`pamm_fx.sideeffects.dynamo_untouched` leaves Dynamo's cache entries on the user's code objects
as they were (no capture entry counts towards the user's ``recompile_limit``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from pamm_fx import _compat
from pamm_fx.config import PammConfig
from pamm_fx.plan import Plan, plan
from pamm_fx.sideeffects import dynamo_untouched, modules_of, preserved

__all__ = ["Captured", "capture"]


@dataclasses.dataclass
class Captured:
    """What a capture leaves besides the plans: Dynamo's graph-break reasons, and the parameters and tensor
    attributes the forward changed in place (which :func:`~pamm_fx.sideeffects.preserved` does not copy back)."""

    break_reasons: list[Any]
    touched: list[str]
    #: code objects whose Dynamo cache entries the capture changed anyway (:func:`dynamo_untouched`)
    caches_changed: list[str] = dataclasses.field(default_factory=list)
    #: ids of the tensors (parameters, buffers, inputs) some captured graph reads
    graph_inputs: set[int] = dataclasses.field(default_factory=set)


def capture(model: Any, inputs: Sequence[Any], config: PammConfig, on_graph: Callable[[Plan, fx.GraphModule], None],
            kwargs: Mapping[str, Any] | None = None) -> Captured:
    """Capture ``model(*inputs, **kwargs)`` and call ``on_graph(plan, gm)`` for each graph Dynamo makes.

    Dynamo's caches are left as they were: graphs the user already compiled stay compiled, the capture's
    own entries are gone afterwards (however often it runs, it brings no code object nearer its
    ``recompile_limit``), and sizes are not made dynamic because the code was compiled before at other
    sizes. ``model`` may be the module or what ``torch.compile`` returned for it.
    """

    seen: set[int] = set()

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        for node in gm.graph.find_nodes(op="placeholder"):
            example = getattr(node.meta.get("grapharg"), "example", None)
            if isinstance(example, torch.Tensor):
                seen.add(id(example))
        on_graph(plan(gm, example_inputs, config), gm)
        return gm.forward

    wrapped = _compat.explain_backend(backend)
    model = getattr(model, "_orig_mod", model)  # an OptimizedModule: capture the module it wraps
    with torch.enable_grad(), _compat.shapes_as_first_compile(), preserved(modules_of(model)) as touched, \
            dynamo_untouched() as caches_changed:
        torch.compile(model, backend=wrapped)(*inputs, **dict(kwargs or {}))
    return Captured(list(wrapped.break_reasons), list(touched), caches_changed, seen)
