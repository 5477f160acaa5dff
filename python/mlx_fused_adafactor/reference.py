"""Adafactor in plain MLX ops, all arithmetic in float32.

The same math as the fused kernels (kernels/adafactor_math.h), written as MLX
ops: the fallback path on GPU streams that have no compiled kernel (MLX's CUDA
backend), and an oracle for the tests. It is the stock
``mlx.optimizers.Adafactor.apply_single`` with every intermediate in float32
and the state layout of this package (second-moment state in float32,
``exp_avg`` in the parameter dtype).
"""

from typing import Dict, Optional, Tuple

import mlx.core as mx


def adafactor_reference(
    step: mx.array,
    learning_rate: mx.array,
    parameter: mx.array,
    gradient: mx.array,
    state: Dict[str, mx.array],
    *,
    eps: Tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta_1: Optional[float] = None,
    weight_decay: float = 0.0,
    scale_parameter: bool = True,
    relative_step: bool = True,
    warmup_init: bool = False,
) -> Tuple[mx.array, Dict[str, mx.array]]:
    """One Adafactor step of one tensor; ``step`` is the new (1-based) count.

    Returns the new parameter and a new state dict; ``state`` is not modified.
    """
    f32 = mx.float32
    t = step.astype(f32)
    p = parameter.astype(f32)
    g = gradient.astype(f32)
    new_state = {}

    beta_2 = 1.0 - mx.power(t, mx.array(decay_rate, f32))
    one_minus_beta_2 = 1.0 - beta_2
    if relative_step:
        min_step = 1e-6 * t if warmup_init else mx.array(1e-2, f32)
        rel_step = mx.minimum(min_step, mx.rsqrt(t))
    else:
        rel_step = learning_rate.astype(f32)
    if scale_parameter:
        lr = mx.maximum(eps[1], mx.sqrt(mx.mean(mx.square(p)))) * rel_step
    else:
        lr = rel_step

    update = mx.square(g) + eps[0]
    if parameter.ndim >= 2:
        row = state["exp_avg_sq_row"].astype(f32)
        col = state["exp_avg_sq_col"].astype(f32)
        row = beta_2 * row + one_minus_beta_2 * mx.mean(update, axis=-1)
        col = beta_2 * col + one_minus_beta_2 * mx.mean(update, axis=-2)
        new_state["exp_avg_sq_row"] = row
        new_state["exp_avg_sq_col"] = col
        r_factor = mx.rsqrt(row / mx.mean(row, axis=-1, keepdims=True))
        c_factor = mx.rsqrt(col)
        update = (mx.expand_dims(r_factor, -1) * mx.expand_dims(c_factor, -2)) * g
    else:
        sq = state["exp_avg_sq"].astype(f32)
        sq = beta_2 * sq + one_minus_beta_2 * update
        new_state["exp_avg_sq"] = sq
        update = mx.rsqrt(sq) * g

    rms_u = mx.sqrt(mx.mean(mx.square(update)))
    update = lr * (update / mx.maximum(1.0, rms_u / clip_threshold))

    if beta_1 is not None:
        m = state["exp_avg"].astype(f32)
        m = beta_1 * m + (1 - beta_1) * update
        new_state["exp_avg"] = m.astype(parameter.dtype)
        update = m
    if weight_decay != 0:
        p = p + p * (-weight_decay * lr)
    return (p - update).astype(parameter.dtype), new_state
