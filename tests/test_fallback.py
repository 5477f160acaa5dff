"""The pure-MLX implementation (NOTE: [reference]): as the oracle
(adafactor_reference), and as the step itself when the reference backend is
chosen (NOTE: [backend]) — the path of GPU streams without fused kernels.
There is no GPU here; the reference runs on the CPU stream, the same graph
it builds on any other."""

import warnings

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_fused_adafactor
from afhelpers import (
    DTYPES,
    assert_close_to_max,
    assert_trees_close,
    assert_unchanged,
    grad_seq,
    max_abs,
    max_err,
    rand,
    run,
    snapshot,
    to64,
    ulp,
)
from mlx_fused_adafactor import Adafactor, adafactor_reference

# float32: the reference's reductions are MLX's, the fused ones are tiled;
# on these shapes both are accurate to a few ulps (see test_parity).
TOL = {"float32": 1e-5}
STEPS = 10
SHAPES = [(), (1,), (33,), (1, 33), (33, 1), (31, 32), (2, 3, 5), (1, 4099)]
OPTIONS = [
    {},
    {"beta_1": 0.9, "weight_decay": 0.05},
    {"relative_step": False, "learning_rate": 1e-2, "scale_parameter": False},
    {"warmup_init": True, "clip_threshold": 0.5, "decay_rate": -0.6, "eps": (1e-3, 1e-2)},
]


@pytest.fixture
def reference_backend():
    with mlx_fused_adafactor.backend("reference"):
        yield


def reference_run(p0, grads, compiled=False, **options):
    """adafactor_reference driven step by step, as the fallback drives it."""
    beta_1 = options.get("beta_1")
    lr = mx.array(options.get("learning_rate") or 0.0, mx.float32)
    hyper = {k: v for k, v in options.items() if k != "learning_rate"}
    state = {}
    if p0.ndim >= 2:
        state["exp_avg_sq_row"] = mx.zeros(p0.shape[:-1])
        state["exp_avg_sq_col"] = mx.zeros(p0.shape[:-2] + p0.shape[-1:])
    else:
        state["exp_avg_sq"] = mx.zeros(p0.shape)
    if beta_1 is not None:
        state["exp_avg"] = mx.zeros_like(p0)
    fn = lambda t, lr, p, g, s: adafactor_reference(t, lr, p, g, s, **hyper)  # noqa: E731
    if compiled:
        fn = mx.compile(fn)
    p = p0
    for i, g in enumerate(grads):
        p, state = fn(mx.array(i + 1, mx.uint64), lr, p, g, state)
    mx.eval(p, state)
    return p, state


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "momentum", "lr", "misc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_fused_f32(shape, options):
    p0 = rand(shape, 1)
    gs = grad_seq(shape, STEPS, 2)
    opt = Adafactor(**options)
    p = run(opt, {"p": p0}, [{"p": g} for g in gs])
    for compiled in (False, True):
        p_ref, s_ref = reference_run(p0, gs, compiled, **options)
        assert_trees_close((p["p"], opt.state["p"]), (p_ref, s_ref), TOL["float32"], f"ref compiled={compiled}")


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(33,), (31, 32), (2, 3, 5)], ids=str)
def test_reference_matches_fused_low_precision(shape, dtype_name):
    """Same float32 math, one rounding per step: identical up to the rare
    element whose float32 value sits at a rounding tie (one ulp)."""
    dtype = DTYPES[dtype_name]
    p0 = rand(shape, 3, dtype)
    gs = grad_seq(shape, STEPS, 4, dtype)
    opt = Adafactor(beta_1=0.9)
    p = run(opt, {"p": p0}, [{"p": g} for g in gs])
    p_ref, s_ref = reference_run(p0, gs, True, beta_1=0.9)
    assert p_ref.dtype == dtype and s_ref["exp_avg"].dtype == dtype
    for key, got, ref in (("p", p["p"], p_ref), ("exp_avg", opt.state["p"]["exp_avg"], s_ref["exp_avg"])):
        got, ref = to64(got), to64(ref)
        differ = got != ref
        assert differ.mean() <= 0.02, f"{key}: {differ.sum()} of {differ.size} elements differ"
        # A flip at an earlier step persists while the value shrinks: one
        # ulp at the tensor's largest magnitude.
        bound = ulp(max_abs(ref), dtype_name)
        assert max_err(got, ref) <= bound, key
    for key in s_ref:
        if key != "exp_avg":
            assert_close_to_max(to64(opt.state["p"][key]), to64(s_ref[key]), 1e-5, key)


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "momentum", "lr", "misc"])
def test_reference_backend_matches_fused_without_warning(options):
    params = {"w": rand((31, 32), 1), "b": rand((33,), 2), "s": rand((), 3), "c": rand((2, 3, 5), 4)}
    seqs = {k: grad_seq(v.shape, 5, 10 + i) for i, (k, v) in enumerate(params.items())}
    grads = [{k: v[j] for k, v in seqs.items()} for j in range(5)]

    opt = Adafactor(**options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mlx_fused_adafactor.backend("reference"):
            assert mlx_fused_adafactor.current_backend() == "reference"
            p = run(opt, params, grads)
    # Chosen, not fallen back to: nothing to warn about.
    assert not [w for w in caught if "[adafactor]" in str(w.message)]
    assert mlx_fused_adafactor.current_backend() == "auto"

    # Same numbers as the fused CPU path, same state layout and dtypes.
    cpu = Adafactor(**options)
    p_cpu = run(cpu, params, grads)
    assert_trees_close((p, opt.state), (p_cpu, cpu.state), TOL["float32"], "reference")
    for (k, a), (_, b) in zip(sorted(tree_flatten(opt.state)), sorted(tree_flatten(cpu.state))):
        assert a.dtype == b.dtype and a.shape == b.shape, k


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="MLX_FUSED_ADAFACTOR_BACKEND"):
        with mlx_fused_adafactor.backend("metal"):
            pass
    assert mlx_fused_adafactor.current_backend() == "auto"


def test_fallback_under_compile_and_low_precision(reference_backend):
    params = {"w": rand((8, 9), 1, mx.bfloat16), "b": rand((9,), 2, mx.float16)}
    grads = [{k: grad_seq(v.shape, 1, 20 + j)[0].astype(v.dtype) for k, v in params.items()} for j in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        eager = Adafactor(beta_1=0.9)
        p_eager = run(eager, params, grads)
        lazy = Adafactor(beta_1=0.9)
        p_lazy = run(lazy, params, grads, compiled=True)
    for opt, p in ((eager, p_eager), (lazy, p_lazy)):
        assert p["w"].dtype == mx.bfloat16 and p["b"].dtype == mx.float16
        assert opt.state["w"]["exp_avg_sq_row"].dtype == mx.float32
        assert opt.state["b"]["exp_avg_sq"].dtype == mx.float32
        assert opt.state["w"]["exp_avg"].dtype == mx.bfloat16
    assert_trees_close((p_lazy, lazy.state), (p_eager, eager.state), 0.0, "compiled fallback")


def test_fallback_bad_input_names_path_and_changes_nothing(reference_backend):
    params = {"layers": [{"w": rand((4, 5), 1)}, {"w": rand((5, 3), 2), "b": rand((3,), 3)}]}
    good = {"layers": [{"w": rand((4, 5), 4)}, {"w": rand((5, 3), 5), "b": rand((3,), 6)}]}
    opt = Adafactor(beta_1=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        params = opt.apply_gradients(good, params)
        mx.eval(params, opt.state)
        cases = [
            ({"layers": [good["layers"][0], {"w": rand((3, 5), 7), "b": good["layers"][1]["b"]}]},
             ValueError, "layers.1.w"),
            ({"layers": [{"w": good["layers"][0]["w"].astype(mx.int32)}]}, TypeError, "layers.0.w"),
        ]
        for grads, exc, path in cases:
            snap = snapshot(params, opt)
            with pytest.raises(exc, match=f"'{path}'"):
                mx.eval(opt.apply_gradients(grads, params))
            assert_unchanged(snap, params, opt)
        # A loaded state that does not fit.
        opt.state["layers"][1]["b"]["exp_avg_sq"] = mx.zeros((4,))
        snap = snapshot(params, opt)
        with pytest.raises(ValueError, match="'layers.1.b'"):
            mx.eval(opt.apply_gradients(good, params))
        assert_unchanged(snap, params, opt)


def test_backend_variable(tmp_path):
    """MLX_FUSED_ADAFACTOR_BACKEND sets the backend of the process; a value
    that is not a backend stops the import with a message naming it."""
    import os
    import subprocess
    import sys

    code = "import mlx_fused_adafactor as m; print(m.current_backend())"
    for value, expected in (("reference", "reference"), ("fused", "fused"), ("", "auto")):
        env = dict(os.environ, MLX_FUSED_ADAFACTOR_BACKEND=value)
        out = subprocess.run([sys.executable, "-c", code], env=env,
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
    env = dict(os.environ, MLX_FUSED_ADAFACTOR_BACKEND="gpu")
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "MLX_FUSED_ADAFACTOR_BACKEND='gpu' is not a backend" in out.stderr
