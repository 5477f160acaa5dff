"""Adafactor in plain MLX ops: the implementation the fused step falls back
to, and the oracle of the tests.

The ops are built by the extension (csrc/op/reference.cpp, NOTE:
[reference]): the same function is the step on streams without fused kernels
and gives the fused primitive its derivatives. It is stock's
``mlx.optimizers.Adafactor.apply_single`` with every intermediate in float32
(float64 for float64 parameters) and this package's state layout (second
moment in float32, or float64 for float64 parameters; ``exp_avg`` in the
parameter dtype).
"""

from typing import Dict, Tuple

import mlx.core as mx

from ._build import ext as _ext


def adafactor_reference(
    step: mx.array,
    learning_rate: mx.array,
    parameter: mx.array,
    gradient: mx.array,
    state: Dict[str, mx.array],
    **options,
) -> Tuple[mx.array, Dict[str, mx.array]]:
    """One Adafactor step of one tensor; ``step`` is the new (1-based) count
    and ``options`` are those of :class:`mlx_fused_adafactor.Adafactor`
    (defaults included; ``learning_rate`` is the argument above).

    Returns the new parameter and a new state dict; ``state`` is not
    modified.
    """
    from .optimizer import hyper_parameters

    if "learning_rate" not in options and not options.get("relative_step", True):
        options["learning_rate"] = learning_rate
    hyper = hyper_parameters(**options)
    return _ext.reference(
        mx.array(step), mx.array(learning_rate), parameter, gradient, state, hyper
    )
