"""The demo and what it is built from: a LLaMA-style model, a stdlib-docstring corpus, a saved-bytes meter.

Kept out of the library namespace: the backend imports none of it. ``python -m pamm_fx.demo``
runs :mod:`pamm_fx.demo.__main__`; tests and benchmarks import the pieces from here.
"""
