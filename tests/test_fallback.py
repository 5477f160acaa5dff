"""The pure-MLX implementation (adafactor_reference) and the routing to it on
GPU streams without a compiled kernel (issue item 6).

There is no GPU here. The routing is exercised by making mx.default_device()
report a GPU (and the build report no GPU kernels): only those two queries
are replaced, the fallback's math runs for
real (mx.compile of adafactor_reference, on the CPU stream MLX actually uses).
"""

import warnings

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_fused_adafactor.optimizer as fused_module
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
from mlx_fused_adafactor import _ext

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
def fake_gpu(monkeypatch):
    """mx.default_device() reports a GPU and the build has no GPU kernels
    (as with MLX's CUDA backend; here already true, on macOS it is the
    stated condition); the fallback warning is re-armed."""
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    monkeypatch.setattr(_ext, "has_metal_kernels", False)
    monkeypatch.setattr(fused_module, "_fallback_warned", False)


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
def test_gpu_stream_without_kernels_falls_back_with_one_warning(fake_gpu, options):
    params = {"w": rand((31, 32), 1), "b": rand((33,), 2), "s": rand((), 3), "c": rand((2, 3, 5), 4)}
    seqs = {k: grad_seq(v.shape, 5, 10 + i) for i, (k, v) in enumerate(params.items())}
    grads = [{k: v[j] for k, v in seqs.items()} for j in range(5)]

    opt = Adafactor(**options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = run(opt, params, grads)
        p = run(opt, p, grads[:1])
    ours = [w for w in caught if "[adafactor]" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert issubclass(ours[0].category, RuntimeWarning)
    assert "gpu" in str(ours[0].message).lower()

    # Same numbers as the fused CPU path, same state layout and dtypes.
    cpu = Adafactor(**options)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
        p_cpu = run(cpu, params, grads)
        p_cpu = run(cpu, p_cpu, grads[:1])
    assert_trees_close((p, opt.state), (p_cpu, cpu.state), TOL["float32"], "fallback")
    for (k, a), (_, b) in zip(sorted(tree_flatten(opt.state)), sorted(tree_flatten(cpu.state))):
        assert a.dtype == b.dtype and a.shape == b.shape, k


def test_fallback_under_compile_and_low_precision(fake_gpu):
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


def test_fallback_bad_input_names_path_and_changes_nothing(fake_gpu):
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
