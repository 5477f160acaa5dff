"""bfloat16 / float16 parameters: the numerics contract and the regressions of
stock's low-precision failures.

Criterion (flash-attention's): after STEPS steps, the fused error against a
float64 run of the same math (tests/reference64.py, from the same rounded
start and gradients) is no larger than stock's own error in that dtype, for
params and every state entry, with a slack of ULP_SLACK ulps of the dtype at
max|x|. No assertion is switched off for a dtype.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from afhelpers import (
    DTYPES,
    flat,
    grad_seq,
    make,
    max_abs,
    max_err,
    rand,
    run,
    to64,
    ulp,
)
from mlx_fused_adafactor import Adafactor
from reference64 import run64, step64

ULP_SLACK = 1.0
ROUNDED_ULPS = 2.0
# Two float32 ulps at max|x| (as test_parity's SLACK).
TOL32_SLACK = 2.0**-22
STEPS = 25
# fp32 state against float64 when only the state math (no parameter
# rounding) is involved: a few float32 roundings.
STATE_RTOL = 1e-6

SHAPES = [(), (33,), (31, 33), (2, 3, 5), (1, 4099), (70000,)]
OPTIONS = {
    "default": {},
    "momentum_decay": {"beta_1": 0.9, "weight_decay": 0.05},
    "lr_no_scale": {"relative_step": False, "learning_rate": 1e-2, "scale_parameter": False},
    "warmup_clip": {"warmup_init": True, "clip_threshold": 0.5},
}


def state_of(opt, name="p"):
    return {k: v for k, v in opt.state[name].items()}


def rounder(dtype):
    """float64 -> the dtype's nearest value, as float64 (through float32:
    the double rounding is as rare as an fp32-vs-fp64 tie flip)."""
    return lambda x: to64(mx.array(np.asarray(x, np.float32)).astype(dtype))


def off_rounded_once(got, expected, peak, dtype_name):
    """Elements further from the rounded-once float64 run than a flip costs
    (ROUNDED_ULPS ulps where the value was largest)."""
    bound = ROUNDED_ULPS * ulp(peak, dtype_name)
    return int((np.abs(got - expected) > bound).sum())


# Every option on the small shapes; the large ones (tiling edges) with the
# default options, to keep the suite's run time down.
CASES = [(s, o) for s in SHAPES if math.prod(s) <= 5000 for o in OPTIONS] + [
    (s, "default") for s in SHAPES if math.prod(s) > 5000
]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape,option", CASES, ids=str)
def test_error_no_larger_than_stock(dtype_name, shape, option):
    dtype = DTYPES[dtype_name]
    options = OPTIONS[option]
    p0 = rand(shape, 21, dtype)
    gs = grad_seq(shape, STEPS, 22, dtype)
    lrs = [options.get("learning_rate")] * STEPS
    p64, s64 = run64(to64(p0), [to64(g) for g in gs], lrs=lrs, **options)
    ref = {"p": p64, **s64}

    results = {}
    for kind, compiled in (("stock", False), ("fused", False), ("fused", True)):
        opt = make(kind, **options)
        p = run(opt, {"p": p0}, [{"p": g} for g in gs], compiled=compiled)
        assert p["p"].dtype == dtype
        results[(kind, compiled)] = flat({"p": p["p"], **opt.state["p"]})
    stock = results[("stock", False)]
    # The contract itself: float32 math with the parameter (and exp_avg)
    # rounded once per step is float64 math rounded once per step, up to
    # rare tie flips (ROUNDED_ULPS ulps at the element's peak magnitude).
    peak = {}
    p64r, s64r = run64(
        to64(p0), [to64(g) for g in gs], lrs=lrs, round_fn=rounder(dtype),
        peak=peak, **options
    )
    rounded = {"p": p64r, **s64r}
    for compiled in (False, True):
        got = results[("fused", compiled)]
        for key, expected in rounded.items():
            if key in ("p", "exp_avg"):
                bad = off_rounded_once(got[key], expected, peak[key], dtype_name)
                assert bad == 0, (
                    f"{key} (compiled={compiled}): {bad} elements off the "
                    "rounded-once float64 run"
                )
            else:
                np.testing.assert_allclose(got[key], expected, rtol=STATE_RTOL * 10)
        if p0.ndim == 0:
            # One element: "max error over the tensor" is a coin toss between
            # two roundings per step, not a measure; the rounded-once check
            # above is the contract for it.
            continue
        for key, expected in ref.items():
            slack = ULP_SLACK * float(np.max(ulp(max_abs(expected), dtype_name)))
            e_fused = max_err(got[key], expected)
            e_stock = max_err(stock[key], expected)
            assert e_fused <= e_stock + slack, (
                f"{key} (compiled={compiled}): fused error {e_fused:.3g} > "
                f"stock error {e_stock:.3g} + {slack:.3g}"
            )


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_rounded_once_check_rejects_low_precision_arithmetic(dtype_name):
    """The check above is not vacuous: stock, which rounds intermediates to
    the parameter dtype, fails it."""
    dtype = DTYPES[dtype_name]
    p0 = rand((31, 33), 21, dtype)
    gs = grad_seq((31, 33), STEPS, 22, dtype)
    opt = make("stock")
    p = run(opt, {"p": p0}, [{"p": g} for g in gs])["p"]
    peak = {}
    p64r, _ = run64(to64(p0), [to64(g) for g in gs], round_fn=rounder(dtype), peak=peak)
    assert off_rounded_once(to64(p), p64r, peak["p"], dtype_name) > 0


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "lazy"])
def test_state_dtypes(dtype_name, compiled):
    """Second-moment state in float32, exp_avg and params in the parameter
    dtype, after init and after steps, on both paths."""
    dtype = DTYPES[dtype_name]
    params = {"w": rand((5, 6), 1, dtype), "b": rand((6,), 2, dtype), "c": rand((2, 3, 4), 3, dtype)}
    opt = Adafactor(beta_1=0.9)
    opt.init(params)

    def check():
        for name in params:
            st = opt.state[name]
            for key, value in st.items():
                want = dtype if key == "exp_avg" else mx.float32
                assert value.dtype == want, (name, key, value.dtype)

    check()
    grads = [{k: rand(v.shape, 10 + i, dtype) for k, v in params.items()} for i in range(3)]
    new = run(opt, params, grads, compiled=compiled)
    check()
    assert all(v.dtype == dtype for _, v in tree_flatten(new))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(33,), (31, 33), (2, 3, 5)], ids=str)
def test_parameter_rounded_once(dtype_name, shape):
    """One step from float32 arithmetic rounded once: the new parameter is
    within half an ulp of the dtype (plus float32 noise) of the float64
    result computed from the same inputs. Any intermediate rounding to the
    dtype would cost a whole ulp or more somewhere."""
    dtype = DTYPES[dtype_name]
    p0 = rand(shape, 31, dtype, scale=3.0)
    g = grad_seq(shape, 1, 32, dtype)[0]
    opt = Adafactor(beta_1=0.5)
    new = opt.apply_gradients({"p": g}, {"p": p0})["p"]
    p64, s64 = step64(1, None, to64(p0), to64(g), _zeros64(shape, True), beta_1=0.5)
    err = np.abs(to64(new) - p64)
    bound = 0.5 * ulp(p64, dtype_name) + 1e-6 * np.abs(p64)
    worst = np.argmax(err - bound)
    assert (err <= bound).all(), (
        f"element {worst}: error {err.flat[worst]:.3g} > bound {bound.flat[worst]:.3g}"
    )
    # The state is float32 math: close to float64 at float32 precision.
    for key, value in opt.state["p"].items():
        if key != "exp_avg":
            np.testing.assert_allclose(to64(value), s64[key], rtol=STATE_RTOL)


def _zeros64(shape, momentum):
    from reference64 import init_state64

    return init_state64(shape, 0.5 if momentum else None)


def _roundtrip(state):
    return tree_unflatten(tree_flatten(state))


@pytest.mark.parametrize("decay_rate,freeze_step", [(-0.8, 2424), (-0.997, 520)])
def test_bf16_beta2_does_not_freeze(decay_rate, freeze_step):
    """Stock computes beta_2 = 1 - t^decay_rate in bfloat16: it rounds to 1.0
    from step 2424 (520 with decay_rate -0.997) on and the second moment
    stops moving. The fused second moment keeps following float64."""
    shapes = {"w": (4, 6), "b": (6,)}
    params = {k: rand(s, 41 + i, mx.bfloat16) for i, (k, s) in enumerate(shapes.items())}
    grads0 = {k: rand(s, 51 + i, mx.bfloat16) for i, (k, s) in enumerate(shapes.items())}
    # Gradients ten times larger than the ones the state was built from, so a
    # moving second moment must grow.
    grads = [
        {k: (10.0 * rand(s, 61 + 10 * j + i)).astype(mx.bfloat16) for i, (k, s) in enumerate(shapes.items())}
        for j in range(4)
    ]
    out = {}
    for kind in ("stock", "fused"):
        opt = make(kind, decay_rate=decay_rate)
        opt.apply_gradients(grads0, params)
        # Jump to just before the freeze through the state setter.
        state = _roundtrip(opt.state)
        state["step"] = mx.array(freeze_step - 1, mx.uint64)
        opt.state = state
        before = flat(opt.state)
        p = params
        for g in grads:
            p = opt.apply_gradients(g, p)
            mx.eval(p, opt.state)
        out[kind] = (before, flat(opt.state))
    assert int(opt.state["step"].item()) == freeze_step - 1 + len(grads)

    stock_before, stock_after = out["stock"]
    fused_before, fused_after = out["fused"]
    for name in shapes:
        keys = [k for k in stock_before if k.startswith(name + ".")]
        # Stock is frozen (the failure this test guards against).
        for k in keys:
            np.testing.assert_array_equal(stock_after[k], stock_before[k])
        # Fused moves as float64 says: the state math does not involve the
        # (bfloat16) parameters.
        state64 = {k.split(".", 1)[1]: fused_before[k] for k in keys}
        _, expected = run64(
            to64(params[name]), [to64(g[name]) for g in grads], state=state64,
            t0=freeze_step - 1, decay_rate=decay_rate,
        )
        for k in keys:
            key = k.split(".", 1)[1]
            assert max_err(fused_after[k], fused_before[k]) > 0, k
            np.testing.assert_allclose(fused_after[k], expected[key], rtol=1e-5)


@pytest.mark.parametrize("decay_rate,freeze_step", [(-0.8, 2424), (-0.997, 520)])
def test_bf16_beta2_freeze_step_is_exact(decay_rate, freeze_step):
    """The regression's step numbers: stock's bfloat16 second moment still
    moves at freeze_step - 1 and no longer at freeze_step; the fused one
    moves at both."""
    p = {"w": rand((4, 6), 1, mx.bfloat16)}
    g0 = {"w": rand((4, 6), 2, mx.bfloat16)}
    g1 = {"w": (10.0 * rand((4, 6), 3)).astype(mx.bfloat16)}
    for kind, moves_at_freeze in (("stock", False), ("fused", True)):
        for t, moves in ((freeze_step - 1, True), (freeze_step, moves_at_freeze)):
            opt = make(kind, decay_rate=decay_rate)
            opt.apply_gradients(g0, p)
            state = _roundtrip(opt.state)
            state["step"] = mx.array(t - 1, mx.uint64)
            opt.state = state
            before = flat(opt.state["w"])
            opt.apply_gradients(g1, p)
            after = flat(opt.state["w"])
            changed = all(max_err(after[k], before[k]) > 0 for k in before)
            assert changed == moves, (kind, t)


def test_bf16_beta2_real_steps_past_freeze():
    """520 real steps with decay_rate -0.997 on a tiny tensor: the fused
    second moment matches float64 the whole way (stock's is frozen)."""
    steps = 530
    shape = (3, 4)
    p0 = rand(shape, 71, mx.bfloat16)
    gs = [(mx.array(1.0 + 0.01 * i) * rand(shape, 72)).astype(mx.bfloat16) for i in range(steps)]
    opt = Adafactor(decay_rate=-0.997)
    p = {"p": p0}
    for g in gs:
        p = opt.apply_gradients({"p": g}, p)
    mx.eval(p, opt.state)
    _, s64 = run64(to64(p0), [to64(g) for g in gs], decay_rate=-0.997)
    for key, value in s64.items():
        np.testing.assert_allclose(to64(opt.state["p"][key]), value, rtol=1e-4)


@pytest.mark.parametrize("shape,zero", [((8, 16), (slice(3, 4),)), ((16,), (slice(5, 7),))], ids=["row", "1d"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "lazy"])
def test_fp16_zero_gradient_row_is_not_nan(shape, zero, compiled):
    """Stock adds eps_1 = 1e-30 in float16, where it is 0: an all-zero
    gradient row (or element, 1-D) gives rsqrt(0) * 0 = NaN and the RMS
    spreads it over the whole tensor. Fused: finite and as good as float64
    allows."""
    dtype = mx.float16
    p0 = rand(shape, 81, dtype)
    gs = []
    for i in range(3):
        g = np.array(rand(shape, 82 + i))
        g[zero] = 0.0
        gs.append(mx.array(g).astype(dtype))
    stock = make("stock")
    p_stock = run(stock, {"p": p0}, [{"p": g} for g in gs])["p"]
    assert np.isnan(to64(p_stock)).all()  # stock's failure
    fused = make("fused")
    p = run(fused, {"p": p0}, [{"p": g} for g in gs], compiled=compiled)["p"]
    p64, s64 = run64(to64(p0), [to64(g) for g in gs])
    assert np.isfinite(to64(p)).all()
    assert max_err(to64(p), p64) <= 2 * float(ulp(max_abs(p64), "float16"))
    # Zero gradients leave their parameters alone.
    np.testing.assert_array_equal(to64(p)[zero], to64(p0)[zero])
    for key, value in s64.items():
        np.testing.assert_allclose(to64(fused.state["p"][key]), value, rtol=1e-5)


@pytest.mark.parametrize("shape", [(16, 16), (64,)], ids=str)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "lazy"])
def test_fp16_large_parameters_do_not_overflow_rms(shape, compiled):
    """|p| ~ 300: p^2 overflows float16 (max 65504), so stock's RMS(p), its
    learning rate and the new parameters are inf/NaN. Fused: float32 RMS."""
    dtype = mx.float16
    p0 = (300.0 + 5.0 * rand(shape, 91)).astype(dtype)
    gs = grad_seq(shape, 3, 92, dtype)
    stock = make("stock")
    p_stock = run(stock, {"p": p0}, [{"p": g} for g in gs])["p"]
    assert not np.isfinite(to64(p_stock)).all()  # stock's failure
    fused = make("fused")
    p = run(fused, {"p": p0}, [{"p": g} for g in gs], compiled=compiled)["p"]
    p64, _ = run64(to64(p0), [to64(g) for g in gs])
    assert np.isfinite(to64(p)).all()
    # The step moved the parameters (lr = 1e-2 * RMS(p) ~ 3 per step).
    assert max_err(to64(p), to64(p0)) > 1.0
    assert max_err(to64(p), p64) <= 2 * float(ulp(max_abs(p64), "float16"))


@pytest.mark.parametrize(
    "p_name,g_name",
    [("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", "float32"), ("float16", "bfloat16")],
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "lazy"])
def test_gradient_dtype_other_than_parameter_dtype(p_name, g_name, compiled):
    """Mixed dtypes run in float32 too and keep the parameter dtype. (Stock
    promotes: a bfloat16 parameter with float32 gradients comes back as
    float32, so for low-precision parameters the float64 comparison is the
    rounded-once one, not stock's error.)"""
    shapes = {"w": (31, 33), "b": (33,)}
    p_dtype, g_dtype = DTYPES[p_name], DTYPES[g_name]
    params = {k: rand(s, 1 + i, p_dtype) for i, (k, s) in enumerate(shapes.items())}
    seqs = {k: grad_seq(s, 10, 5 + i, g_dtype) for i, (k, s) in enumerate(shapes.items())}
    grads = [{k: v[j] for k, v in seqs.items()} for j in range(10)]
    fused = make("fused", beta_1=0.9)
    p = run(fused, params, grads, compiled=compiled)
    stock = make("stock", beta_1=0.9)
    p_stock = run(stock, params, grads)
    for name in shapes:
        assert p[name].dtype == p_dtype
        got = flat({"p": p[name], **fused.state[name]})
        assert fused.state[name]["exp_avg"].dtype == p_dtype
        g64 = [to64(g[name]) for g in grads]
        if p_name == "float32":
            p64, s64 = run64(to64(params[name]), g64, beta_1=0.9)
            ref = {"p": p64, **s64}
            st = flat({"p": p_stock[name], **stock.state[name]})
            for key, expected in ref.items():
                slack = TOL32_SLACK * max_abs(expected)
                assert max_err(got[key], expected) <= max_err(st[key], expected) + slack, key
        else:
            peak = {}
            p64, s64 = run64(
                to64(params[name]), g64, beta_1=0.9, round_fn=rounder(p_dtype), peak=peak
            )
            for key, expected in (("p", p64), ("exp_avg", s64["exp_avg"])):
                assert off_rounded_once(got[key], expected, peak[key], p_name) == 0, key
