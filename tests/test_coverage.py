"""Pattern coverage: hand-written attention layouts, projection sharing, LoRA, autocast, targets.

Golden texts come from :func:`plan`, which runs the backend's passes on Dynamo's graph
without Inductor (fast); a few layouts also run a real compile + backward at ratio 1
against plain ``torch.compile``. Update goldens with ``EXPECTTEST_ACCEPT=1``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch import nn

from pamm_fx.demo.llama import Llama, LlamaConfig
from pamm_fx.demo.measure import saved_for_backward
from pamm_fx.testing import capture_rewrites, describe_rewrites

D, HEADS, HEAD_DIM = 32, 4, 8
BSZ, SEQ = 2, 10
BASE = {"ratio": 1 / 4, "min_tokens": 1, "min_generators": 1}


def plan(model: nn.Module, *inputs: torch.Tensor, **options: object) -> str:
    return describe_rewrites(model, *inputs, **{**BASE, **options})


def heads(t: torch.Tensor, n: int = HEADS) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], n, -1).transpose(1, 2)


def merge(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def rope(t: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (bsz, heads, seq, head_dim)."""
    seq, dim = t.shape[-2], t.shape[-1]
    angles = torch.arange(seq, dtype=t.dtype)[:, None] / 10000 ** (torch.arange(0, dim, 2, dtype=t.dtype) / dim)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = dim // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin


class Shared(nn.Module):
    """Projection-sharing variants (Kayyam et al.): which of q, k, v share one projection's output.

    ``"q-k=v"``: q and one kv projection used as key and value; ``"q=k-v"``: one qk
    projection used as query and key; ``"q=k=v"``: one projection for all three.
    ``kv_heads`` < HEADS shrinks the shared k/v projection (GQA/MQA).
    """

    def __init__(self, mode: str, kv_heads: int = HEADS) -> None:
        super().__init__()
        self.mode, self.kv = mode, kv_heads
        self.norm = nn.RMSNorm(D)
        kv_dim = kv_heads * HEAD_DIM
        if mode == "q-k=v":
            self.q, self.kv_proj = nn.Linear(D, D), nn.Linear(D, kv_dim)
        elif mode == "q=k-v":
            self.qk, self.v = nn.Linear(D, D), nn.Linear(D, kv_dim)
        else:
            self.qkv = nn.Linear(D, D)
        self.o = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.mode == "q-k=v":
            q, k = heads(self.q(h)), heads(self.kv_proj(h), self.kv)
            v = k
        elif self.mode == "q=k-v":
            q = k = heads(self.qk(h))
            v = heads(self.v(h), self.kv)
        else:
            q = k = v = heads(self.qkv(h))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != HEADS)
        return x + self.o(merge(out))


class Manual(nn.Module):
    """nanoGPT-style: fused qkv as a raw parameter used with ``x @ W`` (weight stored (in, out)),
    RoPE, and ``softmax(q @ k^T) @ v`` written out with a causal mask."""

    def __init__(self) -> None:
        super().__init__()
        self.w_qkv = nn.Parameter(torch.randn(D, 3 * D) / math.sqrt(D))
        self.b_qkv = nn.Parameter(torch.zeros(3 * D))
        self.w_o = nn.Parameter(torch.randn(D, D) / math.sqrt(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (x @ self.w_qkv + self.b_qkv).chunk(3, dim=-1)
        q, k, v = rope(heads(q)), rope(heads(k)), heads(v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        att = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return x + merge(att @ v) @ self.w_o.t()


class Cross(nn.Module):
    """Cross-attention: q reads the decoder state, a fused kv projection reads the encoder output."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return x + self.o(merge(F.scaled_dot_product_attention(heads(self.q(x)), heads(k), heads(v))))


class LoRA(nn.Module):
    """A frozen base linear plus a trainable low-rank update, written by hand (as peft does)."""

    def __init__(self, n: int, m: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(n, m).requires_grad_(False)
        self.lora_a, self.lora_b = nn.Linear(n, rank, bias=False), nn.Linear(rank, m, bias=False)
        nn.init.normal_(self.lora_b.weight)  # nonzero, so lora_a gets a gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * 0.5


class LoRAAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.q, self.k, self.v = LoRA(D, D), LoRA(D, D), LoRA(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + merge(F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h))))


class Tied(nn.Module):
    """One attention block applied twice: both calls use the same q/k/v weights."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Shared("q-k=v")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.block(x))


class Autocast(nn.Module):
    """Separate q/k/v under ``torch.autocast(bfloat16)``; the norm and the loss stay float32."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)), is_causal=True)
        return x + merge(out).float()


class Plain(nn.Module):
    """A single linear and no attention at all."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def x_in(seq: int = SEQ) -> torch.Tensor:
    return torch.randn(BSZ, seq, D)


TINY = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


class TestLayoutGoldens(TestCase):
    def test_shared_q_k_equals_v(self) -> None:
        self.assertExpectedInline(plan(Shared("q-k=v"), x_in()), """\
compress(h: f32[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 32], i32[20], f32[20])
linear_group(h: f32[2, 10, 32])
  q.weight + q.bias -> f32[2, 10, 32] -> view
  kv_proj.weight + kv_proj.bias -> f32[2, 10, 32] -> view_1
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_shared_q_k_equals_v_mqa(self) -> None:
        self.assertExpectedInline(plan(Shared("q-k=v", kv_heads=1), x_in()), """\
compress(h: f32[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 32], i32[20], f32[20])
linear_group(h: f32[2, 10, 32])
  q.weight + q.bias -> f32[2, 10, 32] -> view
  kv_proj.weight + kv_proj.bias -> f32[2, 10, 8] -> view_1
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_shared_q_equals_k_v_gqa(self) -> None:
        self.assertExpectedInline(plan(Shared("q=k-v", kv_heads=2), x_in()), """\
compress(h: f32[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 32], i32[20], f32[20])
linear_group(h: f32[2, 10, 32])
  qk.weight + qk.bias -> f32[2, 10, 32] -> view
  v.weight + v.bias -> f32[2, 10, 16] -> view_1
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_single_shared_projection(self) -> None:
        self.assertExpectedInline(plan(Shared("q=k=v"), x_in()), """\
compress(h: f32[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 32], i32[20], f32[20])
linear_group(h: f32[2, 10, 32])
  qkv.weight + qkv.bias -> f32[2, 10, 32] -> view
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_manual_attention_matmul_weights_rope(self) -> None:
        self.assertExpectedInline(plan(Manual(), x_in()), """\
compress(x: f32[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 32], i32[20], f32[20])
linear_group(x: f32[2, 10, 32])
  w_qkv.T -> f32[2, 10, 96] -> add
untouched w_o: output does not feed attention (targets='qkv')""")

    def test_cross_attention_two_groups(self) -> None:
        self.assertExpectedInline(plan(Cross(), x_in(), x_in(seq=7)), """\
compress(memory: f32[2, 7, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[4, 32], i32[14], f32[14])
linear_group(memory: f32[2, 7, 32])
  kv.weight + kv.bias -> f32[2, 7, 64] -> chunk
compress(x: f32[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 32], i32[20], f32[20])
linear_group(x: f32[2, 10, 32])
  q.weight + q.bias -> f32[2, 10, 32] -> view
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_lora_adapters(self) -> None:
        self.assertExpectedInline(plan(LoRAAttention(), x_in()), """\
compress(h: f32[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 32], i32[20], f32[20])
linear_group(h: f32[2, 10, 32])
  q.lora_a.weight -> f32[2, 10, 4] -> linear_1
  k.lora_a.weight -> f32[2, 10, 4] -> linear_3
  v.lora_a.weight -> f32[2, 10, 4] -> linear_5
untouched q.base.weight: frozen weight: no weight gradient, so X is not saved for it
untouched q.lora_b.weight: a LoRA B: its X is A's r-wide output, small next to A's X, and its gradient is the adapter's update (measured in docs/benchmarks.md, LoRA)
untouched k.base.weight: frozen weight: no weight gradient, so X is not saved for it
untouched k.lora_b.weight: a LoRA B: its X is A's r-wide output, small next to A's X, and its gradient is the adapter's update (measured in docs/benchmarks.md, LoRA)
untouched v.base.weight: frozen weight: no weight gradient, so X is not saved for it
untouched v.lora_b.weight: a LoRA B: its X is A's r-wide output, small next to A's X, and its gradient is the adapter's update (measured in docs/benchmarks.md, LoRA)""")

    def test_weights_tied_across_calls(self) -> None:
        self.assertExpectedInline(plan(Tied(), x_in()), """\
compress(h: f32[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 32], i32[20], f32[20])
linear_group(h: f32[2, 10, 32])
  block.q.weight + block.q.bias -> f32[2, 10, 32] -> view
  block.kv_proj.weight + block.kv_proj.bias -> f32[2, 10, 32] -> view_1
compress(h_1: f32[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 32], i32[20], f32[20])
linear_group(h_1: f32[2, 10, 32])
  block.q.weight + block.q.bias -> f32[2, 10, 32] -> view_2
  block.kv_proj.weight + block.kv_proj.bias -> f32[2, 10, 32] -> view_3
untouched block.o.weight: output does not feed attention (targets='qkv')
untouched block.o.weight: output does not feed attention (targets='qkv')""")

    def test_autocast(self) -> None:
        self.assertExpectedInline(plan(Autocast(), x_in()), """\
compress(to: bf16[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (bf16[5, 32], i32[20], f32[20])
linear_group(h: f32[2, 10, 32])
  q.weight.to(bf16) + q.bias.to(bf16) -> bf16[2, 10, 32] -> view
  k.weight.to(bf16) + k.bias.to(bf16) -> bf16[2, 10, 32] -> view_1
  v.weight.to(bf16) + v.bias.to(bf16) -> bf16[2, 10, 32] -> view_2""")

    def test_single_linear_without_attention_is_untouched(self) -> None:
        self.assertExpectedInline(plan(Plain(), x_in()), """untouched fc.weight: output does not feed attention (targets='qkv')""")

    def test_single_linear_under_targets_all(self) -> None:
        self.assertExpectedInline(plan(Plain(), x_in(), targets="all"), """\
compress(x: f32[2, 10, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 32], i32[20], f32[20])
linear_group(x: f32[2, 10, 32])
  fc.weight + fc.bias -> f32[2, 10, 32] -> relu""")

    def test_targets_mlp(self) -> None:
        tokens = torch.randint(0, 256, (2, 16))
        self.assertExpectedInline(plan(Llama(TINY), tokens, targets="mlp"), """\
compress(rms_norm_1: f32[2, 16, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[8, 32], i32[32], f32[32])
linear_group(rms_norm_1: f32[2, 16, 32])
  layers.0.mlp.gate_proj.weight -> f32[2, 16, 64] -> silu
  layers.0.mlp.up_proj.weight -> f32[2, 16, 64] -> mul_4
compress(mul_4: f32[2, 16, 64], ratio=1/4, min_generators=1, eps=inf) -> (f32[8, 64], i32[32], f32[32])
linear_group(mul_4: f32[2, 16, 64])
  layers.0.mlp.down_proj.weight -> f32[2, 16, 32] -> x_2
untouched layers.0.self_attn.q_proj.weight: site 'qkv' is not in targets='mlp'
untouched layers.0.self_attn.k_proj.weight: site 'qkv' is not in targets='mlp'
untouched layers.0.self_attn.v_proj.weight: site 'qkv' is not in targets='mlp'
untouched layers.0.self_attn.o_proj.weight: site 'attn_out' is not in targets='mlp'
untouched lm_head.weight: site 'head' is not in targets='mlp'""")

    def test_targets_attention_output_and_head(self) -> None:
        tokens = torch.randint(0, 256, (2, 16))
        self.assertExpectedInline(plan(Llama(TINY), tokens, targets=["attn_out", "head"]), """\
compress(rms_norm_2: f32[2, 16, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[8, 32], i32[32], f32[32])
linear_group(rms_norm_2: f32[2, 16, 32])
  lm_head.weight -> f32[2, 16, 256] -> output
untouched layers.0.self_attn.q_proj.weight: site 'qkv' is not in targets=(('attn_out', None), ('head', None))
untouched layers.0.self_attn.k_proj.weight: site 'qkv' is not in targets=(('attn_out', None), ('head', None))
untouched layers.0.self_attn.v_proj.weight: site 'qkv' is not in targets=(('attn_out', None), ('head', None))
untouched layers.0.mlp.gate_proj.weight: site 'mlp_up' is not in targets=(('attn_out', None), ('head', None))
untouched layers.0.mlp.up_proj.weight: site 'mlp_up' is not in targets=(('attn_out', None), ('head', None))
untouched layers.0.mlp.down_proj.weight: site 'mlp_down' is not in targets=(('attn_out', None), ('head', None))
untouched layers.0.self_attn.o_proj.weight: X is the attention output (out) up to transposes and reshapes; the attention's backward saves it anyway, so compressing it would save no memory""")

    def test_most_specific_site_ratio_wins(self) -> None:
        tokens = torch.randint(0, 256, (2, 16))
        self.assertExpectedInline(plan(Llama(TINY), tokens, targets={"all": 1 / 2, "mlp": 1 / 4, "mlp_down": 1 / 8}),
                                  """\
compress(rms_norm: f32[2, 16, 32], ratio=1/2, min_generators=1, eps=inf) -> (f32[16, 32], i32[32], f32[32])
linear_group(rms_norm: f32[2, 16, 32])
  layers.0.self_attn.q_proj.weight -> f32[2, 16, 32] -> view
  layers.0.self_attn.k_proj.weight -> f32[2, 16, 16] -> view_1
  layers.0.self_attn.v_proj.weight -> f32[2, 16, 16] -> view_2
compress(rms_norm_1: f32[2, 16, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[8, 32], i32[32], f32[32])
linear_group(rms_norm_1: f32[2, 16, 32])
  layers.0.mlp.gate_proj.weight -> f32[2, 16, 64] -> silu
  layers.0.mlp.up_proj.weight -> f32[2, 16, 64] -> mul_4
compress(mul_4: f32[2, 16, 64], ratio=1/8, min_generators=1, eps=inf) -> (f32[4, 64], i32[32], f32[32])
linear_group(mul_4: f32[2, 16, 64])
  layers.0.mlp.down_proj.weight -> f32[2, 16, 32] -> x_2
compress(rms_norm_2: f32[2, 16, 32], ratio=1/2, min_generators=1, eps=inf) -> (f32[16, 32], i32[32], f32[32])
linear_group(rms_norm_2: f32[2, 16, 32])
  lm_head.weight -> f32[2, 16, 256] -> output
untouched layers.0.self_attn.o_proj.weight: X is the attention output (out) up to transposes and reshapes; the attention's backward saves it anyway, so compressing it would save no memory""")

    def test_targets_per_site_ratio(self) -> None:
        tokens = torch.randint(0, 256, (2, 16))
        self.assertExpectedInline(plan(Llama(TINY), tokens, targets={"qkv": 1 / 8, "all": 1 / 2}), """\
compress(rms_norm: f32[2, 16, 32], ratio=1/8, min_generators=1, eps=inf) -> (f32[4, 32], i32[32], f32[32])
linear_group(rms_norm: f32[2, 16, 32])
  layers.0.self_attn.q_proj.weight -> f32[2, 16, 32] -> view
  layers.0.self_attn.k_proj.weight -> f32[2, 16, 16] -> view_1
  layers.0.self_attn.v_proj.weight -> f32[2, 16, 16] -> view_2
compress(rms_norm_1: f32[2, 16, 32], ratio=1/2, min_generators=1, eps=inf) -> (f32[16, 32], i32[32], f32[32])
linear_group(rms_norm_1: f32[2, 16, 32])
  layers.0.mlp.gate_proj.weight -> f32[2, 16, 64] -> silu
  layers.0.mlp.up_proj.weight -> f32[2, 16, 64] -> mul_4
compress(mul_4: f32[2, 16, 64], ratio=1/2, min_generators=1, eps=inf) -> (f32[16, 64], i32[32], f32[32])
linear_group(mul_4: f32[2, 16, 64])
  layers.0.mlp.down_proj.weight -> f32[2, 16, 32] -> x_2
compress(rms_norm_2: f32[2, 16, 32], ratio=1/2, min_generators=1, eps=inf) -> (f32[16, 32], i32[32], f32[32])
linear_group(rms_norm_2: f32[2, 16, 32])
  lm_head.weight -> f32[2, 16, 256] -> output
untouched layers.0.self_attn.o_proj.weight: X is the attention output (out) up to transposes and reshapes; the attention's backward saves it anyway, so compressing it would save no memory""")


class Mixed(nn.Module):
    """Several layouts in one graph, for one exactness check: Q-K=V with MQA, manual attention
    with ``x @ W`` weights and RoPE, and LoRA adapters (cross-attention: BART in test_hf_models)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.manual, self.lora = Shared("q-k=v", kv_heads=1), Manual(), LoRAAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(self.manual(self.shared(x)))


def _grads(model: nn.Module, fn, *inputs: torch.Tensor, backend: str, **options: object):  # noqa: ANN202
    """Loss (a fixed random projection of the output), parameter gradients and bytes saved for backward."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, options=options or None)
    proj = torch.randn(fn(*inputs).shape, generator=torch.Generator().manual_seed(7))
    with capture_rewrites() as records:
        saved = saved_for_backward(lambda: (compiled(*inputs).float() * proj).sum(), model)
    saved.output.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return saved, grads, records


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    scale = expected.abs().max().item() or 1.0  # some gradients are exactly zero (k's bias in attention)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=name or None)


EXACT = {"ratio": 1, "min_tokens": 1, "min_generators": 1}


@pytest.mark.parametrize("name", ["mixed", "autocast"])
def test_ratio_one_equals_plain_compile(name: str) -> None:
    torch.manual_seed(0)
    model = Mixed() if name == "mixed" else Autocast()
    inputs = (x_in(),)
    rtol = 1e-4 if name == "mixed" else 0.0  # autocast: the same casts, products and sums as plain
    base_saved, base, _ = _grads(model, model, *inputs, backend="inductor")
    saved, got, records = _grads(model, model, *inputs, backend="pamm", **EXACT)
    # mixed: shared, manual and the LoRA A groups (LoRA B inputs stay exact: check lora_b)
    assert sum(r.summary.count("linear_group(") for r in records) == (3 if name == "mixed" else 1)
    _close(saved.output, base_saved.output, rtol)
    assert base.keys() == got.keys()
    for key, grad in base.items():
        _close(got[key], grad, rtol, key)


def test_targets_all_keeps_outputs_and_input_gradients_exact() -> None:
    """Compressed weight gradients everywhere, yet the loss and every gradient that flows through
    dX (embedding, norms) are unchanged, and the saved bytes drop more than with "qkv"."""
    torch.manual_seed(0)
    model = Llama(TINY)
    tokens = torch.randint(0, 256, (3, 41), generator=torch.Generator().manual_seed(1))
    fn = lambda: model(tokens[:, :-1], tokens[:, 1:])  # noqa: E731
    runs = {}
    for targets in ("qkv", "all"):
        torch._dynamo.reset()
        options = {"ratio": 1 / 8, "min_tokens": 1, "min_generators": 1, "seed": 0, "targets": targets}
        compiled = torch.compile(model, backend="pamm", options=options)
        saved = saved_for_backward(lambda c=compiled: c(tokens[:, :-1], tokens[:, 1:]), model)
        saved.output.backward()
        runs[targets] = saved, {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    expected = fn()
    expected.backward()
    for targets, (saved, grads) in runs.items():
        _close(saved.output, expected.detach(), 1e-4)
        for name, p in model.named_parameters():
            if "proj" not in name and "lm_head" not in name:
                _close(grads[name], p.grad, 1e-4, f"{targets}: {name}")
    assert runs["all"][0].nbytes < runs["qkv"][0].nbytes


def test_dynamic_batch_does_not_recompile() -> None:
    torch.manual_seed(0)
    model = Shared("q=k-v", kv_heads=2)
    compiled = torch.compile(model, backend="pamm", dynamic=True, options={"ratio": 1 / 8, "min_tokens": 1, "min_generators": 16})
    torch._dynamo.reset()
    with capture_rewrites() as records:
        counts = []
        for batch in (2, 5, 9):
            compiled(torch.randn(batch, SEQ, D)).sum().backward()
            counts.append(len(records))
    assert counts[1:] == [counts[0]] * 2, counts
    assert "compress(h: f32[s" in records[-1].summary, records[-1].summary


@pytest.mark.gpu
def test_flex_attention_group() -> None:
    """flex_attention has no CPU backward in torch, so training with it (and this test) needs CUDA."""
    from torch.nn.attention.flex_attention import flex_attention

    class Flex(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.qkv = nn.RMSNorm(D), nn.Linear(D, 3 * D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = (heads(t) for t in self.qkv(self.norm(x)).chunk(3, dim=-1))
            return merge(flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: torch.where(qi >= ki, s, -1e9)))

    text = plan(Flex().cuda(), x_in().cuda())
    assert "linear_group(" in text and "qkv.weight + qkv.bias -> f32[2, 10, 96] -> chunk" in text, text
