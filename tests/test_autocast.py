"""Autocast: a group computes exactly what plain's autocast computes, for every dtype pairing (issue 24, item 1).

Under ``torch.autocast`` a linear casts X, its weight and its bias to autocast's dtype, whatever they are: a
bf16 X read by float32 weights (an MLP's down projection reads ``act(up(x))``, which autocast made bf16; an
attention output projection; bf16 inputs) used to reach ``F.linear(x_bf16, w_fp32)`` inside the group and fail.
The model below has every such reader: q/k/v of the input, ``o`` of the attention output, ``up`` of ``o``'s bf16
output, ``down`` of ``gelu(up)``, and ``tail`` inside ``torch.autocast(enabled=False)``; optionally the MLP in a
nested float16 region. At ratio 1 every output and gradient must equal plain's bit for bit, in plain's dtypes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import Tensor, nn

import pamm_fx
from pamm_fx.testing import describe_rewrites

D, HEADS = 16, 2
ALL = {"targets": "all", "min_tokens": 1, "min_generators": 1, "seed": 0}


class Net(nn.Module):
    """Every linear reads an autocast output or the (maybe bf16/f16) input; ``tail`` runs with autocast off."""

    def __init__(self, inside: bool, nested: bool) -> None:
        super().__init__()
        self.inside, self.nested = inside, nested
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D, bias=False)
        self.tail = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.inside else contextlib.nullcontext():
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, HEADS, D // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))
            h = self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, D))
            with torch.autocast("cpu", dtype=torch.float16) if self.nested else contextlib.nullcontext():
                h = self.down(F.gelu(self.up(h)))
            with torch.autocast("cpu", enabled=False):
                return self.tail(h.to(self.tail.weight.dtype))


#: (x dtype, parameter dtype, autocast entered inside forward or around the compiled call, nested f16 MLP)
CASES = {
    "f32_x": (torch.float32, torch.float32, True, False),
    "bf16_x": (torch.bfloat16, torch.float32, False, False),
    "f16_x_nested": (torch.float16, torch.float32, True, True),
    "bf16_weights_nested": (torch.float32, torch.bfloat16, False, True),
}


def _run(model: Net, x: Tensor, backend: str, **options: object) -> tuple[dict[str, Tensor | None], int]:
    """Output, dX and every parameter gradient of one compiled step, and the groups the backend rewrote."""
    torch._dynamo.reset()
    before = pamm_fx.counters["groups_rewritten"]
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    compiled = torch.compile(model, backend=backend, options=options or None)
    with contextlib.nullcontext() if model.inside else torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    result = {"out": out.detach(), "dx": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return result, pamm_fx.counters["groups_rewritten"] - before


def _case(name: str) -> tuple[Net, Tensor]:
    x_dtype, p_dtype, inside, nested = CASES[name]
    torch.manual_seed(0)
    model = Net(inside, nested).to(p_dtype)
    return model, torch.randn(2, 16, D).to(x_dtype)


def _assert_same(got: dict[str, Tensor | None], expected: dict[str, Tensor | None], names: list[str]) -> None:
    for key in names:
        g, e = got[key], expected[key]
        assert g.dtype == e.dtype, f"{key}: {g.dtype}, plain {e.dtype}"
        assert torch.equal(g, e), f"{key}: max abs difference {(g.double() - e.double()).abs().max().item():.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_autocast_ratio_one_is_plain_bitwise(name: str) -> None:
    """Every group (q/k/v of a bf16/f16 or float32 input, o of the attention output, up of o's bf16 output, down
    of a bf16/f16 activation, tail with autocast off) at ratio 1 gives plain's output and gradients bit for bit,
    in plain's dtypes, under aot_eager (each op as eager runs it)."""
    model, x = _case(name)
    with torch._functorch.config.patch(activation_memory_budget=0.5):  # o's X is then not saved anyway
        expected, _ = _run(model, x, "aot_eager")
        got, groups = _run(model, x, "pamm_aot_eager", ratio=1, **ALL)
    assert groups == 5, groups  # qkv, o, up, down, tail
    _assert_same(got, expected, list(expected))


class QKV(nn.Module):
    """q/k/v of a float32 X under autocast: each linear casts X to bf16 itself."""

    inside = True  # autocast is entered in forward (what _run reads)

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, HEADS, D // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))
            return F.scaled_dot_product_attention(q, k, v).float()


def test_autocast_dx_sums_members_in_x_dtype() -> None:
    """dX of a float32 X read by three bf16 linears: autograd sums the three bf16 products after each cast back
    to float32; a group that summed them in bf16 (then cast once) rounds differently."""
    torch.manual_seed(0)
    model = QKV()
    x = torch.randn(2, 16, D)
    expected, _ = _run(model, x, "aot_eager")
    got, groups = _run(model, x, "pamm_aot_eager", ratio=1, min_tokens=1, min_generators=1)
    assert groups == 1, groups
    _assert_same(got, expected, list(expected))


def test_autocast_bf16_x_under_inductor() -> None:
    """The failing case of issue 24 (q/k/v and down read a bf16 X with float32 weights) through Inductor: ratio 1
    gives plain's compile bit for bit (the same casts, products and sums of dX contributions, in plain's order)."""
    model, x = _case("bf16_x")
    expected, _ = _run(model, x, "inductor")
    got, groups = _run(model, x, "pamm", ratio=1, **ALL)
    assert groups == 4, groups  # o stays exact: its X is the attention output, which SDPA's backward saves
    _assert_same(got, expected, list(expected))


@pytest.mark.parametrize("estimator", ["pamm", "pamm_sr", "sr"])
def test_autocast_compressed_estimators(estimator: str) -> None:
    """Compressed, every estimator: outputs, dX and bias gradients are plain's bit for bit, and each weight
    gradient has plain's dtype and points where plain's does (sr at 8 bits: almost exactly)."""
    model, x = _case("f16_x_nested")
    with torch._functorch.config.patch(activation_memory_budget=0.5):
        expected, _ = _run(model, x, "aot_eager")
        got, groups = _run(model, x, "pamm_aot_eager", ratio=1 / 4, estimator=estimator, **ALL)
    assert groups == 5, groups
    _assert_same(got, expected, ["out", "dx"] + [k for k in expected if k.endswith("bias")])
    floor = 0.99 if estimator == "sr" else 0.3
    for key in (k for k in expected if k.endswith("weight")):
        g, e = got[key], expected[key]
        assert g.dtype == e.dtype, key
        cos = F.cosine_similarity(g.double().flatten(), e.double().flatten(), dim=0).item()
        assert cos > floor, f"{key}: cosine {cos:.3f} with plain's gradient"


def test_autocast_rewrite_casts_only_what_autocast_casts() -> None:
    """The rewrite of a bf16 input under autocast: q/k/v's X is not cast (it is bf16 already), their float32
    weights and biases are; o and up read bf16 outputs; down's X is gelu's bf16; tail (autocast off) casts
    nothing. Every group's linear_group gets X as it is and returns bf16 outputs."""
    model, x = _case("bf16_x")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch._functorch.config.patch(activation_memory_budget=0.5):
        text = describe_rewrites(model, x, ratio=1 / 4, **ALL)
    assert_expected_inline(text, """\
compress(x: bf16[2, 16, 16], ratio=1/4, min_generators=1, eps=inf) -> (bf16[8, 16], i32[32], f32[32])
linear_group(x: bf16[2, 16, 16])
  q.weight.to(bf16) + q.bias.to(bf16) -> bf16[2, 16, 16] -> view
  k.weight.to(bf16) + k.bias.to(bf16) -> bf16[2, 16, 16] -> view_1
  v.weight.to(bf16) + v.bias.to(bf16) -> bf16[2, 16, 16] -> view_2
compress(reshape: bf16[2, 16, 16], ratio=1/4, min_generators=1, eps=inf) -> (bf16[8, 16], i32[32], f32[32])
linear_group(reshape: bf16[2, 16, 16])
  o.weight.to(bf16) + o.bias.to(bf16) -> bf16[2, 16, 16] -> detach_2, linear_group_default_2
compress(getitem_9: bf16[2, 16, 16], ratio=1/4, min_generators=1, eps=inf) -> (bf16[8, 16], i32[32], f32[32])
linear_group(getitem_9: bf16[2, 16, 16])
  up.weight.to(bf16) + up.bias.to(bf16) -> bf16[2, 16, 32] -> gelu
compress(gelu: bf16[2, 16, 32], ratio=1/4, min_generators=1, eps=inf) -> (bf16[8, 32], i32[32], f32[32])
linear_group(gelu: bf16[2, 16, 32])
  down.weight.to(bf16) -> bf16[2, 16, 16] -> to_11
compress(to_11: f32[2, 16, 16], ratio=1/4, min_generators=1, eps=inf) -> (f32[8, 16], i32[32], f32[32])
linear_group(to_11: f32[2, 16, 16])
  tail.weight + tail.bias -> f32[2, 16, 16] -> output""")
