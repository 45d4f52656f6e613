"""Graph passes, applied in order (:func:`pamm_fx.plan.plan`, then :func:`pamm_fx.plan.apply`): mha ->
normalize -> unrecognised (a report-only scan) -> match (structure's candidates, then the checks) -> rewrite.
``categories`` declares every category they report. No pass imports a later one (``tests/test_layers.py``)."""
