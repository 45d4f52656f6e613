"""One plan, many readers: the backend, explain() and the test helpers share plan()/apply().

Compiles use ``pamm_aot_eager`` (our plan and rewrite, then aot_eager): the plan is what is
under test here, not Inductor.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

import pamm_fx
from pamm_fx.demo.llama import Llama, LlamaConfig
from pamm_fx.fxutil import val
from pamm_fx.passes import checks
from pamm_fx.plan import apply, plan
from pamm_fx.testing import capture_rewrites

TINY = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
OPTIONS = {"ratio": 1 / 4, "min_tokens": 1, "min_generators": 1}


def _llama() -> Llama:
    torch.manual_seed(0)
    return Llama(TINY)


def _tokens(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_explain_between_training_steps_recompiles_nothing() -> None:
    model = _llama()
    counter = CompileCounterWithBackend(pamm_fx.compiler.PammBackend(pamm_fx.PammConfig(**OPTIONS)))
    compiled = torch.compile(model, backend=counter)
    tokens = _tokens()
    compiled(tokens, tokens).backward()
    graphs = pamm_fx.counters["graphs"]
    report = pamm_fx.explain(compiled, tokens, tokens, **OPTIONS)  # the compiled model itself, mid-training
    assert len(report.groups) == TINY.n_layers
    compiled(tokens, tokens).backward()
    assert counter.frame_count == 1  # the user's graph was neither thrown away nor recompiled
    assert pamm_fx.counters["graphs"] == graphs


def test_explain_sees_the_shapes_of_a_first_compile() -> None:
    """The user's earlier compiles at other sizes (kept: no reset) do not make explain's capture dynamic."""
    model = _llama()
    for seq in (8, 12):
        torch.compile(model, backend="pamm_aot_eager", options=OPTIONS)(_tokens(seq=seq), _tokens(seq=seq))
    report = pamm_fx.explain(model, _tokens(), _tokens(), **OPTIONS)
    assert report.groups[0].x_type == "f32[2, 16, 32]"


def test_explain_reports_the_plan_the_backend_carries_out() -> None:
    model, tokens = _llama(), _tokens()
    with capture_rewrites() as records:
        torch.compile(model, backend="pamm_aot_eager", options=OPTIONS)(tokens, tokens)
    report = pamm_fx.explain(model, tokens, tokens, **OPTIONS)
    (record,) = records
    backend_groups = [[p.weight_name for p in g.projections] for g in record.plan.groups]
    assert backend_groups == [[p.weight for p in g.projections] for g in report.groups]
    assert [(r.weight_name, r.category, r.reason) for r in record.plan.rejections] == [
        (s.weight, s.category, s.reason) for s in report.skipped
    ]


def test_counters_are_dynamo_counters() -> None:
    before = dict(pamm_fx.counters)
    model, tokens = _llama(), _tokens()
    torch.compile(model, backend="pamm_aot_eager", options=OPTIONS)(tokens, tokens)
    assert pamm_fx.counters["graphs"] - before["graphs"] == 1
    assert pamm_fx.counters["groups_rewritten"] - before["groups_rewritten"] == TINY.n_layers
    assert torch._dynamo.utils.counters["pamm"]["groups_rewritten"] == pamm_fx.counters["groups_rewritten"]


class _Attention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        memory = x if memory is None else memory
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, -1, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(memory)), heads(self.v(memory)))
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.attn, x, use_reentrant=False)


def test_checkpointed_projections_are_named_with_their_reason() -> None:
    report = pamm_fx.explain(_Checkpointed(), torch.randn(2, 8, 32), **OPTIONS)
    skipped = {s.weight: s for s in report.skipped}
    assert not report.groups
    for name in ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight"):
        assert skipped[name].category == "checkpointed"
        assert "recomputes X in the backward" in skipped[name].reason


class _FrozenEncoder(nn.Module):
    """A frozen encoder run without grad feeds trainable cross-attention K/V."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(32, 32)
        self.attn = _Attention()

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            memory = self.encoder(source)
        return self.attn(x, memory)


def test_group_is_placed_in_the_grad_region_of_its_projections() -> None:
    with capture_rewrites() as records:
        torch.compile(_FrozenEncoder(), backend="pamm_aot_eager", options=OPTIONS)(
            torch.randn(2, 8, 32), torch.randn(2, 6, 32))
    (record,) = records
    assert [r.category for r in record.plan.rejections] == ["no_grad", "no_attention"]
    grad_enabled = True
    for node in record.rewritten.graph.nodes:
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            grad_enabled = node.args[0]
        if node.target in (torch.ops.pamm.compress.default, torch.ops.pamm.linear_group.default):
            assert grad_enabled, f"{node.name} runs without grad"


def test_activation_weight_is_not_a_parameter() -> None:
    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(*(F.linear(x, w).view(2, 8, 4, 8).transpose(1, 2),) * 3)

    report = pamm_fx.explain(f, torch.randn(2, 8, 32), torch.randn(32, 32, requires_grad=True), **OPTIONS)
    (skip,) = report.skipped
    assert skip.category == "not_parameter" and "not a parameter" in skip.reason


def test_check_table_names_are_the_categories() -> None:
    names = [c.name for c in checks.PROJECTION_CHECKS]
    assert len(names) == len(set(names))
    assert {"not_parameter", "no_grad", "checkpointed", "frozen", "not_target"} <= set(names)
    group_names = [c.name for c in checks.GROUP_CHECKS]
    assert len(group_names) == len(set(group_names)), "one name per rule: a category names one check"
    assert set(group_names) == {"written_between", "min_tokens", "exact_ratio", "small_rows", "all_rows_kept",
                                "saved_anyway", "attention_output"}


@pytest.mark.parametrize("dynamic", [False, True])
def test_size_checks_apply_to_static_sizes_only(dynamic: bool) -> None:
    """A static short X stays exact at plan time; a dynamic one is rewritten and the op keeps every row."""
    options = {"ratio": 1 / 4, "min_tokens": 64, "min_generators": 1}
    with capture_rewrites() as records:
        torch.compile(_llama(), backend="pamm_aot_eager", options=options, dynamic=dynamic)(_tokens(), _tokens())
    (record,) = records
    if dynamic:
        (group,) = record.plan.groups
        assert record.plan.estimate(group).dynamic
        assert record.plan.estimate(group).k == 32  # b = 32 < min_tokens: every row, decided in the op
    else:
        assert not record.plan.groups
        assert {r.category for r in record.plan.rejections} >= {"min_tokens"}


def test_rewritten_projection_outputs_follow_group_order() -> None:
    with capture_rewrites() as records:
        torch.compile(_llama(), backend="pamm_aot_eager", options=OPTIONS)(_tokens(), _tokens())
    (record,) = records
    fused = [n for n in record.rewritten.graph.nodes if n.target is torch.ops.pamm.linear_group.default]
    assert len(fused) == TINY.n_layers
    outs = [u for u in fused[0].users if u.target is operator.getitem]
    assert sorted(u.args[1] for u in outs) == list(range(len(record.plan.groups[0].projections)))


def test_rewritten_graph_takes_no_cpu_input_when_x_is_elsewhere() -> None:
    """The per-call seed lives on X's device (here "meta", standing in for a GPU without one), so a
    CUDA step has no host-to-device input and CUDA graphs can capture it."""
    placeholders = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        p = plan(gm, example_inputs, pamm_fx.PammConfig(**OPTIONS))
        assert p.groups and p.seed_device.type == "meta"
        placeholders.extend(val(n) for n in apply(p).graph.find_nodes(op="placeholder"))
        return gm.forward

    with torch.device("meta"):
        model = Llama(TINY)
        tokens = torch.zeros(2, 16, dtype=torch.long)
    torch.compile(model, backend=capture)(tokens, tokens)
    assert placeholders and all(v.device.type == "meta" for v in placeholders)
    seed = pamm_fx.seed.Source(None, torch.device("meta"), 0)()
    assert seed.device.type == "meta" and seed.dtype == torch.int64


def test_disabled_checks_are_restored_and_unknown_names_refused() -> None:
    from pamm_fx.passes import checks

    before = [c.name for c in checks.PROJECTION_CHECKS]
    with checks.disabled("lora_b"):
        assert "lora_b" not in [c.name for c in checks.PROJECTION_CHECKS]
    assert [c.name for c in checks.PROJECTION_CHECKS] == before
    with pytest.raises(ValueError, match=r"unknown pamm check\(s\) \['lora'\]; valid checks are \["):
        with checks.disabled("lora"):
            pass


def test_attention_output_is_compressed_only_under_a_memory_budget() -> None:
    """Without a budget SDPA keeps its output for its backward, so o_proj's X costs nothing extra;
    under a budget the partitioner may recompute the attention, and compressing X saves memory."""
    found: dict[float, tuple[list[str], list[str]]] = {}

    for budget in (1.0, 0.5):

        def capture(gm: torch.fx.GraphModule, example_inputs: list, budget: float = budget) -> object:
            p = plan(gm, example_inputs, pamm_fx.PammConfig(targets="attn_out", min_tokens=1, min_generators=1))
            found[budget] = ([g.site for g in p.groups],
                             [r.category for r in p.rejections if "o_proj" in r.weight_name])
            return gm.forward

        torch._dynamo.reset()
        with torch._functorch.config.patch(activation_memory_budget=budget):
            torch.compile(Llama(TINY), backend=capture)(_tokens(), _tokens())
    assert found[1.0] == ([], ["attention_output"])
    assert found[0.5] == (["attn_out"], [])
