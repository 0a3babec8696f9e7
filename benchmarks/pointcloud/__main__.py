"""``python -m benchmarks.pointcloud``: see :mod:`benchmarks.pointcloud.experiment`."""

from .experiment import main

main()
