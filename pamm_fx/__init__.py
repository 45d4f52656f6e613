"""pamm-fx: PAMM activation compression for Q/K/V projections as a torch.compile backend.

``torch.compile(model, backend="pamm")`` is all a user needs; the backend is
registered through the ``torch_dynamo_backends`` entry point. Importing this
package also registers the ``pamm::`` custom ops.
"""

from pamm_fx import ops
from pamm_fx.compiler import PammBackend, backend, counters, pamm_backend
from pamm_fx.config import PammConfig
from pamm_fx.explain import explain

__all__ = ["PammConfig", "PammBackend", "backend", "counters", "explain", "ops", "pamm_backend"]
__version__ = "0.1.0"
