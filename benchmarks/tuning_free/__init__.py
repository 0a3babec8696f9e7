"""RECM at its defaults against a grid of ``a`` and RECM's step size (``python -m benchmarks.tuning_free``)."""
