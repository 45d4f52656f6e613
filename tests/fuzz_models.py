"""Seeded random small transformer-like models for the differential fuzzer (``tests/test_fuzz.py``).

Not a test module. :func:`random_spec` turns a seed into a :class:`ModelSpec` (layouts, grad-mode
and autocast islands, graph breaks, tied/frozen weights, a sequence of input shapes, the backend
options; and, drawn from a second stream so that older seeds keep their cases: writes to X between
projections, detached and unused projections, dropout, non-finite inputs, float64,
``nn.MultiheadAttention`` blocks; and from a third: the whole step under bf16 autocast (every linear then
reads an autocast output, optionally a bf16 input), a plain compile of the model before pamm's, repeated
``explain()`` calls mid-training, a forward with Python-side state), :func:`build` into an ``nn.Module``,
:func:`make_inputs` into the inputs of each call.
Every linear whose weight is a parameter goes through :class:`Proj`, which, inside
:func:`recording`, logs the X it read and the gradient of its output (dY) in eager mode, so that
the fuzzer can recompute a PAMM weight gradient from a recorded compression.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIM, HEADS, HEAD_DIM, VOCAB, MEM_SEQ = 16, 4, 4, 8, 6

QKV_ROLES = frozenset({"q", "k", "v", "qkv", "kv"})
MLP_ROLES = frozenset({"up", "down"})
ALL_ROLES = QKV_ROLES | MLP_ROLES | {"o", "extra", "head", "enc"}
#: How a projection is called: plainly, in ``no_grad``, in ``enable_grad`` nested in ``no_grad``,
#: on a detached X, or in a bf16 autocast island.
MODES = ("grad", "no_grad", "enable_grad", "detach", "autocast")


def allowed_roles(targets: str | tuple[str, ...]) -> frozenset[str]:
    """The projection roles a ``targets`` option lets the backend compress."""
    names = {targets} if isinstance(targets, str) else set(targets)
    if "all" in names:
        return ALL_ROLES
    return (QKV_ROLES if "qkv" in names else frozenset()) | (MLP_ROLES if "mlp" in names else frozenset())


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One attention block. ``modes``: one entry of :data:`MODES` per Q/K/V projection module, in order."""

    kv_heads: int  # 4: MHA, 2: GQA, 1: MQA
    fused: bool  # one qkv projection (self-attention) or one kv projection (cross-attention)
    kv_shared: bool  # one projection serves as both K and V (Q-K=V variant)
    cross: bool  # K/V read the model's memory instead of the block's normed input
    bias: bool
    matmul: bool  # ``x @ W.T + b`` instead of ``F.linear``
    modes: tuple[str, ...]
    attention: str  # "sdpa", "sdpa_causal" or "manual" (softmax between two matmuls)
    split: str  # how a fused qkv output is cut: "split" or "chunk"
    autocast_block: bool  # projections and attention in one bf16 autocast region
    extra: str  # another consumer of the normed X: "none", "linear" (trainable, no attention) or "residual"
    parallel_mlp: bool  # GPT-J: the MLP's up projection reads the same normed X as Q/K/V
    seq_mlp: bool  # a pre-norm MLP after the attention
    graph_break: str  # "none", "after_norm" or "after_attention"
    act_weight: str  # "none"; "param" or "arg": Q += F.linear(X, w) with w an activation requiring grad
    #: a write to X (the normed input) after the first projection read it: "data" (``X.data[...] = 0``),
    #: "inplace" (``X[...] = 0``: plain autograd refuses the program) or "before" (in place, before every projection)
    write: str = "none"
    detach_last: bool = False  # the block's last Q/K/V projection's output is detached (its weight gets no grad)
    unused: bool = False  # a trainable projection of X whose output is never used
    dropout: float = 0.0  # dropout on the attention output and in the MLPs (an MHA block: MHA's own dropout)
    #: an ``nn.MultiheadAttention`` instead of the Q/K/V/O projections: "self", "cross" (K/V read the memory,
    #: or X without one) or "kdim" (K/V read 12 features: separate q/k/v_proj_weight)
    mha: str = "none"
    mha_batch_first: bool = True
    mha_weights: bool = False  # need_weights=True (the explicit softmax path)
    mha_padding: bool = False  # a key_padding_mask hiding the last key

    def projections(self) -> tuple[str, ...]:
        if self.mha != "none":
            return ("mha",)
        if self.fused:
            return ("q", "kv") if self.cross else ("qkv",)
        return ("q", "k") if self.kv_shared else ("q", "k", "v")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    seed: int
    blocks: tuple[BlockSpec, ...]
    repeat: int  # the block stack runs this many times (ALBERT-style weights shared across layers)
    tie_qk: bool  # K's weight is Q's (separate MHA self-attention blocks)
    frozen: tuple[str, ...]  # roles whose weights are frozen (requires_grad=False)
    memory: str  # "none", "frozen" (a frozen encoder under no_grad makes it) or "trainable"
    shapes: tuple[tuple[int, int], ...]  # (batch, seq) of each call, in order
    dynamic: str  # "auto" (automatic dynamic shapes), "true" (dynamic=True) or "mark" (mark_dynamic)
    ratio: float
    min_tokens: int
    min_generators: int
    targets: str | tuple[str, ...]
    backend: str  # the plain backend; pamm runs with its twin ("eager" / "pamm_aot_eager", "inductor" / "pamm")
    nonfinite: str = "none"  # "nan" or "inf": one entry of the first call's x
    dtype: str = "float32"  # or "float64": the model and its inputs
    seed_none: bool = False  # options seed=None: PAMM must not touch the user's generator
    #: issue 24: "model" runs every call under bf16 autocast (around the compiled call: MLP down projections,
    #: output projections and the head read bf16 autocast outputs), "bf16_x" also feeds x (and mem) in bf16
    amp: str = "none"
    plain_first: bool = False  # a plain compile of the model runs one step before pamm compiles it
    explains: int = 0  # explain() calls before the second call (the first with one call)
    python_state: bool = False  # the forward bumps a call counter and caches its output in a dict

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def dropout(self) -> bool:
        return any(b.dropout > 0 for b in self.blocks)

    @property
    def weight_arg(self) -> bool:
        return any(b.act_weight == "arg" for b in self.blocks)

    @property
    def varying_dim(self) -> int:
        """The input dimension whose size changes from call to call (batch 0 or sequence 1)."""
        return 0 if len({batch for batch, _ in self.shapes}) > 1 or len(set(self.shapes)) == 1 else 1

    @property
    def autocast(self) -> bool:
        return self.amp != "none" or any(b.autocast_block or "autocast" in b.modes for b in self.blocks)

    @property
    def options(self) -> dict[str, object]:
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {"ratio": self.ratio, "min_tokens": self.min_tokens, "min_generators": self.min_generators,
                "targets": targets, "seed": None if self.seed_none else self.seed}

    @property
    def pamm_backend(self) -> str:
        return "pamm" if self.backend == "inductor" else "pamm_aot_eager"

    def describe(self) -> str:
        """Everything that defines the case, one line per part: enough to rebuild it by hand."""
        lines = [
            f"fuzz case seed={self.seed}: backend {self.backend} vs {self.pamm_backend}, options {self.options}",
            f"  calls (batch, seq): {list(self.shapes)}, dynamic={self.dynamic}",
            f"  memory={self.memory}, repeat={self.repeat}, tie_qk={self.tie_qk}, frozen={list(self.frozen)}",
            f"  nonfinite={self.nonfinite}, dtype={self.dtype}, seed_none={self.seed_none}",
            f"  amp={self.amp}, plain_first={self.plain_first}, explains={self.explains}, "
            f"python_state={self.python_state}",
        ]
        for i, b in enumerate(self.blocks):
            fields = ", ".join(f"{f.name}={getattr(b, f.name)!r}" for f in dataclasses.fields(b))
            lines.append(f"  block {i} ({'/'.join(b.projections())}): {fields}")
        return "\n".join(lines)


def _random_block(rng: random.Random, memory: bool) -> BlockSpec:
    cross = memory and rng.random() < 0.5
    kv_heads = rng.choice([4, 4, 2, 1])
    fused = rng.random() < 0.35
    kv_shared = not fused and rng.random() < 0.15
    n_proj = 2 if (fused and cross) or kv_shared else 1 if fused else 3
    weights = [10, 2, 1, 2, 2]  # mostly plain calls
    return BlockSpec(
        kv_heads=kv_heads,
        fused=fused,
        kv_shared=kv_shared,
        cross=cross,
        bias=rng.random() < 0.5,
        matmul=rng.random() < 0.2,
        modes=tuple(rng.choices(MODES, weights, k=n_proj)),
        attention=rng.choice(["sdpa", "sdpa_causal", "manual"]),
        split=rng.choice(["split", "chunk"]) if kv_heads == HEADS else "split",
        autocast_block=rng.random() < 0.1,
        extra=rng.choice(["none", "none", "linear", "residual"]),
        parallel_mlp=rng.random() < 0.3,
        seq_mlp=rng.random() < 0.3,
        graph_break=rng.choice(["none"] * 8 + ["after_norm", "after_attention"]),
        act_weight=rng.choice(["none"] * 6 + ["param", "arg"]),
    )


def random_spec(seed: int) -> ModelSpec:
    """The case of ``seed``: the same seed always gives the same model, inputs and options."""
    rng = random.Random(seed)
    memory = rng.choice(["none", "none", "frozen", "trainable"])
    blocks = tuple(_random_block(rng, memory != "none") for _ in range(rng.choice([1, 1, 1, 2])))
    inductor = seed % 25 == 5  # a few cases against Inductor (one graph, one shape); the rest on eager
    if inductor:
        blocks = (dataclasses.replace(blocks[0], graph_break="none"),)
    breaks = any(b.graph_break != "none" for b in blocks)
    vary = rng.choice(["batch", "seq"])
    full, shorts = ((4, 8), [(2, 8), (3, 8)]) if vary == "batch" else ((2, 16), [(2, 8), (2, 12)])
    short = rng.choice(shorts)
    orders = [(full,), (full, short), (short, full), (full, short, full)]
    shapes = orders[0] if inductor else rng.choice(orders[1:] * 2 + orders[:1])
    ratio = 1.0 if rng.random() < 0.35 else 0.25
    # Row-count thresholds between the short and the full batch in some cases: decisions must follow b.
    min_tokens, min_generators = rng.choice([(1, 1), (1, 1), (20, 1), (1, 12)])
    spec = ModelSpec(
        seed=seed,
        blocks=blocks,
        repeat=1 if inductor else rng.choice([1] * 5 + [2]),
        tie_qk=rng.random() < 0.2,
        frozen=rng.choice([(), (), (), ("k",), ("o",), ("up",), ("head",)]),
        memory=memory,
        shapes=shapes,
        # mark_dynamic does not reach tensors made from the memory before a graph break: Dynamo refuses the mark.
        dynamic=rng.choice(["auto"] * 3 + ["true"] + ([] if memory != "none" and breaks else ["mark"])),
        ratio=ratio,
        min_tokens=min_tokens,
        min_generators=min_generators,
        targets=rng.choice(["qkv", "qkv", "all", ("qkv", "mlp"), "mlp"]),
        backend="inductor" if inductor else "eager",
    )
    spec = _program_features(spec, random.Random(seed * 7919 + 1), inductor)
    spec = _session_features(spec, random.Random(seed * 7919 + 2))
    if spec.dynamic == "mark" and not inductor:
        # Dynamo's eager backend raises ConstraintViolationError on a marked dim after a graph break (torch 2.13),
        # where aot_eager does not: a plain-side failure, not ours.
        spec = dataclasses.replace(spec, backend="aot_eager")
    return spec


def _program_features(spec: ModelSpec, rng: random.Random, inductor: bool) -> ModelSpec:
    """Issue 18's program features, from their own random stream (the older fields of a seed stay as they were).

    Dropout and MHA cases run at ratio 1 against ``aot_eager`` (the same dropout lowering on both sides, and
    no eager record of MHA's projections to build a PAMM reference from); float64 cases have no autocast.
    """
    blocks = []
    for b in spec.blocks:
        mha = rng.choice(["none"] * 5 + ["self", "cross", "kdim"]) if not inductor else "none"
        b = dataclasses.replace(
            b,
            write=rng.choice(["none"] * 6 + ["data", "inplace", "before"]),
            detach_last=rng.random() < 0.12,
            unused=rng.random() < 0.12,
            dropout=rng.choice([0.0] * 4 + [0.2]) if not inductor else 0.0,
            mha=mha,
            mha_batch_first=rng.random() < 0.5,
            mha_weights=rng.random() < 0.4,
            mha_padding=rng.random() < 0.4,
        )
        blocks.append(b)
    spec = dataclasses.replace(
        spec,
        blocks=tuple(blocks),
        nonfinite=rng.choice(["none"] * 8 + ["nan", "inf"]),
        dtype=rng.choice(["float32"] * 5 + ["float64"]),
    )
    if spec.dtype == "float64":
        spec = dataclasses.replace(spec, blocks=tuple(
            dataclasses.replace(b, autocast_block=False, modes=tuple("grad" if m == "autocast" else m for m in b.modes))
            for b in spec.blocks))
    if spec.dropout or any(b.mha != "none" for b in spec.blocks):
        spec = dataclasses.replace(spec, ratio=1.0, seed_none=spec.dropout and rng.random() < 0.5,
                                   backend=spec.backend if inductor else "aot_eager")
    return spec


def _session_features(spec: ModelSpec, rng: random.Random) -> ModelSpec:
    """Issue 24's features, from a third random stream (the fields of the first two stay as they were): autocast
    over the whole step (a bf16 X for most linears; float64 cases have none), a plain compile first, repeated
    explain() calls (3: the oracle checks Dynamo's cache entries themselves, so it needs no more than
    recompile_limit's 8 to see one left behind), Python-side state in the forward."""
    amp = rng.choice(["none"] * 6 + ["model", "bf16_x"])
    return dataclasses.replace(
        spec,
        amp="none" if spec.dtype == "float64" else amp,
        plain_first=rng.random() < 0.15,
        explains=3 if rng.random() < 0.12 else 0,
        python_state=rng.random() < 0.2,
    )


#: Block fields whose interplay with compression is a feature of its own: drawn in a case with ratio < 1.
_UNDER_COMPRESSION = ("write", "detach_last", "unused", "act_weight", "graph_break", "cross", "fused", "kv_shared")


def features(spec: ModelSpec) -> set[str]:
    """What the case exercises, as "field=value" names: every drawn value of every field (MHA's own fields only
    in MHA blocks), the number of calls and which dimension varies, and the program features of
    :data:`_UNDER_COMPRESSION` and the case-level ones again as "ratio<1&..." where the case compresses.
    The fuzzer's default seeds are chosen to cover each of these (``tests/test_fuzz.py``)."""
    case = {f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(spec) if f.name not in ("seed", "blocks",
                                                                                                    "shapes")}
    case |= {f"blocks={len(spec.blocks)}", f"calls={len(spec.shapes)}", f"autocast={spec.autocast}",
             f"varying_dim={spec.varying_dim if len(set(spec.shapes)) > 1 else None}"}
    found = set(case)
    for b in spec.blocks:
        for f in dataclasses.fields(b):
            value = getattr(b, f.name)
            if f.name == "modes":
                found |= {f"mode={m}" for m in value}
            elif f.name == "dropout":
                found.add(f"dropout={value > 0}")
            elif not f.name.startswith("mha_") or b.mha != "none":
                found.add(f"{f.name}={value}")
        if spec.ratio < 1:
            found |= {f"ratio<1&{name}={getattr(b, name)}" for name in _UNDER_COMPRESSION}
    if spec.ratio < 1:
        found |= {f"ratio<1&{c}" for c in case if c.split("=")[0] in (
            "nonfinite", "dtype", "autocast", "targets", "dynamic", "calls", "min_tokens", "min_generators", "backend",
            "amp", "plain_first", "explains", "python_state")}
    return found


# --- eager recording of what each projection read and received ------------------------------------


@dataclasses.dataclass
class Site:
    """One call of a :class:`Proj` in eager mode: X's rows in the dtype the linear computed in, and dY."""

    proj: Proj
    x: Tensor
    dy: Tensor | None = None

    def keep_grad(self, grad: Tensor) -> None:
        self.dy = grad.reshape(-1, grad.shape[-1])


_RECORDER: list[Site] | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[Site]]:
    """Log a :class:`Site` for every eager :class:`Proj` call inside the block (never under torch.compile)."""
    global _RECORDER
    _RECORDER = sites = []
    try:
        yield sites
    finally:
        _RECORDER = None


class Proj(nn.Module):
    """A linear layer with a role (``q``, ``up``, ``head``...) that the fuzzer's oracle reads."""

    def __init__(self, n_in: int, n_out: int, bias: bool, role: str, matmul: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1) if bias else None
        self.role = role
        self.matmul = matmul

    def forward(self, x: Tensor) -> Tensor:
        if self.matmul:
            prod = x @ self.weight.T
            y = prod + self.bias if self.bias is not None else prod  # under autocast: a bf16 product, a f32 sum
        else:
            y = prod = F.linear(x, self.weight, self.bias)
        if _RECORDER is not None:
            site = Site(self, x.detach().reshape(-1, x.shape[-1]).to(prod.dtype))
            _RECORDER.append(site)
            if y.requires_grad:
                y.register_hook(site.keep_grad)
        return y


def _autocast(enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def step_autocast(spec: ModelSpec) -> contextlib.AbstractContextManager:
    """The context each forward of the case runs in (the caller's bf16 autocast under ``amp``)."""
    return _autocast(spec.amp != "none")


def _call(proj: Proj, x: Tensor, mode: str) -> Tensor:
    if mode == "no_grad":
        with torch.no_grad():
            return proj(x)
    if mode == "enable_grad":
        with torch.no_grad(), torch.enable_grad():
            return proj(x)
    if mode == "detach":
        return proj(x.detach())
    if mode == "autocast":
        with _autocast(True):
            return proj(x).to(x.dtype)
    return proj(x)


def _write_after(x: Tensor, write: str) -> None:
    """Write X's storage: through ``.data`` (no version bump: plain sees the new values everywhere) or in place."""
    if write == "data":
        x.data[..., 0] = 0
    elif write == "inplace":
        x[..., 0] = 0


class Block(nn.Module):
    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        kvd = spec.kv_heads * HEAD_DIM

        def proj(n_in: int, n_out: int, role: str) -> Proj:
            return Proj(n_in, n_out, spec.bias, role, spec.matmul)

        self.norm = nn.RMSNorm(DIM)
        if spec.unused:
            self.unused = proj(DIM, DIM, "extra")
        if spec.mha != "none":
            kdim = 12 if spec.mha == "kdim" else None
            self.mha = nn.MultiheadAttention(DIM, HEADS, dropout=spec.dropout, bias=spec.bias,
                                             batch_first=spec.mha_batch_first, kdim=kdim, vdim=kdim)
            self.mha.out_proj.role = "o"
        elif spec.fused and not spec.cross:
            self.qkv = proj(DIM, DIM + 2 * kvd, "qkv")
        else:
            self.q = proj(DIM, DIM, "q")
            if spec.fused:
                self.kv = proj(DIM, 2 * kvd, "kv")
            else:
                self.k = proj(DIM, kvd, "k")
                if not spec.kv_shared:
                    self.v = proj(DIM, kvd, "v")
        if spec.mha == "none":
            self.o = proj(DIM, DIM, "o")
        if spec.extra == "linear":
            self.extra = proj(DIM, DIM, "extra")
        if spec.parallel_mlp:
            self.up, self.down = proj(DIM, 2 * DIM, "up"), proj(2 * DIM, DIM, "down")
        if spec.seq_mlp:
            self.norm2 = nn.LayerNorm(DIM)
            self.up2, self.down2 = proj(DIM, 2 * DIM, "up"), proj(2 * DIM, DIM, "down")
        if spec.act_weight == "param":
            self.w_base = nn.Parameter(torch.randn(DIM, DIM) / DIM)
            self.w_gate = nn.Parameter(torch.randn(DIM, DIM))

    def _project(self, n: Tensor, memory: Tensor | None, w: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        s = self.spec
        kvd = s.kv_heads * HEAD_DIM
        src = memory if s.cross else n
        modes = iter(s.modes)
        n_proj = len(s.modes)
        # the write follows the first projection computed with grad, so that it often falls between two members
        write_at = next((i for i, m in enumerate(s.modes) if m == "grad"), 0)

        def call(proj: Proj, x: Tensor, index: int) -> Tensor:
            y = _call(proj, x, next(modes))
            if index == write_at:
                _write_after(n, s.write)
            return y.detach() if s.detach_last and index == n_proj - 1 else y

        if s.fused and not s.cross:
            qkv = call(self.qkv, n, 0)
            q, k, v = qkv.chunk(3, dim=-1) if s.split == "chunk" else qkv.split([DIM, kvd, kvd], dim=-1)
        else:
            q = call(self.q, n, 0)
            if s.fused:
                k, v = call(self.kv, src, 1).chunk(2, dim=-1)
            elif s.kv_shared:
                k = v = call(self.k, src, 1)
            else:
                k, v = call(self.k, src, 1), call(self.v, src, 2)
        if w is not None:
            q = q + F.linear(n, w)  # an activation used as a weight: its gradient must stay exact
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s = self.spec
        bsz, seq, kv_seq = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(bsz, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k = k.reshape(bsz, kv_seq, s.kv_heads, HEAD_DIM).transpose(1, 2)
        v = v.reshape(bsz, kv_seq, s.kv_heads, HEAD_DIM).transpose(1, 2)
        if s.kv_heads != HEADS:
            k, v = (t.repeat_interleave(HEADS // s.kv_heads, dim=1) for t in (k, v))
        if s.attention == "manual":
            out = torch.softmax(q @ k.transpose(-2, -1) * HEAD_DIM**-0.5, dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s.attention == "sdpa_causal" and not s.cross)
        out = out.transpose(1, 2).reshape(bsz, seq, DIM)
        return F.dropout(out, s.dropout) if s.dropout else out

    def _mha(self, n: Tensor, memory: Tensor | None) -> Tensor:
        s = self.spec
        kv = memory if s.mha == "cross" and memory is not None else n
        if s.mha == "kdim":
            kv = (memory if memory is not None else n)[..., :12]
        if not s.mha_batch_first:
            n, kv = n.transpose(0, 1), kv.transpose(0, 1)
        src = kv.shape[1] if s.mha_batch_first else kv.shape[0]
        bsz = n.shape[0] if s.mha_batch_first else n.shape[1]
        padding = (torch.arange(src, device=n.device) >= src - 1).expand(bsz, src) if s.mha_padding else None
        out, weights = self.mha(n, kv, kv, key_padding_mask=padding, need_weights=s.mha_weights)
        out = out if s.mha_batch_first else out.transpose(0, 1)
        return out if weights is None else out + weights.sum() * 1e-3

    def forward(self, h: Tensor, memory: Tensor | None, w_arg: Tensor | None) -> Tensor:
        s = self.spec
        w = self.w_base * torch.sigmoid(self.w_gate) if s.act_weight == "param" else None
        w = w_arg if s.act_weight == "arg" else w
        n = self.norm(h)
        if s.graph_break == "after_norm":
            torch._dynamo.graph_break()
        if s.write == "before":
            _write_after(n, "inplace")
        if s.unused:
            self.unused(n)
        with _autocast(s.autocast_block):
            if s.mha != "none":
                attn = self._mha(n, memory)
            else:
                attn = self._attend(*self._project(n, memory, w))
        out = h + (attn.to(h.dtype) if s.mha != "none" else self.o(attn.to(h.dtype)))
        if s.extra == "linear":
            out = out + self.extra(n)
        elif s.extra == "residual":
            out = out + n
        if s.parallel_mlp:
            out = out + self.down(F.dropout(F.gelu(self.up(n)), s.dropout))
        if s.graph_break == "after_attention":
            torch._dynamo.graph_break()
        if s.seq_mlp:
            out = out + self.down2(F.dropout(F.gelu(self.up2(self.norm2(out))), s.dropout))
        return out


class FuzzModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.blocks = nn.ModuleList(Block(b) for b in spec.blocks)
        if spec.memory != "none":
            self.enc, self.enc_norm = Proj(DIM, DIM, True, "enc"), nn.LayerNorm(DIM)
        self.norm = nn.RMSNorm(DIM)
        self.head = Proj(DIM, VOCAB, False, "head")
        if spec.python_state:
            self.calls = 0
            self.cache: dict[str, Tensor] = {}
        if spec.tie_qk:
            for blk in self.blocks:
                b = blk.spec
                if not (b.fused or b.kv_shared or b.cross) and b.kv_heads == HEADS and b.mha == "none":
                    blk.k.weight = blk.q.weight
        for mod in self.modules():
            if isinstance(mod, Proj) and (mod.role in spec.frozen or (mod.role == "enc" and spec.memory == "frozen")):
                mod.requires_grad_(False)

    def forward(self, x: Tensor, mem: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        memory = None
        if self.spec.memory == "frozen":
            with torch.no_grad():
                memory = self.enc_norm(self.enc(mem))
        elif self.spec.memory == "trainable":
            memory = self.enc_norm(self.enc(mem))
        h = x
        for _ in range(self.spec.repeat):
            for blk in self.blocks:
                h = blk(h, memory, w)
        out = self.head(self.norm(h))
        if self.spec.python_state:
            self.calls += 1
            # A copy: caching out.detach() itself trips torch 2.13's AOTAutogradCache under plain Inductor (a second
            # compile of the same program loads an artifact whose output-alias replay reads garbage sizes; seeds 5
            # and 205; torch._functorch.config.enable_autograd_cache=False avoids it), a plain-side failure.
            self.cache["out"] = out.detach().clone()
        return out

    def state(self) -> tuple[int, Tensor] | None:
        """The Python-side state the forward changes (``python_state``): its call count and cached output."""
        return (self.calls, self.cache.get("out")) if self.spec.python_state else None


def build(spec: ModelSpec) -> FuzzModel:
    return FuzzModel(spec).to(spec.torch_dtype)


def make_inputs(spec: ModelSpec, call: int) -> tuple[dict[str, Tensor], Tensor]:
    """The inputs of call ``call`` (leaves that require grad) and the fixed projection its loss uses."""
    gen = torch.Generator().manual_seed(spec.seed * 1000 + call)
    batch, seq = spec.shapes[call]
    dtype = spec.torch_dtype
    inputs = {"x": torch.randn(batch, seq, DIM, generator=gen, dtype=dtype)}
    if spec.memory != "none":
        inputs["mem"] = torch.randn(batch, MEM_SEQ, DIM, generator=gen, dtype=dtype)
    if spec.amp == "bf16_x":
        inputs = {k: v.bfloat16() for k, v in inputs.items()}
    if spec.weight_arg:
        inputs["w"] = torch.randn(DIM, DIM, generator=gen, dtype=dtype) / DIM
    loss_proj = torch.randn(batch, seq, VOCAB, generator=gen)
    if spec.nonfinite != "none" and call == 0:
        inputs["x"][-1, -1, 1] = float(spec.nonfinite)
    return {k: v.requires_grad_(True) for k, v in inputs.items()}, loss_proj
