"""recm_opt: Recurrent Equivariant Constraint Modulation as a PyTorch optimizer wrapper."""

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
from .reps import Custom, Invariant, Irreps, Permutation, Representation, Vector
from .tagging import get_relaxation, is_relaxed, relaxed

__version__ = "0.1.0"

__all__ = [
    "CyclicGenerators",
    "Custom",
    "DihedralGenerators",
    "Group",
    "Invariant",
    "Irreps",
    "O3Generators",
    "Permutation",
    "PermutationGenerators",
    "ProductGenerators",
    "RECMOptimizer",
    "Representation",
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
