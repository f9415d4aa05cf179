"""The names code outside the example imported from this module before it was split by topic.

The example's own modules import the topic modules: ``fileio`` (atomic writes, checksums,
JSON, ``log.jsonl``), ``checkpoints`` (verified checkpoints, older formats), ``locks``
(folder locks), ``config`` (the typed configuration layer), ``runtime`` (seeding, threads,
devices, torchrun) and ``images`` (sample grids).
"""

from __future__ import annotations

from .checkpoints import load_checkpoint, save_checkpoint
from .config import to_dict as config_to_dict

__all__ = ["load_checkpoint", "save_checkpoint", "config_to_dict"]
