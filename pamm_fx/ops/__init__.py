"""The ``pamm::`` custom ops, one module per primitive; importing this package registers them all.

* :mod:`pamm_fx.ops.compress`: ``pamm::compress`` samples generator rows of X and assigns
  every row to one (C, f, alpha); what the backward will need, computed in the forward. It owns the
  k formula (:class:`~pamm_fx.ops.compress.Generators`).
* :mod:`pamm_fx.ops.linear_group`: ``pamm::linear_group``, the exact forward of a group of
  projections whose backward saves the group's payload instead of X.
* :mod:`pamm_fx.ops.contract`: ``pamm::contract``, that backward's weight-gradient contraction.
* :mod:`pamm_fx.ops.lowbit`: ``pamm::quantize`` / ``pamm::dequant_weight_grad``, a low-bit payload (X,
  or PAMM's residual R = X - X~) and the weight gradient read from it.
* :mod:`pamm_fx.ops.noise`: ``pamm::stream_key`` / ``pamm::rotation_phases``, a per-call seed hashed once.

Each primitive is one op: its eager body runs the chunked reference on CPU or the Triton kernel on CUDA
(:class:`pamm_fx.kernels.device.Kernels`), and its decomposition (:mod:`pamm_fx.ops.decompositions`) is
what Inductor compiles on CPU. Each module owns its op's schema, fake kernel, decomposition, autograd,
flop formula and a dataclass of its arguments with ``emit`` (what the rewrite calls) and ``parse`` (what
the test helpers and reports read). The names below are the package's public API: ``compress`` and
``linear_group`` here are the ops (they shadow the submodules of the same name as attributes; import from
a submodule with ``from pamm_fx.ops.compress import ...``).
"""

from pamm_fx.ops.compress import compress, num_generators, record_compressions, sample_generators
from pamm_fx.ops.contract import contract
from pamm_fx.ops.linear_group import DoubleBackwardError, linear_group
from pamm_fx.ops.lowbit import dequant_weight_grad, quantize
from pamm_fx.ops.noise import rotation_phases, stream_key

__all__ = [
    "DoubleBackwardError",
    "compress",
    "contract",
    "dequant_weight_grad",
    "linear_group",
    "num_generators",
    "quantize",
    "record_compressions",
    "rotation_phases",
    "sample_generators",
    "stream_key",
]
