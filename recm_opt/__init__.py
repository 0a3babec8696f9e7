"""recm_opt: Recurrent Equivariant Constraint Modulation as a PyTorch optimizer wrapper.

The public surface is ``__all__``: the optimizer, the tagging decorator and its reader,
the generating sets, the representations and export. Diagnostics (``symmetry_gap``,
``lipschitz_bound``, ...) live in :mod:`recm_opt.diagnostics` and the alternative
relaxation policies in :mod:`recm_opt.policies`; their names stay importable from the
package for existing code.
"""

from . import diagnostics, policies  # noqa: F401
from .diagnostics import coupling_gap, equivariance_error, lipschitz_bound, symmetry_gap  # noqa: F401
from .export import export, format_report, parameter_overhead  # noqa: F401
from .groups import (  # noqa: F401
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
from .policies import EquivarianceSchedule, ResidualPathwayPrior  # noqa: F401
from .reps import Custom, Invariant, Irreps, Permutation, Representation, Vector  # noqa: F401
from .tagging import get_relaxation, is_relaxed, relaxed  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "Custom",
    "CyclicGenerators",
    "DihedralGenerators",
    "Invariant",
    "Irreps",
    "O3Generators",
    "Permutation",
    "PermutationGenerators",
    "ProductGenerators",
    "RECMOptimizer",
    "SO2Generators",
    "SO3Generators",
    "Vector",
    "__version__",
    "export",
    "format_report",
    "get_relaxation",
    "relaxed",
]
