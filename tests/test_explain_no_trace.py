"""explain() between training steps leaves Dynamo's caches and the model's Python state as they were (issue 24,
items 3 and 4).

Every capture used to add a cache entry on each code object it compiled (the forward, the resume functions after
a graph break, a nested frame compiled on its own), with a new backend object each time, so after 8 calls the
user's compiled model reached ``recompile_limit`` and its next new input size ran eagerly, without a warning. And
the forward's own Python side effects (a counter it bumps, a tensor it caches in a dict) stayed changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pamm_fx
from pamm_fx import _compat

D = 16
OPTIONS = {"ratio": 1 / 4, "min_tokens": 1, "min_generators": 1}


def _scale(h: Tensor) -> Tensor:
    """A helper with a graph break: after the break in ``Inner.forward`` Dynamo compiles it as its own frame."""
    h = h * 2
    torch._dynamo.graph_break()
    return h + 1


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, D // 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, D)
        torch._dynamo.graph_break()
        return _scale(out)


class Model(nn.Module):
    """A graph break in a nested module and in a helper it calls: Dynamo compiles the forward, ``Inner.forward``,
    ``_scale`` and their resume functions as separate frames."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.inner, self.out = nn.RMSNorm(D), Inner(), nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.inner(self.norm(x))).sum()


def _entries() -> dict[str, list[tuple[str, int]]]:
    """Every code object Dynamo keeps entries on, with each entry's compile id and compiled code."""
    return {f"{code.co_name}:{code.co_firstlineno}": [(str(e.compile_id), id(e.code)) for e in _compat.cache_entries(code)]
            for code in _compat.dynamo_seen_codes() if _compat.cache_entry_count(code)}


def test_explain_twenty_times_between_steps_leaves_dynamo_caches_as_they_were() -> None:
    """Was: each call added an entry on every compiled code object; after 8 the user's next new size compiled
    nothing and ran eagerly."""
    torch.manual_seed(0)
    model = Model()
    compiled = torch.compile(model, backend="pamm_aot_eager", options=OPTIONS)
    compiled(torch.randn(2, 8, D)).backward()
    before = _entries()
    assert Model.forward.__code__.co_name + ":" + str(Model.forward.__code__.co_firstlineno) in before
    assert {name.split(":")[0] for name in before} >= {"forward", "_scale"}
    assert any(name.startswith("torch_dynamo_resume_in_") for name in before)  # resume functions too
    for step in range(20):
        report = pamm_fx.explain(compiled, torch.randn(2, 8 + step % 3, D), **OPTIONS)
        assert len(report.groups) == 1 and not report.notes, report.notes
        compiled(torch.randn(2, 8, D)).backward()
    assert _entries() == before
    graphs = pamm_fx.counters["graphs"]
    compiled(torch.randn(3, 5, D)).backward()  # a new size: compiled, not run eagerly
    assert pamm_fx.counters["graphs"] > graphs


def _compile_ids() -> list[str]:
    """Dynamo's compile ids of a fresh model's first training step (one per graph; they salt the rows)."""
    torch.manual_seed(0)
    seen = len(pamm_fx.compiler.counters_by_compile)
    torch.compile(Model(), backend="pamm_aot_eager", options=OPTIONS)(torch.randn(2, 8, D)).backward()
    return [c["compile_id"] for c in list(pamm_fx.compiler.counters_by_compile)[seen:]]


def test_explain_gives_later_compiles_the_compile_ids_they_would_have_had() -> None:
    """The capture's frames take no frame id away from the user's later compiles."""
    expected = _compile_ids()
    torch._dynamo.reset()
    pamm_fx.explain(Model(), torch.randn(2, 8, D), **OPTIONS)
    assert _compile_ids() == expected


class Stateful(nn.Module):
    """A forward with Python side effects: a call counter, a dict cache, a list of seen sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))
        self.calls = 0
        self.cache: dict[str, Tensor] = {}
        self.sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.cache["x"] = x
        self.sizes.append(x.shape[1])
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, D // 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v).sum()


def test_explain_leaves_the_forwards_python_state_as_it_was() -> None:
    """Was: the counter went 1 -> 2 and the cached tensor became explain's input."""
    model = Stateful()
    x = torch.randn(2, 8, D)
    model(x)
    report = pamm_fx.explain(model, torch.randn(2, 12, D), **OPTIONS)
    assert len(report.groups) == 1
    assert model.calls == 1
    assert model.cache["x"] is x and list(model.cache) == ["x"]
    assert model.sizes == [8]
