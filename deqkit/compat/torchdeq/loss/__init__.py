"""torchdeq's losses: fixed-point correction, Jacobian regularisation, the power method."""

from .correction import fp_correction, register_weight_func
from .jacobian import jac_reg, power_method

__all__ = ["fp_correction", "register_weight_func", "jac_reg", "power_method"]
