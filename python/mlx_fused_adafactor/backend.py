"""Which implementation runs the step (NOTE: [backend] in
csrc/op/backend.h).

``MLX_FUSED_ADAFACTOR_BACKEND`` sets it for the process (``auto``, the
default; ``fused``; ``reference``), and :func:`backend` for a scope:

>>> with mlx_fused_adafactor.backend("reference"):
...     mx.export_function("step.mlxfn", train_step, *args)

``reference`` builds the step from plain MLX ops, which anything that handles
MLX graphs can take (``mx.export_function`` among them); ``fused`` raises
where there are no fused kernels instead of falling back.
"""

import contextlib

from ._build import ext as _ext


def current_backend() -> str:
    """The backend in force: ``auto``, ``fused`` or ``reference``."""
    return _ext.backend()


@contextlib.contextmanager
def backend(name: str):
    """Run the steps built inside the ``with`` block on backend ``name``."""
    previous = _ext.set_backend(name)
    try:
        yield
    finally:
        _ext.set_backend(previous)
