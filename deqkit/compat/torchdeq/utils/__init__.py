"""torchdeq's utilities: ``add_deq_args``, ``mixed_init``, ``mem_gc``, the state wrappers."""

from .arg_utils import add_deq_args
from .config import DEQConfig
from .init import mixed_init
from .layer_utils import DEQWrapper, MDEQWrapper, deq_decorator
from .mem import mem_gc

__all__ = ["add_deq_args", "DEQConfig", "mixed_init", "mem_gc", "DEQWrapper", "MDEQWrapper", "deq_decorator"]
