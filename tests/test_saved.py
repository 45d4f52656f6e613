"""``saved="wgrad"|"all"``: the tensors the partitioner keeps, at ``saved_bits`` with stochastic rounding.

What must hold (pamm_fx/saved.py): the forward is plain's bit for bit; under "wgrad" every gradient the
backward propagates (dX) is plain's and only weight gradients move; under "all" the gradients are
unbiased where the backward is linear in what was saved; graph inputs, attention statistics, log-domain
tensors and integers are never compressed; dynamic shapes, NaN and budgets behave as plain.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pamm_fx import saved as saved_mod
from pamm_fx.demo.measure import saved_for_backward

D = 32


class Block(nn.Module):
    """Norm, attention through SDPA (logsumexp kept by its backward), a SiLU MLP, a log-softmax loss."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.up = nn.Linear(D, 2 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)
        self.head = nn.Linear(D, 48, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm(x)
        q, k, v = self.qkv(h).view(b, t, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D))
        x = x + self.down(F.silu(self.up(x)))
        return F.cross_entropy(self.head(x).flatten(0, 1), y.flatten())


def _model() -> Block:
    torch.manual_seed(0)
    return Block()


def _inputs(b: int = 4, t: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, t, D, generator=g), torch.randint(0, 48, (b, t), generator=g)


def _step(model: nn.Module, fn, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    loss = fn(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["x"] = x.grad.clone()
    return loss.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _compile(model: nn.Module, backend: str, **options):
    return torch.compile(model, backend=backend, options={"targets": "none", **options} if options else None)


@pytest.mark.parametrize("backend", ["pamm_aot_eager", "pamm"])
def test_wgrad_moves_only_weight_gradients(backend: str) -> None:
    """Under "wgrad" the forward and dX are plain's bit for bit (aot_eager; Inductor to rounding) and only
    parameters' gradients read a compressed tensor (the MLP's and the head's inputs here)."""
    x, y = _inputs()
    plain = _model()
    loss0, g0 = _step(plain, torch.compile(plain, backend="aot_eager" if backend == "pamm_aot_eager" else "inductor"),
                      x, y)
    model = _model()
    with saved_mod.record_choices() as partitions:
        loss1, g1 = _step(model, _compile(model, backend, saved="wgrad"), x, y)
    (choices,) = partitions
    compressed = [c for c in choices if c.compressed]
    assert compressed, choices
    others = [c.why for c in choices if not c.compressed]
    assert all(any(w in why for w in ("dX", "input", "statistics", "log-prob", "floating", "rows", "scalar", "under"))
               for why in others), others
    assert sum("dX" in why for why in others) >= 4  # q, k, v, the attention output or the MLP's up output
    if backend == "pamm_aot_eager":
        assert torch.equal(loss0, loss1) and torch.equal(g0["x"], g1["x"])
    else:
        torch.testing.assert_close(loss1, loss0)
        torch.testing.assert_close(g1["x"], g0["x"], rtol=1e-4, atol=1e-6)
    moved = [n for n in g0 if n != "x" and not torch.equal(g0[n], g1[n])]
    assert moved and all(_rel(g1[n], g0[n]) < 0.05 for n in g0), {n: _rel(g1[n], g0[n]) for n in g0}


def test_all_compresses_what_plain_keeps_and_stays_close() -> None:
    """Under "all" the saved bytes fall (a compressed fp32 tensor to 0.28x at 8 bits; this tiny model keeps its input and log-probabilities), the loss is plain's bit for
    bit, and every gradient is within a few percent."""
    x, y = _inputs()
    plain = _model()
    fn0 = torch.compile(plain, backend="aot_eager")
    loss0, g0 = _step(plain, fn0, x, y)
    model = _model()
    fn1 = _compile(model, "pamm_aot_eager", saved="all")
    loss1, g1 = _step(model, fn1, x, y)
    assert torch.equal(loss0, loss1)
    assert all(_rel(g1[n], g0[n]) < 0.05 for n in g0), {n: _rel(g1[n], g0[n]) for n in g0}
    xr = x.clone().requires_grad_(True)
    before = saved_for_backward(lambda: fn0(xr, y), plain).nbytes
    after = saved_for_backward(lambda: fn1(xr, y), model).nbytes
    assert after < 0.55 * before, (after, before)  # x, log-probabilities and statistics stay


def test_never_compressed_inputs_statistics_log_probabilities_integers() -> None:
    model = _model()
    with saved_mod.record_choices() as partitions:
        _step(model, _compile(model, "pamm_aot_eager", saved="all"), *_inputs())
    (choices,) = partitions
    by_reason = {c.why.split(" (")[0].split(":")[0].split(",")[0] for c in choices if not c.compressed}
    assert any("graph input" in r for r in by_reason)  # the weights (and their transposes) are kept as they are
    assert any("attention statistics" in r for r in by_reason)
    assert any("log-probabilities" in r for r in by_reason)
    for c in choices:
        if c.compressed:
            assert c.dtype.is_floating_point and c.bytes_after <= c.bytes_before


def test_all_is_unbiased_where_the_backward_is_linear_in_what_it_saved() -> None:
    """Two linears with a product between them: every gradient is linear in each saved tensor, so the mean of
    many steps' gradients (new rounding noise each step) tends to plain's as 1/sqrt(steps). At 2 bits the
    single-step error is large, so a bias would show."""

    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(D, 64, bias=False), nn.Linear(D, 64, bias=False)
            self.c = nn.Linear(64, 8, bias=False)

        def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return (self.c(self.a(x) * self.b(x)) * p).sum()

    torch.manual_seed(0)
    model = Bilinear()
    x, p = torch.randn(256, D), torch.randn(256, 8)
    plain = torch.compile(model, backend="aot_eager")
    _, exact = _step(model, plain, x, p)
    fn = torch.compile(model, backend="pamm_aot_eager", options={"targets": "none", "saved": "all", "saved_bits": 2})
    steps = 64
    mean = {n: torch.zeros_like(g) for n, g in exact.items()}
    single = {}
    for _ in range(steps):
        _, g = _step(model, fn, x, p)
        single = single or {n: _rel(g[n], exact[n]) for n in g}
        for n in g:
            mean[n] += g[n] / steps
    for n in exact:
        assert single[n] > 0.02, (n, single[n])  # the rounding did something
        assert _rel(mean[n], exact[n]) < 2.5 * single[n] / steps**0.5, (n, _rel(mean[n], exact[n]), single[n])


def test_dynamic_shapes_and_nan_behave_as_plain() -> None:
    model = _model()
    fn = torch.compile(model, backend="pamm_aot_eager", options={"targets": "none", "saved": "all"}, dynamic=True)
    plain = _model()
    fn0 = torch.compile(plain, backend="aot_eager", dynamic=True)
    for b, t in ((4, 32), (3, 24)):
        x, y = _inputs(b, t)
        loss0, g0 = _step(plain, fn0, x, y)
        loss1, g1 = _step(model, fn, x, y)
        assert torch.equal(loss0, loss1) and all(_rel(g1[n], g0[n]) < 0.05 for n in g0)
    x, y = _inputs()
    x[1, 3, 5] = float("nan")
    _, g0 = _step(plain, fn0, x, y)
    _, g1 = _step(model, fn, x, y)
    for n in g0:
        assert torch.equal(g0[n].isnan(), g1[n].isnan()), n


def test_inductor_with_dynamic_shapes_compresses_instead_of_falling_back(caplog) -> None:
    """Inductor deep-copies its config, our partitioner included, into every FX-graph-cache key: a record that
    held SymInts (a dynamic graph's shapes) failed that copy, and the backend fell back to the uncompressed
    graph at every dynamic compile (found by a training run whose second batch size made Dynamo go dynamic)."""
    plain, model = _model(), _model()
    fn0 = torch.compile(plain, backend="inductor", dynamic=True)
    fn1 = torch.compile(model, backend="pamm", options={"targets": "none", "saved": "all"}, dynamic=True)
    with caplog.at_level(logging.WARNING, logger="pamm_fx"), torch._inductor.config.patch(fx_graph_cache=True):
        for b, t in ((4, 32), (3, 24)):
            x, y = _inputs(b, t)
            loss0, g0 = _step(plain, fn0, x, y)
            loss1, g1 = _step(model, fn1, x, y)
            torch.testing.assert_close(loss1, loss0)
            assert all(_rel(g1[n], g0[n]) < 0.05 for n in g0), {n: _rel(g1[n], g0[n]) for n in g0}
            xr = x.clone().requires_grad_(True)
            before = saved_for_backward(lambda xr=xr, y=y: fn0(xr, y), plain).nbytes
            after = saved_for_backward(lambda xr=xr, y=y: fn1(xr, y), model).nbytes
            assert after < 0.7 * before, (b, t, after, before)  # fixed costs weigh more at the small size
    assert "failed" not in caplog.text, caplog.text[:2000]


def test_seeded_runs_repeat_and_steps_draw_new_noise() -> None:
    x, y = _inputs()
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        model = _model()
        fn = torch.compile(model, backend="pamm_aot_eager", options={"targets": "none", "saved": "all", "seed": 3})
        runs.append([_step(model, fn, x, y)[1]["up.weight"] for _ in range(2)])
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])


def test_stacks_with_a_memory_budget() -> None:
    x, y = _inputs()
    sizes = {}
    for name, options in (("plain", None), ("pamm", {"targets": "none", "saved": "all"})):
        torch._dynamo.reset()
        model = _model()
        fn = torch.compile(model, backend="aot_eager" if options is None else "pamm_aot_eager", options=options)
        with torch._functorch.config.patch(activation_memory_budget=0.5):
            _step(model, fn, x, y)
        xr = x.clone().requires_grad_(True)
        sizes[name] = saved_for_backward(lambda fn=fn, xr=xr: fn(xr, y), model).nbytes
    assert sizes["pamm"] < 0.6 * sizes["plain"], sizes


def test_forward_outputs_and_backward_inputs_keep_aotautograds_calling_convention() -> None:
    """Golden: the forward returns (outputs, saved tensors, lo/scale pairs, SymInts); the backward takes
    (SymInts, the same tensors in the same order, tangents) and decodes each right before its first use."""
    from torch._dynamo.backends.common import aot_autograd

    from pamm_fx.compiler import PammBackend
    from pamm_fx.config import resolve

    seen = {}

    def keep(name):
        def compiler(gm, example_inputs):
            seen[name] = gm
            return gm.forward
        return compiler

    def inner(gm, example_inputs, patches):
        part = patches.get("custom_partitioner_fn")
        assert part is not None, "the backend fell back to the captured graph (see the log)"
        return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"), partition_fn=part)(gm, example_inputs)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 64, bias=False), nn.SiLU(), nn.Linear(64, D, bias=False))
    backend = PammBackend(resolve({"targets": "none", "saved": "all"}), inner=inner)
    x = torch.randn(2, 64, D, requires_grad=True)
    torch._dynamo.mark_dynamic(x, 0)
    torch.compile(model, backend=backend)(x).sum().backward()
    fw_out = ", ".join(n.name for n in seen["fw"].graph.output_node().args[0])
    bw_in = ", ".join(n.name for n in seen["bw"].graph.find_nodes(op="placeholder"))
    first_uses = [n.name for n in seen["bw"].graph.nodes if n.op == "call_function"][:3]
    assertExpectedInline = __import__("expecttest").TestCase().assertExpectedInline
    assertExpectedInline(f"forward returns: {fw_out}\nbackward takes: {bw_in}\nbackward starts: {first_uses}", """\
forward returns: _unsafe_view_1, view, convert_element_type_2, convert_element_type_5, t_4, t_8, where, where_1, where_3, where_4, primals_2, mul
backward takes: primals_2, mul, view, mm_q, silu_q, t_4, t_8, mm_lo, mm_scale, silu_lo, silu_scale, tangents_1
backward starts: ['view_2', 't_2', 'sym_size_int_1']""")


def test_explain_lists_each_saved_tensor_as_the_backend_decides_it() -> None:
    """explain() runs the same partition step the backend's Inductor compile runs (no code generated): each
    kept tensor with its choice, bytes and reason, and the same choices as a real compile."""
    import pamm_fx

    x, y = _inputs()
    model = _model()
    report = pamm_fx.explain(model, x.clone().requires_grad_(True), y, targets="none", saved="all")
    (graph,) = report.graphs
    explained = {(t.name, t.compressed, t.why) for t in graph.saved}
    assert sum(t.compressed for t in graph.saved) >= 5
    text = str(report)
    assert "saved for backward (saved='all', 8 bits; dX approximate (unbiased))" in text
    assert "kept: attention statistics" in text and "compressed (of mm)" in text
    torch._dynamo.reset()
    with saved_mod.record_choices() as partitions:
        _step(model, _compile(model, "pamm", saved="all"), x, y)
    (compiled,) = partitions
    assert explained == {(c.name, c.compressed, c.why) for c in compiled}
    assert not pamm_fx.explain(model, x, y, targets="none").graphs[0].saved  # saved="exact": nothing listed
