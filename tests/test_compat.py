"""Every private torch API we use, called on the installed torch (an upgrade that moves one fails here)."""

from __future__ import annotations

import logging

import torch

from pamm_fx import _compat


def test_compile_context_and_fake_mode_inside_a_backend() -> None:
    seen = {}

    def backend(gm, example_inputs):
        seen["id"] = _compat.compile_id()
        seen["text"] = _compat.compile_id_text()
        seen["fake"] = _compat.detect_fake_mode(example_inputs)
        return gm.forward

    torch.compile(lambda x: x.sin() + 1, backend=backend)(torch.randn(3))
    assert seen["id"] == (0, 0) and seen["text"] == "0/0"
    assert isinstance(seen["fake"], torch._subclasses.FakeTensorMode)
    assert _compat.compile_id() is None and _compat.compile_id_text() is None  # outside a compile


def test_inductor_mode_options() -> None:
    assert _compat.inductor_mode_options("max-autotune-no-cudagraphs")["max_autotune"] is True
    assert _compat.inductor_mode_options("reduce-overhead")["triton.cudagraphs"] is True


def test_forward_ad_level() -> None:
    import torch.autograd.forward_ad as fwAD

    assert not _compat.forward_ad_active()
    with fwAD.dual_level():
        assert _compat.forward_ad_active()
    seen = []
    torch.func.jvp(lambda x: seen.append(_compat.forward_ad_active()) or x * 2, (torch.ones(2),), (torch.ones(2),))
    assert seen == [True]  # torch.func.jvp opens a level too: the ops' forward-AD guard sees it


def test_logging_registration_and_settings() -> None:
    _compat.register_log_alias("pamm_compat_test", ["pamm_fx.compat_test"], "pamm_compat_test_graphs", "test")
    _compat.register_log_alias("pamm_compat_test", ["pamm_fx.compat_test"], "pamm_compat_test_graphs", "test")
    assert _compat.init_logs_with("+pamm_compat_test")
    assert logging.getLogger("pamm_fx.compat_test").getEffectiveLevel() == logging.DEBUG
    assert not _compat.init_logs_with("no_such_log_name_xyz")
    torch._logging.set_logs()  # back to torch's defaults


def test_outside_tracing_runs_real_tensors_under_fake_mode() -> None:
    with torch._subclasses.FakeTensorMode():
        with _compat.outside_tracing():
            real = torch.ones(2) + 1
    assert not isinstance(real, torch._subclasses.FakeTensor) and real.tolist() == [2.0, 2.0]


def test_must_save_tag_reaches_the_traced_node() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.checkpoint import CheckpointPolicy

    def f(x: torch.Tensor) -> torch.Tensor:
        y = x.sin()
        _compat.tag_must_save(y)
        return y.cos()

    gm = make_fx(f)(torch.randn(3))
    (sin,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.sin.default]
    assert sin.meta["recompute"] == CheckpointPolicy.MUST_SAVE
    _compat.tag_must_save(torch.ones(1))  # outside a trace: nothing to tag, no error


def test_activation_memory_budget_is_read_from_functorch_config() -> None:
    from pamm_fx import _compat

    assert _compat.activation_memory_budget() == 1.0
    with torch._functorch.config.patch(activation_memory_budget=0.3):
        assert _compat.activation_memory_budget() == 0.3


def test_graph_targets_counters_fake_mode_and_trace_artifacts() -> None:
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    seen = {}

    def backend(gm, example_inputs):
        seen["targets"] = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        seen["fake"] = _compat.fake_mode_of(next(iter(gm.graph.find_nodes(op="placeholder"))).meta["example_value"])
        return gm.forward

    w = torch.randn(3, 3)
    torch.compile(lambda x: torch.nn.functional.scaled_dot_product_attention(
        torch.nn.functional.linear(x, w), x, x), backend=backend)(torch.randn(1, 2, 3, 3))
    assert {_compat.NN_LINEAR, _compat.NN_SDPA} <= seen["targets"]
    assert seen["fake"] is not None and _compat.fake_mode_of(torch.ones(1)) is None
    _compat.dynamo_counters()["pamm_compat_test"]["n"] += 1
    assert _compat.dynamo_counters()["pamm_compat_test"]["n"] == 1
    assert issubclass(_compat.DynamoException, Exception)
    assert isinstance(torch.ops.aten.add_.Tensor, _compat.OpOverload) and torch.ops.aten.add_.Tensor._schema.is_mutable
    _compat.trace_artifact("pamm_compat_test", lambda: "payload")  # a no-op without TORCH_TRACE
    assert isinstance(_compat.artifact_logger("pamm_fx", "pamm_graphs"), logging.Logger)
    with _compat.observe_pass(gm, "pamm_compat_test"):
        gm.graph.lint()
    with _compat.python_dispatcher():
        assert torch.ones(2).add(1).tolist() == [2.0, 2.0]


def test_compile_entry_points_and_explain_backend() -> None:
    def f(x: torch.Tensor) -> tuple[torch.Tensor]:
        return ((x.sin() * 2).sum(),)

    x = torch.randn(4, requires_grad=True)
    gm = torch.fx.symbolic_trace(f)
    assert torch.allclose(_compat.aot_eager_compile(gm, [x], {})(x)[0], f(x)[0])
    # The decompositions passed are the ones Inductor traces with (here: sin written as cos, to see it).
    cos_for_sin = {torch.ops.aten.sin.default: lambda t: torch.ops.aten.cos.default(t)}
    gm = torch.fx.symbolic_trace(f)
    assert torch.allclose(_compat.inductor_compile(gm, [x], {}, cos_for_sin)(x)[0], (x.cos() * 2).sum())
    assert torch.ops.aten.addmm.default in _compat.inductor_decompositions({})
    wrapped = _compat.explain_backend(lambda gm, example_inputs: gm.forward)

    def broken(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    torch.compile(broken, backend=wrapped)(torch.ones(1))
    assert wrapped.break_reasons


def _private_torch_uses(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every ``torch.a.b`` chain in code (not strings or comments) with a private part."""
    import io
    import tokenize

    toks = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type in (tokenize.NAME, tokenize.OP)]
    uses = []
    for i, tok in enumerate(toks):
        if tok.string != "torch" or (i and toks[i - 1].string == "."):
            continue
        chain, j = ["torch"], i + 1
        while j + 1 < len(toks) and toks[j].string == "." and toks[j + 1].type == tokenize.NAME:
            chain.append(toks[j + 1].string)
            j += 2
        if any(part.startswith("_") and not part.startswith("__") for part in chain[1:]):
            uses.append((tok.start[0], ".".join(chain)))
    return uses


#: Modules besides ``_compat.py`` allowed a private torch API, and why.
_PRIVATE_ALLOWED = {
    "demo/__main__.py": "the demo (not the library, imported by nothing in it) sets the documented "
                        "torch._functorch.config.activation_memory_budget knob the way users are told to",
}


def test_private_torch_apis_live_in_compat_only() -> None:
    from pathlib import Path

    import pamm_fx

    root = Path(pamm_fx.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel != "_compat.py" and rel not in _PRIVATE_ALLOWED and (uses := _private_torch_uses(path.read_text())):
            found[rel] = uses
    assert not found, f"private torch APIs outside pamm_fx/_compat.py (wrap them there): {found}"
    assert _private_torch_uses("import torch._dynamo\nx = torch.utils._pytree  # torch._y\ns = 'torch._z'") == [
        (1, "torch._dynamo"), (2, "torch.utils._pytree")]


def test_source_keyed_puts_our_sources_in_inductors_cache_key() -> None:
    """The hash of the package's sources is the uuid Inductor hashes into its FX graph cache key (so an upgrade
    never loads code compiled for old op schemas); a pass the user set still runs, and one without a key keeps
    Inductor's cache bypass."""
    import hashlib
    from pathlib import Path

    from torch._inductor.custom_graph_pass import CustomGraphPass

    import pamm_fx
    from pamm_fx.compiler import source_key

    root = Path(pamm_fx.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    assert source_key() == h.hexdigest()
    keyed = _compat.source_keyed({"max_autotune": False}, "k1")
    assert keyed["max_autotune"] is False and keyed["post_grad_custom_post_pass"].uuid() == ("k1", None)

    seen = []

    class Theirs(CustomGraphPass):
        def __call__(self, graph) -> None:
            seen.append(graph)

        def uuid(self) -> str:
            return "theirs"

    chained = _compat.source_keyed({"post_grad_custom_post_pass": Theirs()}, "k1")["post_grad_custom_post_pass"]
    chained("graph")
    assert seen == ["graph"] and chained.uuid() == ("k1", "theirs")
    keyless = _compat.source_keyed({"post_grad_custom_post_pass": lambda g: None}, "k1")
    assert keyless["post_grad_custom_post_pass"].uuid() is None


def test_dynamo_code_state_seen_counted_forgotten_and_compile_state_restored() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x.cos() + 1

    code = f.__code__
    state = _compat.dynamo_compile_state()
    torch.compile(f, backend="eager")(torch.randn(3))
    torch.compile(f, backend="aot_eager")(torch.randn(3))
    assert any(c is code for c in _compat.dynamo_seen_codes())
    assert _compat.cache_entry_count(code) == 2 and len(_compat.cache_entries(code)) == 2
    assert _compat.dynamo_compile_state() != state  # a frame id was taken, the backends kept alive
    _compat.forget_code(code)
    assert _compat.cache_entry_count(code) == 0 and _compat.cache_entries(code) == []
    _compat.restore_dynamo_compile_state(state)
    assert _compat.dynamo_compile_state() == state


def test_manual_seed_count_counts_every_torch_manual_seed() -> None:
    from torch import manual_seed  # imported before counting started: still counted

    before = _compat.manual_seed_count()
    torch.manual_seed(0)
    torch.random.manual_seed(0)
    manual_seed(0)
    assert _compat.manual_seed_count() == before + 3 and torch.initial_seed() == 0
    torch.default_generator.manual_seed(0)  # a generator's own method: not counted
    assert _compat.manual_seed_count() == before + 3
