"""recm_opt: Recurrent Equivariant Constraint Modulation as a PyTorch optimizer wrapper.

The public surface is ``__all__``: the optimizer and the alternative relaxation policies
(:mod:`recm_opt.policies`), the tagging decorator and its readers, the generating sets and
their protocol, the representations, export and the reports.
Diagnostics (``symmetry_gap``, ``lipschitz_bound``, ...) live in :mod:`recm_opt.diagnostics`;
their names stay importable from the package for existing code.
"""

from . import diagnostics, policies  # noqa: F401
from .diagnostics import coupling_gap, equivariance_error, lipschitz_bound, symmetry_gap  # noqa: F401
from .export import export, format_report, parameter_overhead
from .groups import (
    CyclicGenerators,
    DihedralGenerators,
    Group,
    O3Generators,
    PermutationGenerators,
    ProductGenerators,
    SO2Generators,
    SO3Generators,
)
from .optimizer import RECMConfig, RECMOptimizer
from .policies import EquivarianceSchedule, ResidualPathwayPrior
from .reps import Custom, Invariant, Irreps, Permutation, Representation, Vector  # noqa: F401
from .tagging import get_relaxation, is_relaxed, relaxed

__version__ = "0.1.0"

__all__ = [
    "Custom",
    "CyclicGenerators",
    "DihedralGenerators",
    "EquivarianceSchedule",
    "Group",
    "Invariant",
    "Irreps",
    "O3Generators",
    "Permutation",
    "PermutationGenerators",
    "ProductGenerators",
    "RECMConfig",
    "RECMOptimizer",
    "ResidualPathwayPrior",
    "SO2Generators",
    "SO3Generators",
    "Vector",
    "__version__",
    "export",
    "format_report",
    "get_relaxation",
    "is_relaxed",
    "parameter_overhead",
    "relaxed",
]
