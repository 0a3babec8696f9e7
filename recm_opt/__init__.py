"""recm_opt: Recurrent Equivariant Constraint Modulation as a PyTorch optimizer wrapper."""

from .diagnostics import coupling_gap, equivariance_error, lipschitz_bound, symmetry_gap
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
from .optimizer import RECMOptimizer
from .policies import EquivarianceSchedule, ResidualPathwayPrior
from .reps import Custom, Invariant, Irreps, Permutation, Representation, Vector
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
    "RECMOptimizer",
    "Representation",
    "ResidualPathwayPrior",
    "SO2Generators",
    "SO3Generators",
    "Vector",
    "__version__",
    "coupling_gap",
    "equivariance_error",
    "export",
    "format_report",
    "get_relaxation",
    "is_relaxed",
    "lipschitz_bound",
    "parameter_overhead",
    "relaxed",
    "symmetry_gap",
]
