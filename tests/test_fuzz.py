"""Differential fuzzer: random small transformer-like models, pamm against the plain compile.

Case ``seed`` (see ``tests/fuzz_models.py``) is compiled by the plain backend (Dynamo's ``eager``
against ``pamm_aot_eager``, or ``inductor`` against ``pamm`` for a few seeds) on the same weights
and inputs, and called with its sequence of input shapes. Under ``pamm`` Inductor compiles
``pamm::compress``'s decomposition, which records nothing, so those cases also run
``pamm_aot_eager`` with the same seed and require the same gradients from both. The oracle, for
every call:

- outputs and the gradients of every input are equal, and so is every parameter gradient except
  the weight gradients of compressed projections (ratio 1: those too), None where plain has None;
- a compressed weight gradient equals the eager PAMM reference: the sum over the weight's call
  sites of dY^T X~, with X~ = alpha * C[f] from the compression ``record_compressions()`` recorded
  for that site's X, or X itself where the site was left exact;
- every compression has the k of the k formula for its row count, and the compressions of a call
  are those a fresh compile at that call's shape makes (a decision never outlives a size change);
- every linear of every graph is in a group or left exact with a reason, and only projections
  whose role ``targets`` selects are grouped, with weights that are parameters of the model;
- non-finite values compare as values (NaN where plain has NaN, the same infinities), and a compressed
  weight gradient is non-finite wherever plain's is; a program plain refuses (an in-place write to a
  saved X) is refused by pamm with the same error; every call starts from the same ``torch.manual_seed``
  on both sides, so dropout masks and the user's later random numbers must agree;
- the forward's Python-side state (a call counter, an output cached in a dict) moves as under plain; explain()
  called 3 times mid-training changes none of it and leaves every Dynamo cache entry as it was (entries left
  behind would bring the code to its recompile_limit and the later calls to eager);
  a plain compile of the model before pamm's changes nothing either; under bf16 autocast around the step (every
  linear then reads an autocast output or a bf16 input) all of the above holds at autocast's tolerance.

Failures print the case's ``describe()``; ``random_spec(seed)`` rebuilds it. By default the cases of
:data:`DEFAULT_SEEDS`, chosen among the 500 so that every feature ``fuzz_models.features`` names is drawn
at least :data:`COVER` times (or as often as the 500 draw it) at a low measured cost; all 500 with ``--runslow``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools

import pytest
import torch
from fuzz_models import (
    ModelSpec,
    Site,
    allowed_roles,
    build,
    features,
    make_inputs,
    random_spec,
    recording,
    step_autocast,
)
from torch import Tensor, fx

import pamm_fx
from pamm_fx import _compat
from pamm_fx.config import PammConfig
from pamm_fx.fxutil import row_slice
from pamm_fx.ops import record_compressions
from pamm_fx.testing import capture_rewrites

SLOW_CASES, COVER = 500, 3
#: The default run: a greedy cover of the features of the 500 cases (each feature COVER times), cheapest per
#: missing feature first, by per-case durations measured with ``--durations`` on the 2-core CPU dev machine.
#: The first 50 seeds, the default before, took 2,187 s there under load; the 36 chosen then took 610 s in the
#: same runs, and draw every feature, where the first 50 drew some once or never (e.g. a compressed case with
#: NaN/Inf input, an activation weight or a write to X before the projections). Issue 24's features (a third
#: random stream: amp, plain_first, explains, python_state) changed what those 36 cases run and were drawn by
#: too few of them (amp=bf16_x once, compressed with amp=bf16_x never): 89, 186 and 416, the cheapest compressed
#: bf16_x cases measured, joined, and 4, 5, 21, 44 and 377, the costliest cases the cover no longer needs, left.
#: Measured on the same loaded machine (load average 5 on 2 cores): the 36 before issue 24, 187 s; these 34, 194 s.
DEFAULT_SEEDS = frozenset({3, 7, 13, 17, 23, 25, 29, 30, 38, 89, 103, 111, 112, 125, 137, 168, 186, 200, 205, 228, 254, 258, 322, 335, 346, 355, 369, 383, 384, 392, 416, 437, 445, 479})
Compression = tuple[Tensor, Tensor, Tensor, Tensor]  # (X rows, C, f, alpha)


@dataclasses.dataclass
class GraphPlan:
    """What the backend decided for one graph."""

    groups: list[list[tuple[str, Tensor | None]]]  # (weight name, the weight tensor if Dynamo says which)
    unexplained: list[str]  # linears neither in a rewritten group nor left exact with a reason


def _graph_plans(records: list) -> list[GraphPlan]:
    """The one place that reads ``capture_rewrites()`` records (their API is being unified into a Plan)."""
    plans = []
    for rec in records:
        p = rec.plan
        groups = p.groups if rec.rewritten is not None else []
        explained = {proj.node for g in groups for proj in g.projections} | {r.node for r in p.rejections}
        linears = [n for n in p.graph.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
        inference = not any(isinstance(v, Tensor) and v.requires_grad for v in map(_val, p.graph.graph.nodes))
        unexplained = [] if inference else [n.name for n in linears if n not in explained]
        named = [[(proj.weight_name, _tensor(proj.weight)) for proj in g.projections] for g in groups]
        plans.append(GraphPlan(named, unexplained))
    return plans


def _tensor(node: fx.Node) -> Tensor | None:
    """The real tensor behind a graph input (names alone are relative to the frame after a graph break)."""
    while (node.op == "call_method" and node.target in ("t", "to")) or row_slice(node) is not None:
        node = node.args[0] if row_slice(node) is None else row_slice(node)[0]
    grapharg = node.meta.get("grapharg")
    return getattr(grapharg, "example", None) if grapharg is not None else None


def _val(node: fx.Node) -> object:
    return node.meta.get("example_value", node.meta.get("val"))


@dataclasses.dataclass
class Call:
    out: Tensor
    grads: dict[str, Tensor | None]  # "input x", ... and parameter names
    compressions: list[Compression] = dataclasses.field(default_factory=list)
    sites: list[Site] = dataclasses.field(default_factory=list)
    #: ``python_state``: how many calls the forward counted during this call, and the output it cached
    state: tuple[int, Tensor] | None = None


def _grads(model: torch.nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor | None]:
    grads = {f"input {k}": v.grad for k, v in inputs.items()}
    grads.update((name, None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters())
    return grads


def _compile(spec: ModelSpec, model: torch.nn.Module, backend: str, reset: bool = True) -> torch.nn.Module:
    if reset:
        torch._dynamo.reset()
    options = spec.options if backend.startswith("pamm") else None
    return torch.compile(model, backend=backend, options=options, dynamic=True if spec.dynamic == "true" else None)


def _plain_step(spec: ModelSpec, model: torch.nn.Module) -> None:
    """``plain_first``: one training step of the case's plain compile, left in Dynamo's caches (no reset), as a
    user who compiled the model plainly first (or compiled an eval copy) would leave it."""
    torch._dynamo.reset()
    inputs, loss_proj = make_inputs(spec, 0)
    with step_autocast(spec):
        out = torch.compile(model, backend=spec.backend)(**inputs)
    (out.float() * loss_proj).sum().backward()
    model.zero_grad(set_to_none=True)


def _explain(spec: ModelSpec, fn: torch.nn.Module, call: int) -> None:
    """``explains``: explain() mid-training, several times; Dynamo's cache entries must be as they were (one left
    per call would bring the code to its recompile_limit and the case's later calls to eager)."""
    inputs, _ = make_inputs(spec, call)
    before = _dynamo_entries()
    for _ in range(spec.explains):
        with step_autocast(spec):
            report = pamm_fx.explain(fn, model_kwargs={k: v.detach() for k, v in inputs.items()}, **spec.options)
        cache_notes = [n for n in report.notes if "Dynamo's cache" in n]
        assert not cache_notes, cache_notes
    assert _dynamo_entries() == before, "explain() changed Dynamo's cache entries"


def _dynamo_entries() -> dict[int, list[int]]:
    """The compiled code of every Dynamo cache entry, per code object that has some."""
    return {id(code): [id(e.code) for e in _compat.cache_entries(code)] for code in _compat.dynamo_seen_codes()
            if _compat.cache_entry_count(code)}


def _run(spec: ModelSpec, model: torch.nn.Module, backend: str | None) -> tuple[list[Call], list]:
    """Every call of the case: compiled with ``backend``, or eager with its projection sites recorded."""
    pamm = backend is not None and backend.startswith("pamm")
    if pamm and spec.plain_first:
        _plain_step(spec, model)
    fn = model if backend is None else _compile(spec, model, backend, reset=not (pamm and spec.plain_first))
    calls: list[Call] = []
    counted = model.state()[0] if spec.python_state else 0  # explain() calls between steps must not count
    # Inductor skips the rounding of a cast inside a fused kernel unless told to emulate it, so under autocast
    # its compress would assign near-tied rows of the bf16 X differently from the eager op it is compared with.
    with capture_rewrites() as records, record_compressions() as compressions, \
            torch._inductor.config.patch(emulate_precision_casts=True):
        for i in range(len(spec.shapes)):
            if pamm and spec.explains and i == min(1, len(spec.shapes) - 1):
                _explain(spec, fn, i)
            inputs, loss_proj = make_inputs(spec, i)
            if spec.dynamic == "mark":
                torch._dynamo.mark_dynamic(inputs["x"], spec.varying_dim)
                if "mem" in inputs and spec.varying_dim == 0:
                    torch._dynamo.mark_dynamic(inputs["mem"], 0)
            model.zero_grad(set_to_none=True)
            start = len(compressions)
            torch.manual_seed(spec.seed * 1000 + i)  # the same dropout masks on every side
            with recording() if backend is None else contextlib.nullcontext([]) as sites:
                with step_autocast(spec):
                    out = fn(**inputs)
                (out.float() * loss_proj).sum().backward()
            out = torch.cat([out.detach().flatten().double(), torch.rand(4, dtype=torch.double)])  # later draws too
            state = model.state()
            if state is not None:
                state, counted = (state[0] - counted, state[1]), state[0]
            calls.append(Call(out, _grads(model, inputs), compressions[start:], sites, state))
    return calls, records


def _fresh_compressions(spec: ModelSpec, model: torch.nn.Module, call: int) -> list[tuple[int, int]]:
    """(b, k) of the real compressions (k < b) of a fresh static compile run at call ``call``'s shape alone."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pamm_aot_eager", options=spec.options, dynamic=False)
    inputs, _ = make_inputs(spec, call)
    with record_compressions() as seen, step_autocast(spec):
        compiled(**inputs)
    return sorted((x.shape[0], c.shape[0]) for x, c, _, _ in seen if c.shape[0] < x.shape[0])


def _tol(spec: ModelSpec) -> float:
    if spec.autocast:
        return 3e-2
    return 1e-9 if spec.dtype == "float64" else 1e-4


def _diff(actual: Tensor | None, expected: Tensor | None, tol: float) -> str | None:
    """Why ``actual`` is not ``expected`` (None if it is), relative to expected's largest entry."""
    if actual is None or expected is None:
        return None if actual is expected else f"{'no' if actual is None else 'a'} gradient where plain has " + (
            "one" if actual is None else "none")
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    finite = expected.isfinite()
    if not torch.equal(finite, actual.isfinite()) or not torch.equal(expected[~finite].isnan(), actual[~finite].isnan()):
        return (f"non-finite entries differ: {int((~finite).sum())} under plain, {int((~actual.isfinite()).sum())} here "
                f"(NaN: {int(expected.isnan().sum())} vs {int(actual.isnan().sum())})")
    if not torch.equal(expected[expected.isinf()], actual[expected.isinf()]):
        return "infinities of a different sign"
    expected, actual = expected[finite], actual[finite]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return None if err <= tol * scale else f"max abs error {err:.3g} (scale {scale:.3g})"


def _same_rows(x: Tensor, rows: Tensor, tol: float) -> bool:
    if x.shape != rows.shape or x.dtype != rows.dtype:
        return False
    return torch.allclose(x.float(), rows.float(), rtol=tol, atol=tol * max(x.abs().max().item(), 1.0))


def _reference_error(param: Tensor, actual: Tensor, sites: list[Site], comps: list[Compression], tol: float) -> str | None:
    """Whether ``actual`` is the PAMM gradient of ``param``: each site's dY^T X~, X~ from a recorded compression of
    that site's X (or X itself where the site was left exact). None if some such choice matches."""
    used = [s for s in sites if s.proj.weight is param and s.dy is not None]
    options = [
        [s.x] + [alpha[:, None] * c[f.long()] for x, c, f, alpha in comps if _same_rows(s.x, x, tol)] for s in used
    ]
    if not used:
        return "no call site received a gradient in eager mode"
    for choice in itertools.islice(itertools.product(*options), 256):
        why = _diff(actual, sum(s.dy.double().T @ xt.double() for s, xt in zip(used, choice)), tol)
        if why is None:
            return None
    if all(len(o) == 1 for o in options):
        return f"differs from the exact gradient ({why}), and no compression of its X was recorded"
    return f"differs from the PAMM reference of every matching compression: {why}"


def _root(exc: BaseException) -> BaseException:
    """The error under Dynamo's wrappers (BackendCompilerFailed and the like)."""
    while exc.__cause__ is not None or getattr(exc, "inner_exception", None) is not None:
        exc = exc.__cause__ or exc.inner_exception
    return exc


def _refused(spec: ModelSpec, model: torch.nn.Module) -> list[str] | None:
    """When plain refuses the program (e.g. an in-place write to a saved X), pamm must refuse it the same way."""
    try:
        _run(spec, model, spec.backend)
    except Exception as exc:  # noqa: BLE001 - any refusal, compared below
        plain = _root(exc)
    else:
        return None
    try:
        _run(spec, model, spec.pamm_backend)
    except Exception as exc:  # noqa: BLE001
        ours = _root(exc)
        if type(ours) is type(plain) and str(ours).split(":")[0] == str(plain).split(":")[0]:
            return []
        return [f"plain refuses the program ({type(plain).__name__}: {plain}), pamm differently "
                f"({type(ours).__name__}: {ours})"]
    return [f"plain refuses the program ({type(plain).__name__}: {plain}); pamm runs it"]


def _check(spec: ModelSpec) -> list[str]:
    model = build(spec)
    refused = _refused(spec, model)
    if refused is not None:
        return refused
    plain, _ = _run(spec, model, spec.backend)
    pamm, records = _run(spec, model, spec.pamm_backend)
    eager, _ = _run(spec, model, None) if spec.ratio < 1 else ([], [])
    tol, problems = _tol(spec), []
    recorded = pamm
    if spec.pamm_backend == "pamm" and spec.ratio < 1:
        recorded, _ = _run(spec, model, "pamm_aot_eager")  # same seed and compile ids: the same rows
        for i, (got, twin) in enumerate(zip(pamm, recorded)):
            problems += [f"call {i}: grad of {name} under pamm differs from pamm_aot_eager: {why}"
                         for name, g in got.grads.items() if (why := _diff(g, twin.grads[name], tol)) is not None]

    params = dict(model.named_parameters())
    param_ids = {id(p) for p in params.values()}
    roles: dict[int, set[str]] = collections.defaultdict(set)
    for mod in model.modules():
        if hasattr(mod, "role"):
            roles[id(mod.weight)].add(mod.role)
        if isinstance(mod, torch.nn.MultiheadAttention):
            for w in (mod.in_proj_weight, mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight):
                if w is not None:
                    roles[id(w)].add("qkv")
    allowed = allowed_roles(spec.targets)
    grouped: set[int] = set()
    for g, plan in enumerate(_graph_plans(records)):
        problems += [f"graph {g}: linear {n} is neither compressed nor left exact with a reason" for n in plan.unexplained]
        for members in plan.groups:
            names = [name for name, _ in members]
            for name, weight in members:
                if id(weight) not in param_ids:
                    problems.append(f"graph {g}: group {names} holds {name}, which is not a parameter of the model")
                    continue
                grouped.add(id(weight))
                if not roles[id(weight)] <= allowed:
                    problems.append(f"graph {g}: {name} ({sorted(roles[id(weight)])}) is grouped under targets={spec.targets!r}")

    config = PammConfig.from_options(spec.options)
    for i, (base, got) in enumerate(zip(plain, pamm)):
        at = f"call {i} {spec.shapes[i]}"
        if (why := _diff(got.out, base.out, tol)) is not None:
            problems.append(f"{at}: output {why}")
        if base.state is not None and got.state[0] != base.state[0]:
            problems.append(f"{at}: the forward counted {got.state[0]} call(s), under plain {base.state[0]}")
        if base.state is not None and (why := _diff(got.state[1], base.state[1], tol)) is not None:
            problems.append(f"{at}: the output the forward cached {why}")
        for name, expected in base.grads.items():
            actual = got.grads[name]
            param = params.get(name)
            compressed = param is not None and id(param) in grouped and spec.ratio < 1
            if compressed and actual is not None and expected is not None and not expected.isfinite().all():
                why = None if not actual.isfinite().all() else "finite, where plain's gradient is not"
            elif compressed and actual is not None and expected is not None:
                why = _reference_error(param, actual, eager[i].sites, recorded[i].compressions, tol)
            else:
                why = _diff(actual, expected, tol)
            if why is not None:
                problems.append(f"{at}: grad of {name}: {why}")
        for x, c, _, _ in recorded[i].compressions:
            b, k = x.shape[0], c.shape[0]
            if k != config.num_generators(b):
                problems.append(f"{at}: compressed {b} rows into k={k}, the formula gives {config.num_generators(b)}")
    if spec.ratio < 1 and len(set(spec.shapes)) > 1:
        seen = [sorted((x.shape[0], c.shape[0]) for x, c, _, _ in call.compressions if c.shape[0] < x.shape[0])
                for call in recorded]
        if spec.min_tokens == spec.min_generators == 1:  # every size compresses: the same groups at every call
            if len({len(s) for s in seen}) > 1:
                problems.append(f"compressions per call change with the shape: {seen}")
        else:
            fresh = {shape: _fresh_compressions(spec, model, spec.shapes.index(shape)) for shape in set(spec.shapes)}
            problems += [f"call {i} {shape}: compressions (b, k) {seen[i]}, a fresh compile at this shape {fresh[shape]}"
                         for i, shape in enumerate(spec.shapes) if seen[i] != fresh[shape]]
    return problems


def test_default_seeds_draw_every_feature() -> None:
    """Each feature the 500 cases draw is drawn by at least COVER default cases (fewer only where the 500 draw it
    fewer times): a feature added to ``fuzz_models`` must join the default run."""
    drawn = {s: features(random_spec(s)) for s in range(SLOW_CASES)}
    total = collections.Counter(f for fs in drawn.values() for f in fs)
    default = collections.Counter(f for s in DEFAULT_SEEDS for f in drawn[s])
    short = {f: f"{default[f]} of {min(COVER, n)}" for f, n in total.items() if default[f] < min(COVER, n)}
    assert not short, "add to DEFAULT_SEEDS seeds that draw " + "; ".join(
        f"{f} ({have}: e.g. seeds {[s for s, fs in drawn.items() if f in fs][:8]})" for f, have in sorted(short.items()))


@pytest.mark.parametrize(
    "seed", [pytest.param(s, marks=() if s in DEFAULT_SEEDS else pytest.mark.slow) for s in range(SLOW_CASES)]
)
def test_pamm_matches_plain_compile(seed: int) -> None:
    spec = random_spec(seed)
    try:
        problems = _check(spec)
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}\n{spec.describe()}") from exc
    assert not problems, spec.describe() + "\n" + "\n".join(problems)
