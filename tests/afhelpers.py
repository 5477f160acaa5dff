"""Helpers shared by the test modules: inputs, the three ways of running an
optimizer (stock, fused eager, fused under mx.compile), comparisons, and
snapshots for the nothing-half-updated checks."""

from functools import partial

import mlx.core as mx
import mlx.optimizers.optimizers as _stock_module
import numpy as np
from mlx.utils import tree_flatten

from mlx_fused_adafactor import Adafactor


def _stock_class():
    # mlx_fused_adafactor.patch_mlx() may have replaced the module attribute;
    # the stock class is the Optimizer subclass defined in mlx itself.
    for cls in _stock_module.Optimizer.__subclasses__():
        if cls.__name__ == "Adafactor" and cls.__module__ == _stock_module.__name__:
            return cls
    raise RuntimeError("stock mlx.optimizers.Adafactor not found")


StockAdafactor = _stock_class()

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def to64(x):
    """An mx.array (any float dtype) as a float64 numpy array."""
    if x.dtype in (mx.bfloat16, mx.float16):
        x = x.astype(mx.float32)
    if x.dtype == mx.complex64:
        # (real, imag) pairs, for the unchanged-state checks.
        return np.array(x).view(np.float32).astype(np.float64)
    return np.array(x).astype(np.float64)


# Mantissa bits (with the implicit one) and smallest normal exponent.
MANTISSA = {"bfloat16": 8, "float16": 11, "float32": 24}
MIN_EXP = {"bfloat16": -126, "float16": -14, "float32": -126}


def ulp(x, dtype_name):
    """Spacing of the dtype at |x| (elementwise, numpy float64)."""
    x = np.abs(np.asarray(x, np.float64))
    e = np.floor(np.log2(np.maximum(x, 2.0 ** MIN_EXP[dtype_name])))
    return 2.0 ** (e - (MANTISSA[dtype_name] - 1))


def rand(shape, seed, dtype=mx.float32, scale=1.0):
    x = scale * mx.random.normal(shape, key=mx.random.key(seed))
    return x.astype(dtype)


def grad_seq(shape, n, seed, dtype=mx.float32):
    """``n`` gradients with per-row and per-column scales that differ, so the
    factored statistics are not all alike."""
    out = []
    shape = tuple(shape)
    scale = 1.0
    if len(shape) >= 2:
        rows = mx.exp(rand(shape[:-1] + (1,), seed + 7, scale=0.7))
        cols = mx.exp(rand(shape[:-2] + (1,) + shape[-1:], seed + 11, scale=0.7))
        scale = rows * cols
    for i in range(n):
        out.append((scale * rand(shape, seed * 1000 + i)).astype(dtype))
    return out


def make(kind, **kwargs):
    """A stock or a fused Adafactor with the given constructor options."""
    cls = StockAdafactor if kind == "stock" else Adafactor
    return cls(**kwargs)


def run(opt, params, grads, compiled=False):
    """Apply ``grads`` (a list of trees) one after the other with
    ``apply_gradients``; with ``compiled`` each step runs inside an impure
    mx.compile (the fused lazy primitive path). Returns the final params."""
    if compiled:
        opt.init(params)
        state = opt.state

        @partial(mx.compile, inputs=state, outputs=state)
        def step(p, g):
            return opt.apply_gradients(g, p)

    else:
        step = lambda p, g: opt.apply_gradients(g, p)  # noqa: E731
    for g in grads:
        params = step(params, g)
        mx.eval(params, opt.state)
    return params


def flat(tree):
    """{path: float64 numpy array} of a tree of arrays."""
    return {k: to64(v) for k, v in tree_flatten(tree)}


def max_err(a, b):
    """max |a - b| with NaN == NaN (a NaN on one side only is an infinite
    error)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return np.inf
    same_inf = np.isinf(a) & (a == b)
    ok = ~nan_a & ~same_inf
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(a[ok] - b[ok])))


def max_abs(a):
    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a)]
    return float(np.max(np.abs(a))) if a.size else 0.0


def assert_close_to_max(actual, expected, tol, what=""):
    """|actual - expected| <= tol * max|expected| elementwise (NaN-equal)."""
    err = max_err(actual, expected)
    bound = tol * max_abs(expected)
    assert err <= bound, f"{what}: max error {err:.3g} > {tol:g} * max|x| = {bound:.3g}"


def assert_trees_close(actual, expected, tol, what=""):
    fa, fe = flat(actual), flat(expected)
    assert sorted(fa) == sorted(fe), (what, sorted(fa), sorted(fe))
    for k in fe:
        assert_close_to_max(fa[k], fe[k], tol, f"{what} {k}")


def assert_trees_equal(actual, expected, what=""):
    """Bitwise equality (NaN-equal), same dtypes."""
    la, le = dict(tree_flatten(actual)), dict(tree_flatten(expected))
    assert sorted(la) == sorted(le), (what, sorted(la), sorted(le))
    for k, e in le.items():
        a = la[k]
        assert a.dtype == e.dtype and a.shape == e.shape, (what, k)
        na = np.array(a.view(mx.uint16) if a.itemsize == 2 else a)
        ne = np.array(e.view(mx.uint16) if e.itemsize == 2 else e)
        na, ne = np.atleast_1d(na), np.atleast_1d(ne)
        assert np.array_equal(na.view(np.uint8), ne.view(np.uint8)), f"{what} {k}"


def snapshot(params, opt):
    """Copies of every parameter and every state entry (with the step)."""
    return flat(params), flat(opt.state)


def assert_unchanged(snap, params, opt):
    p0, s0 = snap
    p1, s1 = snapshot(params, opt)
    assert sorted(p1) == sorted(p0), "parameter tree changed"
    assert sorted(s1) == sorted(s0), "state tree changed"
    for k in p0:
        assert max_err(p1[k], p0[k]) == 0, f"parameter {k} changed"
    for k in s0:
        assert max_err(s1[k], s0[k]) == 0, f"state {k} changed"
