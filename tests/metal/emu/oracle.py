"""Oracles of the kernel tests: the fused CPU step, stock MLX Adafactor, and
a float64 NumPy transcription of the reference (csrc/op/reference.cpp)."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_fused_adafactor._build import ext


def init_state(shape, momentum, dtype):
    shape = tuple(shape)
    if len(shape) >= 2:
        st = [mx.zeros(shape[:-1]), mx.zeros(shape[:-2] + shape[-1:])]
    else:
        st = [mx.zeros(shape)]
    if momentum:
        st.append(mx.zeros(shape, dtype=dtype))
    return st


def cpu_step(step, lr, params, grads, states, hyper):
    """The fused CPU step (csrc/cpu), through the entry the optimizer uses;
    states are lists in slot order, as the emulator takes them."""
    keys = [list(ext.init_state(p, hyper)) for p in params]
    with mx.stream(mx.cpu):
        new_params, new_dicts = ext.apply_leaves(
            mx.array(step, mx.float32), mx.array(lr, mx.float32), params,
            grads, [dict(zip(k, st)) for k, st in zip(keys, states)],
            [f"t{i}" for i in range(len(params))], hyper,
        )
        mx.eval(new_params, new_dicts)
    return new_params, [[d[x] for x in k] for k, d in zip(keys, new_dicts)]


def stock_optimizer(options):
    kw = dict(options)
    lr = kw.pop("learning_rate", None)
    return optim.Adafactor(learning_rate=lr, **kw)


def ref64_step(step, lr, p, g, state, eps=(1e-30, 1e-3), clip_threshold=1.0,
               decay_rate=-0.8, beta_1=None, weight_decay=0.0,
               scale_parameter=True, relative_step=True, warmup_init=False,
               learning_rate=None):
    """One step in float64 on NumPy arrays; returns (p, state list)."""
    t = float(step)
    p = p.astype(np.float64)
    g = g.astype(np.float64)
    beta2 = 1.0 - t ** decay_rate
    if relative_step:
        min_step = 1e-6 * t if warmup_init else 1e-2
        rel = min(min_step, 1.0 / np.sqrt(t))
    else:
        rel = lr
    if scale_parameter:
        lr_t = max(eps[1], np.sqrt(np.mean(p * p))) * rel
    else:
        lr_t = rel
    upd = g * g + eps[0]
    new = []
    if p.ndim >= 2:
        row = beta2 * state[0] + (1 - beta2) * upd.mean(axis=-1)
        col = beta2 * state[1] + (1 - beta2) * upd.mean(axis=-2)
        new += [row, col]
        rf = 1.0 / np.sqrt(row / row.mean(axis=-1, keepdims=True))
        cf = 1.0 / np.sqrt(col)
        u = rf[..., :, None] * cf[..., None, :] * g
    else:
        sq = beta2 * state[0] + (1 - beta2) * upd
        new.append(sq)
        u = g / np.sqrt(sq)
    rms = np.sqrt(np.mean(u * u))
    u = lr_t * (u / max(1.0, rms / clip_threshold))
    if beta_1 is not None:
        m = beta_1 * state[-1] + (1 - beta_1) * u
        new.append(m)
        u = m
    if weight_decay != 0:
        p = p + p * (-weight_decay * lr_t)
    return p - u, new
