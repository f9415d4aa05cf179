"""torchdeq 0.1.0's API on deqkit: change the import, keep the code.

    from deqkit.compat.torchdeq import get_deq, apply_norm, fp_correction   # was: from torchdeq import ...

torchdeq need not be installed. Code that runs on torchdeq runs here with torchdeq's numbers:
the layer (``get_deq``, both cores, phantom and implicit gradients, ``n_states``/``indexing``/
``sup_gap``/``sup_loc``, train and eval), its solvers and statistics (ported: their numbers
are torchdeq's; every solve goes through deqkit's record of a torchdeq-style run),
``add_deq_args``, weight and spectral norm with torchdeq's parameter names,
``fp_correction``, ``jac_reg``, ``power_method``, variational dropout, ``mem_gc`` and
``mixed_init``. What torchdeq ignores silently (a misspelt option, a keyword nobody reads)
gets one ``TorchDEQCompatWarning`` naming the closest option; what it gets silently wrong or
crashes on is fixed or refused with an error naming what torchdeq would have done. Every
difference is listed in docs/migrating.md.
"""

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
