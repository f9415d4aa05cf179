"""torchdeq 0.1.0's API on deqkit: change the import, keep the code.

    from deqkit.compat.torchdeq import get_deq, apply_norm, fp_correction   # was: from torchdeq import ...

torchdeq need not be installed. Code that runs on torchdeq runs here with torchdeq's results;
what torchdeq silently ignores gets one ``TorchDEQCompatWarning`` naming the closest option;
what it crashes on or silently gets wrong raises or is fixed, the message naming what torchdeq
would have done. docs/migrating.md lists every difference.
"""

import sys as _sys

from . import loss as _loss, norm as _norm, solver as _solver, utils as _utils
from .core import DEQBase, DEQIndexing, DEQSliced, get_deq, register_deq, reset_deq
from .dropout import (VariationalDropout, VariationalDropout1d, VariationalDropout2d, VariationalDropout3d,
                      VariationalDropToken1d, VariationalDropToken2d, VariationalDropToken3d, reset_dropout)
from .grad import backward_factory
from .loss import fp_correction, jac_reg, power_method, register_weight_func
from .norm import apply_norm, register_norm, register_norm_module, remove_norm, reset_norm
from .solver import get_solver, register_solver, solver_stat_from_final_step
from .utils import DEQWrapper, TorchDEQCompatWarning, add_deq_args, deq_decorator, mem_gc, mixed_init

__all__ = [
    "DEQBase", "DEQIndexing", "DEQSliced", "DEQWrapper", "TorchDEQCompatWarning", "add_deq_args", "apply_norm",
    "backward_factory", "deq_decorator", "fp_correction", "get_deq", "get_solver", "jac_reg", "mem_gc", "mixed_init",
    "power_method", "register_deq", "register_norm", "register_norm_module", "register_solver", "register_weight_func",
    "remove_norm", "reset_deq", "reset_norm", "solver_stat_from_final_step", "VariationalDropout",
    "VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d", "VariationalDropToken1d",
    "VariationalDropToken2d", "VariationalDropToken3d", "reset_dropout",
]

# torchdeq splits some modules in files that programs import by path (``from
# torchdeq.utils.layer_utils import MDEQWrapper``, ``from torchdeq.solver.broyden import
# broyden_solver``): each of those paths names the one module here that holds its functions.
_FILES = {_solver: ("anderson", "broyden", "fp_iter", "stat"), _norm: ("base_norm", "spectral_norm", "weight_norm"),
          _loss: ("correction", "jacobian"), _utils: ("arg_utils", "config", "init", "layer_utils")}
for _module, _files in _FILES.items():
    for _file in _files:
        _sys.modules[f"{_module.__name__}.{_file}"] = _module
        setattr(_module, _file, _module)
