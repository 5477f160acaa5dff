"""Inputs stock takes, taken here: float64 parameters (NOTE: [float64]),
NumPy gradients, learning rates and schedules of NumPy and MLX scalar
types, and mx.export_function through the reference backend. Each test
compares with stock where stock runs, and fails on the code before these
inputs were accepted (it raised)."""

import re

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import mlx_fused_adafactor
from afhelpers import (
    StockAdafactor,
    assert_close_to_max,
    assert_trees_close,
    assert_trees_equal,
    assert_unchanged,
    flat,
    grad_seq,
    make,
    rand,
    run,
    snapshot,
    to64,
)
from mlx_fused_adafactor import Adafactor
from reference64 import DEFAULTS, run64

# float32, shapes where stock's reductions are accurate (see test_parity).
TOL = 1e-5
# float64 against stock: stock's beta_2 and relative step are float32 values
# (`step ** decay_rate` of a uint64 array), so are this package's step
# scalars and hyper-parameters; the two differ by those roundings.
TOL64_STOCK = 1e-6
# float64 against the float64 oracle fed the same float32-rounded scalars:
# what is left is float64 rounding.
TOL64_ORACLE = 1e-12
STEPS = 5


def f32(x):
    """A Python float rounded to float32 (what the step sees of an option)."""
    return float(np.float32(x))


# ------------------------------------------------------------------- float64

SHAPES64 = [(), (7,), (5, 6), (2, 3, 4), (1, 33), (33, 1)]
OPTIONS64 = {
    "default": {},
    "momentum_decay": {"beta_1": 0.9, "weight_decay": 0.05},
    "lr": {"relative_step": False, "learning_rate": 1e-2, "scale_parameter": False},
    "warmup_clip": {"warmup_init": True, "clip_threshold": 0.5, "decay_rate": -0.6},
}


def oracle_options(options):
    """The options, defaults included, as the step sees them: float32
    values."""
    out = dict(DEFAULTS, **options)
    out["eps"] = tuple(f32(e) for e in out["eps"])
    if out["beta_1"] is not None:
        # schema/hyper.cpp: 1 - beta_1 is taken in double, then rounded.
        out["one_minus_beta_1"] = f32(1 - out["beta_1"])
    for key in ("clip_threshold", "decay_rate", "weight_decay", "beta_1"):
        if out[key] is not None:
            out[key] = f32(out[key])
    out.pop("learning_rate")
    return out


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(OPTIONS64))
@pytest.mark.parametrize("shape", SHAPES64, ids=str)
def test_float64_parameters_match_stock_and_float64(shape, name, compiled):
    options = OPTIONS64[name]
    p0 = rand(shape, 1).astype(mx.float64)
    gs = [g.astype(mx.float64) for g in grad_seq(shape, STEPS, 2)]
    out = {}
    for kind, comp in (("stock", False), ("fused", compiled)):
        opt = make(kind, **options)
        p = run(opt, {"p": p0}, [{"p": g} for g in gs], compiled=comp)
        out[kind] = (p, opt.state)
    p, state = out["fused"]
    # float64 results and float64 state, as stock keeps them.
    assert p["p"].dtype == mx.float64
    for key, value in state["p"].items():
        assert value.dtype == mx.float64, key
    assert_trees_close(out["fused"], out["stock"], TOL64_STOCK, "float64 vs stock")

    lr = options.get("learning_rate")
    lrs = None if lr is None else [f32(lr)] * STEPS
    p64, s64 = run64(to64(p0), [to64(g) for g in gs], lrs=lrs, **oracle_options(options))
    got = flat({"p": p["p"], **state["p"]})
    for key, expected in {"p": p64, **s64}.items():
        assert_close_to_max(got[key], expected, TOL64_ORACLE, f"float64 {key}")


def test_float64_mixed_with_other_dtypes_in_one_tree():
    # Each dtype group takes its own path: float64 the reference, the others
    # the fused kernels; all match stock in their own precision.
    params = {
        "a": rand((6, 5), 1, mx.float64),
        "b": rand((6, 5), 2),
        "c": rand((5,), 3, mx.float64),
        "d": rand((4, 3), 4, mx.bfloat16),
    }
    seqs = {k: grad_seq(v.shape, 3, 10 + i, v.dtype) for i, (k, v) in enumerate(params.items())}
    grads = [{k: s[i] for k, s in seqs.items()} for i in range(3)]
    stock, fused = StockAdafactor(beta_1=0.9), Adafactor(beta_1=0.9)
    ps = run(stock, params, grads)
    pf = run(fused, params, grads)
    for key in ("a", "b", "c"):
        assert pf[key].dtype == params[key].dtype
        tol = TOL64_STOCK if params[key].dtype == mx.float64 else TOL
        assert_trees_close((pf[key], fused.state[key]), (ps[key], stock.state[key]), tol, key)
    assert pf["d"].dtype == mx.bfloat16


def test_float64_parameters_with_float32_gradients():
    p0 = rand((5, 6), 1, mx.float64)
    gs = grad_seq((5, 6), 3, 2)
    stock, fused = StockAdafactor(), Adafactor()
    ps = run(stock, {"p": p0}, [{"p": g} for g in gs])
    pf = run(fused, {"p": p0}, [{"p": g} for g in gs])
    assert pf["p"].dtype == mx.float64
    assert_trees_close((pf, fused.state), (ps, stock.state), TOL64_STOCK, "f64 params, f32 grads")


# ------------------------------------------------------------ NumPy gradients


def small_params():
    return {"w": rand((4, 5), 1), "b": rand((5,), 2), "s": rand((), 3)}


def numpy_grads(i, dtype=np.float32):
    # Gradients of small_params() as NumPy arrays (a 0-D array and a NumPy
    # scalar among them, as NumPy reductions return them).
    gs = {k: np.array(grad_seq(v.shape, 1, 20 + 5 * i + j)[0]).astype(dtype)
          for j, (k, v) in enumerate(small_params().items())}
    gs["s"] = dtype(gs["s"])
    return gs


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64, np.float16], ids=str)
def test_numpy_gradients_as_stock(np_dtype):
    # Stock converts a NumPy gradient in its first op on it (mx.square), as
    # mx.array() does (float64 becomes float32, float16 stays); it needs its
    # state made from the parameters first, since init from NumPy gradients
    # fails. Here a NumPy gradient is that mx.array() exactly, fresh or not;
    # float16 gradients then differ from stock by design (all arithmetic in
    # float32, README numerics contract), float32 and float64 match it.
    params = small_params()
    grads = [numpy_grads(i, np_dtype) for i in range(3)]
    stock = StockAdafactor(beta_1=0.9)
    stock.init(params)
    fused = Adafactor(beta_1=0.9)
    as_mlx = Adafactor(beta_1=0.9)
    ps, pf, pm = params, params, params
    for g in grads:
        ps = stock.apply_gradients(g, ps)
        pf = fused.apply_gradients(g, pf)
        pm = as_mlx.apply_gradients(tree_map(mx.array, g), pm)
        mx.eval(ps, pf, pm, stock.state, fused.state)
    assert all(isinstance(v, mx.array) for _, v in tree_flatten(pf))
    assert_trees_equal((pf, fused.state), (pm, as_mlx.state), "numpy vs mx.array")
    if np_dtype != np.float16:
        assert_trees_close((pf, fused.state), (ps, stock.state), TOL, "numpy grads")


def test_numpy_gradient_in_apply_single_and_compile():
    params = small_params()
    g = numpy_grads(0)
    stock = StockAdafactor()
    stock.init(params)
    stock.state["step"] = mx.array(1, mx.uint64)
    fused = Adafactor()
    fused.init(params)
    fused.state["step"] = mx.array(1, mx.uint64)
    for key in ("w", "b"):
        want = stock.apply_single(g[key], params[key], stock.state[key])
        got = fused.apply_single(g[key], params[key], fused.state[key])
        assert_close_to_max(to64(got), to64(want), TOL, key)

    opt = Adafactor()
    opt.init(params)
    state = opt.state

    def step(p):
        return opt.apply_gradients(g, p)

    got = mx.compile(step, inputs=state, outputs=state)(params)
    want = Adafactor().apply_gradients(tree_map(mx.array, g), params)
    assert_trees_equal(got, want, "compiled numpy grads")


# ----------------------------------------------- learning rates and schedules

LEARNING_RATES = [
    np.float32(1e-2), np.float64(1e-2), np.array(1e-2), mx.array(1e-2),
    mx.array(1e-2, mx.float16), 1, np.int64(1), -1e-3,
]


@pytest.mark.parametrize("lr", LEARNING_RATES, ids=repr)
def test_learning_rate_types_as_stock(lr):
    params = small_params()
    grads = [tree_map(mx.array, numpy_grads(i)) for i in range(3)]
    stock = StockAdafactor(learning_rate=lr, relative_step=False)
    fused = Adafactor(learning_rate=lr, relative_step=False)
    assert fused.learning_rate.dtype == stock.learning_rate.dtype
    ps, pf = run(stock, params, grads), run(fused, params, grads)
    assert_trees_close((pf, fused.state), (ps, stock.state), TOL, repr(lr))
    # And assigned later, through the learning_rate property.
    stock.learning_rate, fused.learning_rate = lr, lr
    ps, pf = run(stock, ps, grads), run(fused, pf, grads)
    assert_trees_close((pf, fused.state), (ps, stock.state), TOL, repr(lr))


SCHEDULES = {
    "numpy": lambda step: np.float32(1e-2) / (1 + np.float32(step.item())),
    "mlx": lambda step: mx.array(1e-2) / (1 + step.astype(mx.float32)),
    "python": lambda step: 1e-2 / (1 + step.item()),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_value_types(name):
    # Stock runs a schedule returning an mlx array; one returning a NumPy
    # scalar or a Python float fails in stock's step (it calls .astype).
    # Here all three run, give the mlx schedule's results, and the state
    # keeps the learning rate as an mlx array (so it can be checkpointed).
    params = small_params()
    grads = [tree_map(mx.array, numpy_grads(i)) for i in range(4)]
    stock = StockAdafactor(learning_rate=SCHEDULES["mlx"], relative_step=False)
    fused = Adafactor(learning_rate=SCHEDULES[name], relative_step=False)
    ps, pf = run(stock, params, grads), run(fused, params, grads)
    assert isinstance(fused.state["learning_rate"], mx.array)
    assert_trees_close(pf, ps, TOL, name)
    assert_close_to_max(to64(fused.state["learning_rate"]), to64(stock.state["learning_rate"]), 1e-6)


BAD_LEARNING_RATES = [
    (float("nan"), ValueError, "finite"),
    (np.float32("inf"), ValueError, "finite"),
    (1e300, ValueError, "float32 range"),
    (np.array([1e-2]), ValueError, "scalar"),
    (mx.array([1e-2, 1e-3]), ValueError, "scalar"),
    ("0.01", TypeError, "str"),
    (None, TypeError, "NoneType"),
    (1 + 0j, TypeError, "complex"),
    (mx.array(1, mx.complex64), TypeError, "complex64"),
]


@pytest.mark.parametrize("value,exc,why", BAD_LEARNING_RATES, ids=repr)
def test_bad_learning_rate_raises_at_construction_and_assignment(value, exc, why):
    if value is not None:
        with pytest.raises(exc, match=re.escape(why)) as info:
            Adafactor(learning_rate=value, relative_step=False)
        assert str(info.value).startswith("[adafactor] learning_rate"), info.value
    opt = Adafactor(learning_rate=1e-2, relative_step=False)
    params = small_params()
    grads = tree_map(mx.array, numpy_grads(0))
    params = opt.apply_gradients(grads, params)
    with pytest.raises(exc, match=re.escape(why)):
        opt.learning_rate = value
    assert opt.learning_rate.item() == pytest.approx(1e-2)
    # A bad value put into the state directly is refused at the step,
    # naming it, with nothing changed. (Non-finite values there and from
    # schedules are not looked at: they may be lazy or traced.)
    if isinstance(value, mx.array) or value is None or isinstance(value, str):
        snap = snapshot(params, opt)
        good = opt.state["learning_rate"]
        opt.state["learning_rate"] = value
        with pytest.raises(exc, match=r"^\[adafactor\] learning_rate"):
            opt.apply_gradients(grads, params)
        assert opt.state["learning_rate"] is value
        opt.state["learning_rate"] = good
        assert_unchanged(snap, params, opt)


# ------------------------------------------------------------------- export


def export_step(opt, params, grads):
    """A pure function of flat arrays (parameters, gradients, state) that
    runs one step of `opt`, with its example inputs."""
    opt.init(params)
    p_keys = [k for k, _ in tree_flatten(params)]
    g_keys = [k for k, _ in tree_flatten(grads)]
    s_keys = [k for k, _ in tree_flatten(opt.state)]
    n_p, n_g = len(p_keys), len(g_keys)

    def step(*arrays):
        p = tree_unflatten(list(zip(p_keys, arrays[:n_p])))
        g = tree_unflatten(list(zip(g_keys, arrays[n_p:n_p + n_g])))
        opt.state = tree_unflatten(list(zip(s_keys, arrays[n_p + n_g:])))
        new = opt.apply_gradients(g, p)
        return [v for _, v in tree_flatten(new)] + [v for _, v in tree_flatten(opt.state)]

    def inputs(p, g, state):
        return [v for _, v in tree_flatten(p)] + [v for _, v in tree_flatten(g)] + [
            v for _, v in tree_flatten(state)]

    return step, inputs, n_p


def test_export_function_with_the_reference_backend(tmp_path):
    # The fused primitive cannot be serialized (MLX gives extensions no
    # hook); the reference backend builds the step from plain MLX ops, so
    # the step exports, and the re-imported function continues a run as
    # the eager step does.
    options = {"beta_1": 0.9, "weight_decay": 0.01}
    params = small_params()
    grads = [tree_map(mx.array, numpy_grads(i)) for i in range(3)]
    step, inputs, n_p = export_step(Adafactor(**options), params, grads[0])
    path = str(tmp_path / "step.mlxfn")
    init = Adafactor(**options)
    init.init(params)
    with mlx_fused_adafactor.backend("reference"):
        mx.export_function(path, step, *inputs(params, grads[0], init.state))
    imported = mx.import_function(path)

    eager, ref = Adafactor(**options), Adafactor(**options)
    pe, pr = params, params
    p, state = params, init.state
    s_keys = [k for k, _ in tree_flatten(init.state)]
    for g in grads:
        outs = imported(*inputs(p, g, state))
        p = tree_unflatten(list(zip([k for k, _ in tree_flatten(params)], outs[:n_p])))
        state = tree_unflatten(list(zip(s_keys, outs[n_p:])))
        pe = eager.apply_gradients(g, pe)
        with mlx_fused_adafactor.backend("reference"):
            pr = ref.apply_gradients(g, pr)
        mx.eval(p, state, pe, pr, eager.state, ref.state)
    # The same graph as the eager reference step, and the eager fused
    # step's results to float32 rounding.
    assert_trees_equal((p, state), (pr, ref.state), "imported vs eager reference")
    assert_trees_close((p, state), (pe, eager.state), TOL, "imported vs eager fused")
    assert state["step"].item() == 3


def test_export_function_with_the_fused_step_raises(tmp_path):
    params = small_params()
    g = tree_map(mx.array, numpy_grads(0))
    step, inputs, _ = export_step(Adafactor(), params, g)
    init = Adafactor()
    init.init(params)
    with pytest.raises(ValueError, match="AdafactorStep"):
        mx.export_function(str(tmp_path / "step.mlxfn"), step, *inputs(params, g, init.state))
