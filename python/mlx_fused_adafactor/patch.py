"""Opt-in: make ``mlx.optimizers.Adafactor`` this package's class.

Third-party code that looks the optimizer up when it runs (mlx-lm's ``lora``
entry point does ``optim.Adafactor(...)``) picks up the fused class after

>>> import mlx_fused_adafactor
>>> mlx_fused_adafactor.patch_mlx()

and stock again after :func:`unpatch_mlx` (or ``handle.undo()`` of every
handle, in any order: NOTE: [patch handles]). The patch also works as a
context manager:

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


# The active patches, oldest first (NOTE: [patch handles]).
_ACTIVE = []


class MlxPatch:
    """Undo handle returned by :func:`patch_mlx`; also a context manager.

    NOTE: [patch handles]
    Each handle holds what the patched attributes held before it. Undoing
    the newest active handle puts that back. Undoing an older one while
    newer ones are active leaves the patch in place (they still hold it) and
    hands its saved values to the next newer handle, so whatever the order
    of the undos, the last one restores what was there before the first
    patch. A handle is active until its ``undo()`` (or :func:`unpatch_mlx`),
    and the patch is in place while any handle is active. ``undo()`` is
    idempotent.
    """

    def __init__(self, saved):
        self._saved = saved

    @property
    def active(self):
        return any(h is self for h in _ACTIVE)

    def undo(self):
        for i, handle in enumerate(_ACTIVE):
            if handle is self:
                break
        else:
            return
        if i == len(_ACTIVE) - 1:
            for module, previous in self._saved:
                module.Adafactor = previous
        else:
            _ACTIVE[i + 1]._saved = self._saved
        del _ACTIVE[i]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def __repr__(self):
        state = "active" if self.active else "undone"
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
    handle = MlxPatch(saved)
    _ACTIVE.append(handle)
    return handle


def unpatch_mlx():
    """Restore stock ``mlx.optimizers.Adafactor`` whatever patches are
    active; every handle is then undone."""
    for module in _MODULES:
        module.Adafactor = STOCK_ADAFACTOR
    _ACTIVE.clear()


def is_patched():
    """True when ``mlx.optimizers.Adafactor`` is this package's class."""
    return mlx.optimizers.Adafactor is Adafactor
