"""``python -m benchmarks.symmetry_gap``: see :mod:`benchmarks.symmetry_gap.sweep`."""

from .sweep import main

main()
