"""PAMM kernels, one module per primitive; each module's dispatcher picks Triton or the reference.

``assign`` (compression: nearest generator and scale per row) and ``contract`` (backward:
B~ = P^T dY) each hold their plain-torch reference, the form Inductor compiles and the
dispatcher; ``assign_triton`` / ``contract_triton`` hold the Triton kernels, imported by the
dispatchers only (lazily). :mod:`~pamm_fx.kernels.device` decides which implementation a tensor gets.
"""

from pamm_fx.kernels.device import has_triton, triton_dtype, use_triton

__all__ = ["has_triton", "triton_dtype", "use_triton"]
