"""RECM's cost per training step: wall-clock and memory (``run``), aten ops by phase (``ops``), GPU checks."""
