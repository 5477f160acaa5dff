"""Fused Adafactor for MLX: a drop-in replacement for ``mlx.optimizers.Adafactor``.

>>> from mlx_fused_adafactor import Adafactor
>>> optimizer = Adafactor()  # same arguments as mlx.optimizers.Adafactor
"""

from ._build import ext as _ext
from .backend import backend, current_backend
from .checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from .optimizer import Adafactor
from .patch import is_patched, patch_mlx, unpatch_mlx
from .reference import adafactor_reference

__version__ = "0.1.0"
MLX_BUILD_VERSION = _ext.mlx_build_version

__all__ = [
    "Adafactor",
    "adafactor_reference",
    "backend",
    "current_backend",
    "MLX_BUILD_VERSION",
    "patch_mlx",
    "unpatch_mlx",
    "is_patched",
    "save_checkpoint",
    "load_checkpoint",
    "load_optimizer_state",
]
