"""The ``pamm::`` custom ops, one module per primitive; importing this package registers them all.

* :mod:`pamm_fx.ops.compress`: ``pamm::compress`` samples generator rows of X and assigns
  every row to one (C, f, alpha); what the backward will need, computed in the forward.
* :mod:`pamm_fx.ops.linear_group`: ``pamm::linear_group``, the exact forward of a group of
  projections whose backward saves C, f, alpha instead of X.
* :mod:`pamm_fx.ops.contract`: ``pamm::contract``, that backward's weight-gradient contraction.
* :mod:`pamm_fx.ops.residual`: ``pamm::quantize_residual`` / ``pamm::residual_weight_grad``, the
  low-bit residual R = X - X~ that ``estimator="pamm_sr"`` adds to the compression, or X itself
  without a base under ``estimator="sr"`` (unbiased dW either way).

Each module owns its op's schema, fake kernel, decomposition, autograd, flop formula and a
dataclass of its arguments with ``emit`` (what the rewrite calls) and ``parse`` (what the test
helpers and reports read). The names below are the package's public API as before the split:
``compress`` and ``linear_group`` here are the ops (they shadow the submodules of the same name
as attributes; import from a submodule with ``from pamm_fx.ops.compress import ...``).
"""

from pamm_fx.config import num_generators
from pamm_fx.ops.compress import compress, record_compressions, sample_generators
from pamm_fx.ops.contract import contract
from pamm_fx.ops.linear_group import DoubleBackwardError, linear_group
from pamm_fx.ops.residual import quantize_residual, residual_weight_grad

__all__ = [
    "DoubleBackwardError",
    "compress",
    "contract",
    "linear_group",
    "num_generators",
    "quantize_residual",
    "record_compressions",
    "residual_weight_grad",
    "sample_generators",
]
