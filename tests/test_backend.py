"""End to end: torch.compile(model, backend="pamm") against plain torch.compile on a LLaMA-style model.

Compiled results are cached per module (Inductor on 2 CPU cores is slow); each
test reads the runs it needs.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
import textwrap

import pytest
import torch

import pamm_fx
from pamm_fx.demo.llama import Llama, LlamaConfig
from pamm_fx.demo.measure import saved_for_backward
from pamm_fx.testing import capture_rewrites

BATCH, SEQ = 3, 40  # b = 120 rows: no activation shares a shape with a parameter
GQA = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=80, max_seq_len=64)
FUSED_MHA_BIAS = dataclasses.replace(GQA, n_kv_heads=4, fused_qkv=True, qkv_bias=True)
PROJ = ("q_proj", "k_proj", "v_proj", "qkv_proj")


@dataclasses.dataclass
class Run:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    saved: object
    compressions: list[tuple[torch.Tensor, ...]]
    summaries: list[str]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _model(cfg: LlamaConfig) -> Llama:
    torch.manual_seed(0)
    return Llama(cfg)


@functools.cache
def run(cfg: LlamaConfig, backend: str, ratio: float | None = None) -> Run:
    """One forward/backward of a fresh seeded model; records saved tensors and the compressions used."""
    torch._dynamo.reset()
    model = _model(cfg)
    options = None if backend == "inductor" else {"ratio": ratio, "min_tokens": 1, "min_generators": 1, "seed": 3}
    compiled = torch.compile(model, backend=backend, options=options)
    tokens, targets = _inputs()
    with capture_rewrites() as records, pamm_fx.ops.record_compressions() as compressions:
        saved = saved_for_backward(lambda: compiled(tokens, targets), model)
    saved.output.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return Run(saved.output.detach(), grads, saved, compressions, [r.summary for r in records])


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("cfg", [GQA, FUSED_MHA_BIAS], ids=["separate-gqa", "fused-mha-bias"])
def test_ratio_one_equals_plain_compile(cfg):
    base, pamm = run(cfg, "inductor"), run(cfg, "pamm", 1.0)
    assert len(pamm.summaries) == 1 and pamm.summaries[0].count("linear_group") == cfg.n_layers
    _close(pamm.loss, base.loss)
    for name, grad in base.grads.items():
        _close(pamm.grads[name], grad)


@pytest.mark.parametrize("cfg", [GQA, FUSED_MHA_BIAS], ids=["separate-gqa", "fused-mha-bias"])
def test_compressed_run_matches_reference_pamm(cfg):
    # pamm_aot_eager runs pamm::compress eagerly, so its C, f, alpha are recorded; Inductor compiles the
    # op's decomposition, which must draw and assign exactly the same (same seed, same compile id salt).
    base, pamm = run(cfg, "inductor"), run(cfg, "pamm_aot_eager", 1 / 8)
    inductor_pamm = run(cfg, "pamm", 1 / 8)
    _close(inductor_pamm.loss, pamm.loss)
    for name, grad in pamm.grads.items():
        _close(inductor_pamm.grads[name], grad)
    _close(pamm.loss, base.loss)
    for name, grad in base.grads.items():
        if not any(p in name for p in PROJ):
            _close(pamm.grads[name], grad)  # embedding grads carry dX of every layer
        elif name.endswith("bias"):
            _close(pamm.grads[name], grad)

    # Reference PAMM in eager, from the same C, f, alpha the compiled run used.
    model = _model(cfg)
    dys: dict[str, torch.Tensor] = {}

    def keep_grad(name: str, output: torch.Tensor) -> None:
        output.register_hook(lambda g: dys.__setitem__(name, g))

    for name, mod in model.named_modules():
        if name.split(".")[-1] in PROJ:
            mod.register_forward_hook(lambda m, i, o, name=name: keep_grad(name, o))
    model(*_inputs()).backward()
    assert len(pamm.compressions) == cfg.n_layers
    for layer, (x, c, f, alpha) in enumerate(pamm.compressions):
        assert c.shape[0] == -(-x.shape[0] // 8)
        x_tilde = alpha[:, None] * c[f.long()]
        for name, dy in dys.items():
            if name.startswith(f"layers.{layer}."):
                expected = dy.reshape(-1, dy.shape[-1]).T @ x_tilde
                _close(pamm.grads[f"{name}.weight"], expected)
                exact = base.grads[f"{name}.weight"]
                assert not torch.allclose(pamm.grads[f"{name}.weight"], exact, rtol=1e-3, atol=1e-6)


def test_saved_bytes_drop_by_the_qkv_inputs():
    base, pamm = run(GQA, "inductor"), run(GQA, "pamm", 1 / 8)
    b, n = BATCH * SEQ, GQA.dim
    k = -(-b // 8)
    x_bytes, compressed = b * n * 4, k * n * 4 + b * 4 + b * 4
    drop = base.saved.nbytes - pamm.saved.nbytes
    assert drop >= GQA.n_layers * (x_bytes - compressed), (base.saved.tensors, pamm.saved.tensors)
    params = {tuple(p.shape) for p in _model(GQA).parameters()}
    qkv_out = GQA.dim + 2 * GQA.dim * GQA.n_kv_heads // GQA.n_heads
    forbidden = params | {(qkv_out, n), (n, qkv_out)}
    assert not forbidden & set(pamm.saved.shapes()), pamm.saved.tensors
    assert pamm.saved.shapes().count((k, n)) == GQA.n_layers


def test_inference_graph_is_left_to_inductor():
    model = _model(GQA)
    tokens, _ = _inputs()
    with torch.no_grad(), capture_rewrites() as records:
        out = torch.compile(model, backend="pamm", options={"min_tokens": 1, "min_generators": 16})(tokens)
    assert len(records) == 1 and records[0].rewritten is None and out.shape == (BATCH, SEQ, 256)


def test_dynamic_sequence_length_does_not_recompile():
    model = _model(GQA)
    compiled = torch.compile(model, backend="pamm", dynamic=True, options={"ratio": 1 / 8, "min_tokens": 1, "min_generators": 16})
    with capture_rewrites() as records:
        counts = []
        for seq in (24, 40, 56):
            tokens = torch.randint(0, 256, (2, seq))
            compiled(tokens, tokens).backward()
            counts.append(len(records))
    # Dynamo may restart its first analysis (one more capture); later lengths reuse the graph.
    assert counts[0] >= 1 and counts[1:] == [counts[0]] * 2
    first = records[-1].summary.splitlines()[0]
    assert first.startswith("compress(rms_norm: f32[s"), first
    assert "((s" in first and "+ 7)//8)" in first, first  # k = ceil(b/8) on SymInts


SEEDED_RUN = textwrap.dedent(
    """
    import hashlib, torch
    from pamm_fx.demo.llama import Llama, LlamaConfig
    torch.set_num_threads(1)  # Inductor's CPU embedding backward adds atomically across threads
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = torch.compile(model, backend="pamm", options={"ratio": 1 / 16, "min_tokens": 1, "min_generators": 16, "seed": 5})
    for _ in range(3):
        tokens = torch.randint(0, 256, (2, 33))
        step(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    print(hashlib.sha256(b"".join(bytes(p.detach().view(torch.uint8).flatten().tolist()) for p in model.parameters())).hexdigest())
    """
)


def test_seeded_training_is_bitwise_identical_across_processes():
    digests = [
        subprocess.run([sys.executable, "-c", SEEDED_RUN], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert digests[0] == digests[1] and len(digests[0].strip()) == 64


def test_entry_point_registers_the_backend():
    assert "pamm" in torch._dynamo.list_backends(exclude_tags=())
    assert pamm_fx.counters["graphs"] >= 1


class BreakBeforeProjections(torch.nn.Module):
    """A graph break right after the norm: in the second graph X is a placeholder."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(16)
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        torch._dynamo.graph_break()
        q, k, v = (p(h).view(2, 12, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 12, 16)


def test_group_whose_input_is_a_graph_input_is_rewritten():
    torch.manual_seed(0)
    model, x, proj = BreakBeforeProjections(), torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    expected = torch.autograd.grad((model(x) * proj).sum(), list(model.parameters()))
    fallbacks = pamm_fx.counters["fallbacks"]
    with capture_rewrites() as records:
        out = torch.compile(model, backend="pamm", options={"ratio": 1, "min_tokens": 1, "min_generators": 16})(x)
    got = torch.autograd.grad((out * proj).sum(), list(model.parameters()))
    assert pamm_fx.counters["fallbacks"] == fallbacks
    assert [r.rewritten is not None for r in records] == [False, True]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)  # k's bias has an exactly-zero gradient
