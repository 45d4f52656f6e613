"""Golden rewrites: what the backend does to each attention layout, as reviewable text.

Update after an intended change with ``EXPECTTEST_ACCEPT=1 pytest tests/test_golden.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch import nn

from pamm_fx.config import defaults
from pamm_fx.testing import RewriteRecord, capture_rewrites, describe, describe_rewrites

D, HEADS, HEAD_DIM = 24, 4, 6
OPTIONS = {"ratio": 1 / 4, "min_tokens": 1, "min_generators": 1}


class Separate(nn.Module):
    """q/k/v as three nn.Linear; kv_heads < heads gives GQA (1 gives MQA)."""

    def __init__(self, kv_heads: int = HEADS, bias: bool = False) -> None:
        super().__init__()
        self.kv = kv_heads
        self.norm = nn.RMSNorm(D)
        self.q = nn.Linear(D, D, bias=bias)
        self.k = nn.Linear(D, kv_heads * HEAD_DIM, bias=bias)
        self.v = nn.Linear(D, kv_heads * HEAD_DIM, bias=bias)
        self.o = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(bsz, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(h).view(bsz, seq, self.kv, HEAD_DIM).transpose(1, 2)
        v = self.v(h).view(bsz, seq, self.kv, HEAD_DIM).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != HEADS)
        return x + self.o(out.transpose(1, 2).reshape(bsz, seq, D))


class Fused(nn.Module):
    """One qkv nn.Linear; ``mode`` picks how its output is cut into q, k, v."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.norm = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.o = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        qkv = self.qkv(self.norm(x))
        if self.mode == "chunk":
            q, k, v = (t.view(bsz, seq, HEADS, HEAD_DIM).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        elif self.mode == "split":
            q, k, v = (t.view(bsz, seq, HEADS, HEAD_DIM).transpose(1, 2) for t in qkv.split(D, dim=-1))
        else:
            q, k, v = qkv.view(bsz, seq, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(out.transpose(1, 2).reshape(bsz, seq, D))


class SwiGLUBlock(nn.Module):
    """``Separate`` attention, then a SwiGLU MLP: q/k/v, o, gate + up (one X), down."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = Separate()
        self.norm = nn.RMSNorm(D)
        self.gate = nn.Linear(D, 2 * D, bias=False)
        self.up = nn.Linear(D, 2 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x)
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rewrite_of(model: nn.Module) -> str:
    x = torch.randn(2, 10, D, requires_grad=True)
    with capture_rewrites() as records:
        torch.compile(model, backend="pamm", options=OPTIONS)(x).sum().backward()
    assert len(records) == 1
    return records[0].summary


class TestGoldenRewrites(TestCase):
    def setUp(self) -> None:
        torch._dynamo.reset()

    def test_separate_mha(self) -> None:
        self.assertExpectedInline(rewrite_of(Separate()), """\
compress(h: f32[2, 10, 24], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 24], i32[20], f32[20])
linear_group(h: f32[2, 10, 24])
  q.weight -> f32[2, 10, 24] -> view
  k.weight -> f32[2, 10, 24] -> view_1
  v.weight -> f32[2, 10, 24] -> view_2
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_separate_gqa_bias(self) -> None:
        self.assertExpectedInline(rewrite_of(Separate(kv_heads=2, bias=True)), """\
compress(h: f32[2, 10, 24], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 24], i32[20], f32[20])
linear_group(h: f32[2, 10, 24])
  q.weight + q.bias -> f32[2, 10, 24] -> view
  k.weight + k.bias -> f32[2, 10, 12] -> view_1
  v.weight + v.bias -> f32[2, 10, 12] -> view_2
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_separate_mqa(self) -> None:
        self.assertExpectedInline(rewrite_of(Separate(kv_heads=1)), """\
compress(h: f32[2, 10, 24], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 24], i32[20], f32[20])
linear_group(h: f32[2, 10, 24])
  q.weight -> f32[2, 10, 24] -> view
  k.weight -> f32[2, 10, 6] -> view_1
  v.weight -> f32[2, 10, 6] -> view_2
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_fused_chunk(self) -> None:
        self.assertExpectedInline(rewrite_of(Fused("chunk")), """\
compress(layer_norm: f32[2, 10, 24], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 24], i32[20], f32[20])
linear_group(layer_norm: f32[2, 10, 24])
  qkv.weight + qkv.bias -> f32[2, 10, 72] -> chunk
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_fused_split(self) -> None:
        self.assertExpectedInline(rewrite_of(Fused("split")), """\
compress(layer_norm: f32[2, 10, 24], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 24], i32[20], f32[20])
linear_group(layer_norm: f32[2, 10, 24])
  qkv.weight + qkv.bias -> f32[2, 10, 72] -> split
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_fused_view_unbind(self) -> None:
        self.assertExpectedInline(rewrite_of(Fused("unbind")), """\
compress(layer_norm: f32[2, 10, 24], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 24], i32[20], f32[20])
linear_group(layer_norm: f32[2, 10, 24])
  qkv.weight + qkv.bias -> f32[2, 10, 72] -> view
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_frozen_weights_are_left_alone(self) -> None:
        model = Separate()
        model.k.weight.requires_grad_(False)
        model.v.weight.requires_grad_(False)
        self.assertExpectedInline(rewrite_of(model), """\
compress(h: f32[2, 10, 24], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 24], i32[20], f32[20])
linear_group(h: f32[2, 10, 24])
  q.weight -> f32[2, 10, 24] -> view
untouched k.weight: frozen weight: no weight gradient, so X is not saved for it
untouched v.weight: frozen weight: no weight gradient, so X is not saved for it
untouched o.weight: output does not feed attention (targets='qkv')""")

    def test_golden_text_does_not_depend_on_node_numbering(self) -> None:
        """A torch release that numbers FX nodes otherwise (``view_1`` -> ``view_6``) prints the same text."""
        with capture_rewrites() as records:
            torch.compile(Separate(), backend="pamm", options=OPTIONS)(torch.randn(2, 10, D))
        (record,) = records
        text = describe(RewriteRecord(record.plan, record.rewritten))
        renamed = 0
        for node in record.rewritten.graph.nodes:
            if node.name.startswith("view"):
                node.name = f"view_{5 + renamed}"
                renamed += 1
        assert renamed == 3 and "view_5" not in text
        self.assertEqual(describe(RewriteRecord(record.plan, record.rewritten)), text)

    def test_describe_rewrites_takes_options_as_the_backend_does(self) -> None:
        """config.defaults and PAMM_* variables count in the test helpers too (resolve(), not from_options)."""
        x = torch.randn(2, 10, D)
        with defaults.patch(ratio="1/2", min_tokens=1, min_generators=1):
            text = describe_rewrites(Separate(), x)
        assert text.startswith("compress(h: f32[2, 10, 24], ratio=1/2, min_generators=1, eps=inf)"), text

    def test_per_site_estimators_pamm_at_qkv_sr_in_the_mlp(self) -> None:
        """estimator={"qkv": "pamm", "all": "sr"} (what "auto" means): q/k/v get compress + linear_group, the
        MLP's groups no compress at all, only X quantized at 8 bits (no base) and a linear_group reading it."""
        options = {**OPTIONS, "targets": "all", "estimator": {"qkv": "pamm", "all": "sr"}}
        self.assertExpectedInline(describe_rewrites(SwiGLUBlock(), torch.randn(2, 10, D), **options), """\
compress(h: f32[2, 10, 24], ratio=1/4, min_generators=1, eps=inf) -> (f32[5, 24], i32[20], f32[20])
linear_group(h: f32[2, 10, 24])
  attn.q.weight -> f32[2, 10, 24] -> view
  attn.k.weight -> f32[2, 10, 24] -> view_1
  attn.v.weight -> f32[2, 10, 24] -> view_2
quantize(h_1: f32[2, 10, 24], bits=8, no base) -> (u8[20, 24], f32[20], f32[20])
linear_group(h_1: f32[2, 10, 24], X at 8 bits)
  gate.weight -> f32[2, 10, 48] -> silu
  up.weight -> f32[2, 10, 48] -> mul
quantize(mul: f32[2, 10, 48], bits=8, no base) -> (u8[20, 48], f32[20], f32[20])
linear_group(mul: f32[2, 10, 48], X at 8 bits)
  down.weight -> f32[2, 10, 24] -> add
untouched attn.o.weight: X is the attention output (out) up to transposes and reshapes; the attention's backward saves it anyway, so compressing it would save no memory""")
