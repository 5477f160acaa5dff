"""Opt-in: make ``mlx.optimizers.Adafactor`` this package's class.

Third-party code that looks the optimizer up when it runs (mlx-lm's ``lora``
entry point does ``optim.Adafactor(...)``) picks up the fused class after

>>> import mlx_fused_adafactor
>>> mlx_fused_adafactor.patch_mlx()

and stock again after :func:`unpatch_mlx` (or ``handle.undo()``). The patch
also works as a context manager:

>>> with mlx_fused_adafactor.patch_mlx():
...     run_third_party_training()

Only the module attributes change. Code that bound the class before the patch
(``from mlx.optimizers import Adafactor`` at its import time) keeps the stock
class, and optimizers already built stay what they are.
"""

import mlx.optimizers
import mlx.optimizers.optimizers

from .optimizer import Adafactor

# The modules whose ``Adafactor`` attribute is replaced.
_MODULES = (mlx.optimizers, mlx.optimizers.optimizers)

# The stock class, as it was when this module was first imported.
STOCK_ADAFACTOR = mlx.optimizers.optimizers.Adafactor


class MlxPatch:
    """Undo handle returned by :func:`patch_mlx`; also a context manager.

    ``undo()`` puts back what the patched attributes held when this patch was
    made, so nested patches unwind in order. It is idempotent.
    """

    def __init__(self, saved):
        self._saved = saved
        self._active = True

    @property
    def active(self):
        return self._active

    def undo(self):
        if self._active:
            for module, previous in self._saved:
                module.Adafactor = previous
            self._active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def __repr__(self):
        state = "active" if self._active else "undone"
        return f"<mlx_fused_adafactor.MlxPatch {state}>"


def patch_mlx():
    """Set ``mlx.optimizers.Adafactor`` (and
    ``mlx.optimizers.optimizers.Adafactor``) to the fused class.

    Returns an :class:`MlxPatch` whose ``undo()`` restores the previous
    classes; use it as ``with patch_mlx(): ...`` to scope the patch.
    """
    saved = [(module, module.Adafactor) for module in _MODULES]
    for module in _MODULES:
        module.Adafactor = Adafactor
    return MlxPatch(saved)


def unpatch_mlx():
    """Restore stock ``mlx.optimizers.Adafactor`` whatever patches are active."""
    for module in _MODULES:
        module.Adafactor = STOCK_ADAFACTOR


def is_patched():
    """True when ``mlx.optimizers.Adafactor`` is this package's class."""
    return mlx.optimizers.Adafactor is Adafactor
