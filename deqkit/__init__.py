"""deqkit: deep equilibrium models in PyTorch.

Solve ``z* = f(z*, x)`` with pluggable solvers and differentiate through it with pluggable
backward modes::

    import deqkit
    sol = deqkit.fixed_point(f, z0, solver=deqkit.Anderson(m=5), backward=deqkit.Implicit())
    sol.value, sol.result, sol.stats.nfev
"""

from . import nn, solvers
from ._compile import Compiled, compiled
from ._backward import AbstractBackward, Implicit, OneStep, Phantom, Unrolled
from ._options import SolveOptions
from ._result import BackwardLog, BackwardStats, Result, Solution, SolveError, Stats
from ._module import DEQ
from ._monitor import Monitor, SolveRecord, Trend, read_records, solve_trend, summarize_solves
from ._adaptive import AdaptiveJacobianWeight
from ._regularization import JacobianReg, jacobian_reg, spectral_radius
from ._solve import fixed_point
from ._supervision import fp_correction, fp_weights
from .solvers import AbstractSolver, Anderson, Broyden, Fallback, FixedPoint, NewtonKrylov, TorchDEQSolver

__version__ = "0.1.0"

__all__ = [
    "AbstractBackward",
    "AdaptiveJacobianWeight",
    "AbstractSolver",
    "Anderson",
    "BackwardLog",
    "BackwardStats",
    "Compiled",
    "DEQ",
    "JacobianReg",
    "Monitor",
    "Broyden",
    "Fallback",
    "FixedPoint",
    "Implicit",
    "NewtonKrylov",
    "OneStep",
    "Phantom",
    "Result",
    "Solution",
    "SolveError",
    "SolveOptions",
    "SolveRecord",
    "Stats",
    "TorchDEQSolver",
    "Trend",
    "Unrolled",
    "compiled",
    "fixed_point",
    "fp_correction",
    "fp_weights",
    "jacobian_reg",
    "nn",
    "read_records",
    "solve_trend",
    "solvers",
    "spectral_radius",
    "summarize_solves",
]
