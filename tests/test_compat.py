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
