"""Stochastic rounding of bfloat16 and float16 parameters and exp_avg
(NOTE: [stochastic rounding] in kernels/adafactor_math.h).

The steps below are built so that every element's float32 update is known:
with relative_step=False, scale_parameter=False, a clip threshold above 1
and the first step (beta_2 = 0), a 1-D parameter's update is
lr * g / sqrt(g^2 + eps1) = lr * sign(g). A parameter of 1.0 and a gradient
of 1 then land at 1 - lr, between the storage type's neighbours
1 - spacing and 1 (spacing = 2^-8 in bfloat16, 2^-11 in float16), at the
fractional distance 1 - lr / spacing from the lower one."""

import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from afhelpers import assert_trees_equal
from mlx_fused_adafactor import Adafactor, backend

N = 200_000
SPACING_BELOW_ONE = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16}


def one_step(dtype, lr, value=1.0, grad=1.0, n=N, **options):
    """The parameter after one step from `value` with gradient `grad`."""
    opt = Adafactor(learning_rate=lr, relative_step=False, scale_parameter=False,
                    clip_threshold=2.0, eps=(0.0, 1e-3), **options)
    p = {"p": mx.full((n,), value, dtype)}
    g = {"p": mx.full((n,), grad, dtype)}
    out = opt.apply_gradients(g, p)["p"]
    return np.array(out.astype(mx.float32), np.float64), opt


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.parametrize("k", [1, 4, 8, 13, 15])
def test_probability_of_rounding_up_is_the_fractional_distance(name, k):
    spacing = SPACING_BELOW_ONE[name]
    lr = k / 16 * spacing
    got, _ = one_step(DTYPES[name], lr, stochastic_rounding=True)
    # Only the two neighbours of 1 - lr.
    assert set(np.unique(got)) <= {1.0 - spacing, 1.0}
    p_up = np.mean(got == 1.0)
    expected = 1.0 - lr / spacing
    sigma = np.sqrt(expected * (1 - expected) / N)
    assert abs(p_up - expected) <= 5 * sigma + 1e-4, (p_up, expected)
    # Round to nearest stays at one neighbour.
    nearest, _ = one_step(DTYPES[name], lr)
    assert len(np.unique(nearest)) == 1


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_updates_below_half_an_ulp_are_kept_in_expectation(name):
    """Round to nearest drops an update below half a unit; stochastic
    rounding keeps its mean."""
    spacing = SPACING_BELOW_ONE[name]
    lr = 0.3 * spacing
    nearest, _ = one_step(DTYPES[name], lr)
    assert (nearest == 1.0).all()
    got, _ = one_step(DTYPES[name], lr, stochastic_rounding=True)
    change = np.mean(1.0 - got)
    sigma = spacing * np.sqrt(0.3 * 0.7 / N)
    assert abs(change - lr) <= 5 * sigma, (change, lr)


def test_float16_subnormals():
    # 3.3e-6 lies among float16's subnormals (multiples of 2^-24 below
    # 2^-14): the result is one of the two multiples around 3.3e-6 - lr,
    # up with the fractional distance.
    tiny = 2.0**-24
    value = 55 * tiny
    lr = 0.25 * tiny
    got, _ = one_step(mx.float16, lr, value=value, stochastic_rounding=True)
    assert set(np.unique(got)) <= {54 * tiny, 55 * tiny}
    p_up = np.mean(got == 55 * tiny)
    sigma = np.sqrt(0.75 * 0.25 / N)
    assert abs(p_up - 0.75) <= 5 * sigma


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_exp_avg_is_rounded_stochastically_too(name):
    spacing = SPACING_BELOW_ONE[name]
    # exp_avg = (1 - beta_1) * update = 0.5 * lr: a fraction of a unit of
    # its own spacing, 0.5 * lr in [2^-k, 2^-k+1).
    lr = 2.0**-6 * 1.3
    _, opt = one_step(DTYPES[name], lr, beta_1=0.5, stochastic_rounding=True)
    m = np.array(opt.state["p"]["exp_avg"].astype(mx.float32), np.float64)
    exact = 0.5 * lr
    assert len(np.unique(m)) == 2
    assert abs(np.mean(m) - exact) <= 5 * exact * 2.0**-7 / np.sqrt(N) * 4
    _, rtn = one_step(DTYPES[name], lr, beta_1=0.5)
    assert len(np.unique(np.array(rtn.state["p"]["exp_avg"].astype(mx.float32)))) == 1


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_special_values_as_round_to_nearest(name):
    dtype = DTYPES[name]
    finfo = {"bfloat16": 3.3895313892515355e38, "float16": 65504.0}[name]
    values = mx.array([float("nan"), float("inf"), -float("inf"), finfo, -finfo,
                       0.0, -0.0, 1.0], dtype)
    n = values.size
    cases = [
        # A gradient of -1 moves every value up by lr.
        (values, -1.0, 1e-3),
        # Past the largest finite value by more than half a unit: Inf.
        (mx.full((n,), finfo, dtype), -1.0, finfo * 2.0**-7),
        # Past it by less than half a unit: the largest finite value.
        (mx.full((n,), finfo, dtype), -1.0, finfo * 2.0**-12),
    ]
    for start, grad, lr in cases:
        outs = []
        for sr in (False, True):
            opt = Adafactor(learning_rate=lr, relative_step=False,
                            scale_parameter=False, clip_threshold=2.0,
                            eps=(0.0, 1e-3), stochastic_rounding=sr)
            new = opt.apply_gradients({"p": mx.full((n,), grad, dtype)}, {"p": start})
            outs.append(np.array(new["p"].astype(mx.float32)))
        rtn, sr = outs
        special = ~np.isfinite(rtn) | (np.abs(rtn) == finfo)
        np.testing.assert_array_equal(np.isnan(sr), np.isnan(rtn))
        np.testing.assert_array_equal(sr[special & ~np.isnan(rtn)],
                                      rtn[special & ~np.isnan(rtn)])
        assert np.isfinite(sr[np.isfinite(rtn)]).all()


def test_float32_parameters_are_unaffected():
    p = {"w": mx.random.normal((40, 30)), "b": mx.random.normal((30,))}
    g = {k: mx.random.normal(v.shape) for k, v in p.items()}
    a = Adafactor(stochastic_rounding=True, beta_1=0.9)
    b = Adafactor(beta_1=0.9)
    for _ in range(3):
        pa, pb = a.apply_gradients(g, p), b.apply_gradients(g, p)
    assert_trees_equal((pa, a.state), (pb, b.state), "float32")


def model(dtype):
    mx.random.seed(3)
    return ({"w": mx.random.normal((70, 33)).astype(dtype),
             "layers": [{"b": (1e-3 * mx.random.normal((1500,))).astype(dtype)},
                        {"c": mx.random.normal((3, 9, 17)).astype(dtype)}]},
            [{"w": mx.random.normal((70, 33)).astype(dtype),
              "layers": [{"b": mx.random.normal((1500,)).astype(dtype)},
                         {"c": mx.random.normal((3, 9, 17)).astype(dtype)}]}
             for _ in range(4)])


def train(opt, params, grads, compiled=False):
    step = opt.apply_gradients
    if compiled:
        opt.init(params)
        step = partial(mx.compile, inputs=opt.state, outputs=opt.state)(
            lambda g, p: opt.apply_gradients(g, p))
    for g in grads:
        params = step(g, params)
        mx.eval(params, opt.state)
    return params


OPTIONS = dict(stochastic_rounding=True, beta_1=0.9, relative_step=False,
               learning_rate=1e-3)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_runs_are_bitwise_reproducible_and_compiled_equals_eager(name):
    params, grads = model(DTYPES[name])
    runs = [train(Adafactor(**OPTIONS), params, grads),
            train(Adafactor(**OPTIONS), params, grads),
            train(Adafactor(**OPTIONS), params, grads, compiled=True)]
    for other in runs[1:]:
        assert_trees_equal(other, runs[0], name)
    # Another seed draws other bits.
    other = train(Adafactor(**OPTIONS, seed=1), params, grads)
    assert not mx.array_equal(other["w"], runs[0]["w"]).item()


def test_bits_depend_on_the_path():
    """Two parameters with the same values and gradients round differently."""
    x = mx.full((20000,), 1.0, mx.bfloat16)
    g = mx.full((20000,), 1.0, mx.bfloat16)
    opt = Adafactor(learning_rate=0.5 * 2.0**-8, relative_step=False,
                    scale_parameter=False, clip_threshold=2.0, eps=(0.0, 1e-3),
                    stochastic_rounding=True)
    new = opt.apply_gradients({"a": g, "b": g}, {"a": x, "b": x})
    assert not mx.array_equal(new["a"], new["b"]).item()


def test_resumed_state_continues_bitwise():
    params, grads = model(mx.bfloat16)
    straight = Adafactor(**OPTIONS)
    p_straight = train(straight, params, grads)
    first = Adafactor(**OPTIONS)
    p = train(first, params, grads[:2])
    resumed = Adafactor(**OPTIONS)
    resumed.state = first.state
    p = train(resumed, p, grads[2:])
    assert_trees_equal((p, resumed.state), (p_straight, straight.state), "resume")


def test_reference_backend_rounds_the_same_way():
    """The reference implementation draws the same bits: on a 1-D tensor,
    whose float32 results agree bitwise, it stores bitwise the same values."""
    params = {"b": (1e-3 * mx.random.normal((5000,), key=mx.random.key(1))).astype(mx.bfloat16)}
    grads = [{"b": mx.random.normal((5000,), key=mx.random.key(2 + i)).astype(mx.bfloat16)}
             for i in range(3)]
    fused = train(Adafactor(**OPTIONS), params, grads)
    with backend("reference"):
        ref = train(Adafactor(**OPTIONS), params, grads)
    assert_trees_equal(ref, fused, "reference")


THREADS_SCRIPT = textwrap.dedent("""
    import sys
    import mlx.core as mx
    import numpy as np
    sys.path.insert(0, {tests!r})
    import test_stochastic_rounding as t
    from mlx_fused_adafactor import Adafactor, _ext
    assert _ext.num_threads() == {threads}
    params, grads = t.model(mx.bfloat16)
    params = {{"big": mx.full((300, 700), 1.0, mx.bfloat16), **params}}
    grads = [{{"big": mx.random.normal((300, 700), key=mx.random.key(i)).astype(mx.bfloat16), **g}}
             for i, g in enumerate(grads)]
    out = t.train(Adafactor(**t.OPTIONS), params, grads)
    from mlx.utils import tree_flatten
    np.save(sys.argv[1], np.concatenate(
        [np.array(v.view(mx.uint16)).ravel() for _, v in tree_flatten(out)]))
""")


def test_independent_of_the_thread_count(tmp_path):
    tests = str(Path(__file__).resolve().parent)
    results = []
    for threads in (1, 2, 3):
        out = tmp_path / f"{threads}.npy"
        env = dict(os.environ, MLX_FUSED_ADAFACTOR_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, "-c",
                        THREADS_SCRIPT.format(tests=tests, threads=threads), str(out)],
                       env=env, check=True)
        results.append(np.load(out))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
