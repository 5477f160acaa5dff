"""The stock Adafactor math in numpy float64: the oracle of the numerics tests.

``mlx.optimizers.Adafactor.apply_single`` transcribed line by line, with every
intermediate in float64 and no rounding to the parameter dtype. Both the
fused optimizer and the stock one are measured against it: in float32 for the
shapes where stock's own float32 reductions drift, and in bfloat16/float16 for
the flash-attention criterion (the fused error must not exceed stock's).
"""

import math
import warnings

import numpy as np

DEFAULTS = dict(
    learning_rate=None,
    eps=(1e-30, 1e-3),
    clip_threshold=1.0,
    decay_rate=-0.8,
    beta_1=None,
    weight_decay=0.0,
    scale_parameter=True,
    relative_step=True,
    warmup_init=False,
)


def _mean(x, axis=None, keepdims=False):
    # Empty axes give NaN, as mx.mean does.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.mean(x, axis=axis, keepdims=keepdims)


def init_state64(shape, beta_1=None):
    """The stock state layout, in float64 zeros."""
    shape = tuple(shape)
    if len(shape) >= 2:
        state = {
            "exp_avg_sq_row": np.zeros(shape[:-1]),
            "exp_avg_sq_col": np.zeros(shape[:-2] + shape[-1:]),
        }
    else:
        state = {"exp_avg_sq": np.zeros(shape)}
    if beta_1 is not None:
        state["exp_avg"] = np.zeros(shape)
    return state


def step64(t, lr, p, g, state, **options):
    """One step of one tensor; ``t`` is the new (1-based) step count and
    ``lr`` the learning rate stock would read this step (the schedule at
    ``t - 1``). Returns the new parameter and a new state dict."""
    o = dict(DEFAULTS, **options)
    eps1, eps2 = o["eps"]
    p = np.asarray(p, np.float64)
    g = np.asarray(g, np.float64)
    t = float(t)
    with np.errstate(all="ignore"):
        if o["relative_step"]:
            min_step = 1e-6 * t if o["warmup_init"] else 1e-2
            rel_step = min(min_step, 1.0 / math.sqrt(t))
        else:
            rel_step = float(lr)
        if o["scale_parameter"]:
            lr_t = max(eps2, np.sqrt(_mean(np.square(p)))) * rel_step
        else:
            lr_t = rel_step
        beta_2 = 1.0 - t ** o["decay_rate"]
        update = np.square(g) + eps1
        new = {}
        if p.ndim >= 2:
            row = beta_2 * state["exp_avg_sq_row"] + (1 - beta_2) * _mean(update, -1)
            col = beta_2 * state["exp_avg_sq_col"] + (1 - beta_2) * _mean(update, -2)
            new["exp_avg_sq_row"] = row
            new["exp_avg_sq_col"] = col
            r = 1.0 / np.sqrt(row / _mean(row, -1, keepdims=True))
            c = 1.0 / np.sqrt(col)
            update = (r[..., :, None] * c[..., None, :]) * g
        else:
            sq = beta_2 * state["exp_avg_sq"] + (1 - beta_2) * update
            new["exp_avg_sq"] = sq
            update = g / np.sqrt(sq)
        rms_u = np.sqrt(_mean(np.square(update)))
        update = update / np.maximum(1.0, rms_u / o["clip_threshold"])
        update = lr_t * update
        if o["beta_1"] is not None:
            b1 = o["beta_1"]
            # one_minus_beta_1: 1 - beta_1 as a caller rounded it.
            m = b1 * state["exp_avg"] + o.get("one_minus_beta_1", 1 - b1) * update
            new["exp_avg"] = m
            update = m
        if o["weight_decay"] != 0:
            p = p + p * (-o["weight_decay"] * lr_t)
        return p - update, new


def run64(p0, grads, lrs=None, state=None, t0=0, round_fn=None, peak=None, **options):
    """Run ``len(grads)`` steps from ``p0`` (and ``state``, stock zeros by
    default) starting after step ``t0``; ``lrs[i]`` is the learning rate of
    step i. With ``round_fn``, the parameter and ``exp_avg`` are passed
    through it after every step (the storage rounding of the fused
    contract). With a dict ``peak``, it receives the elementwise maximum of
    |p| and |exp_avg| over the run (start included). Returns the final
    parameter and state."""
    p = np.asarray(p0, np.float64)
    if peak is not None:
        peak["p"] = np.abs(p)
    if state is None:
        state = init_state64(p.shape, options.get("beta_1"))
    else:
        state = {k: np.asarray(v, np.float64) for k, v in state.items()}
    for i, g in enumerate(grads):
        lr = None if lrs is None else lrs[i]
        p, state = step64(t0 + i + 1, lr, p, g, state, **options)
        if round_fn is not None:
            p = round_fn(p)
            if "exp_avg" in state:
                state["exp_avg"] = round_fn(state["exp_avg"])
        if peak is not None:
            for key, value in (("p", p), ("exp_avg", state.get("exp_avg"))):
                if value is not None:
                    peak[key] = np.maximum(peak.get(key, np.abs(value)), np.abs(value))
    return p, state
