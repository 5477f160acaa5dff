"""float32 parity of the fused optimizer with mlx.optimizers.Adafactor.

Every test runs the same gradients through stock, through the fused eager
path (NOTE [eager step]) and through the fused lazy primitive (the optimizer
under mx.compile), and compares params and every state entry after several
steps. Eager and lazy run the same CPU code with the same tiles, so they must
agree bitwise with each other.
"""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from afhelpers import (
    StockAdafactor,
    assert_close_to_max,
    assert_trees_close,
    assert_trees_equal,
    flat,
    grad_seq,
    make,
    max_abs,
    max_err,
    rand,
    run,
    to64,
)
from mlx_fused_adafactor import Adafactor
from reference64 import run64

# Tolerances, relative to max|x| of the expected array (params and each state
# entry), after STEPS steps.
#   STOCK: fused vs stock where stock's float32 reductions are accurate
#          (the 1e-5 contract).
#   LOOSE: fused vs stock on the large shapes, where stock's mx.mean over
#          ~1e5 elements drifts by up to ~5e-5 relative (so does lr, and
#          exp_avg which scales with it); at 4.2M elements (1031, 4097)
#          stock's exp_avg is 1.3e-4 of max|x| off float64 while the fused
#          one is 3.5e-7. There the float64 oracle decides: the fused error
#          must not exceed stock's plus SLACK.
#   SLACK: two float32 ulps at max|x|, for elements where both are exact to
#          rounding and the comparison is a coin toss.
TOL = {"float32": {"STOCK": 1e-5, "LOOSE": 5e-4, "SLACK": 2.0**-22}}
STEPS = 25

# Sizes around the edges and the CPU tiling (AF_CPU_COL_BLOCK=16384
# columns, AF_CPU_TILE=65536 elements, AF_CPU_MAX_ROW_BLOCKS=64). Matrices of
# at most AF_CPU_COL_BLOCK columns fold sum(u^2) into pass 1, wider ones run
# pass 2 (NOTE: [folded update sum]); both kinds are below.
ACCURATE_SHAPES = [
    (),
    (1,),
    (31,),
    (32,),
    (33,),
    (4099,),
    (1, 1),
    (1, 33),
    (33, 1),
    (31, 32),
    (32, 33),
    (1, 4099),
    (4099, 1),
    (2, 3, 5),
    (2, 3, 4, 5),
    (3, 1, 33),
]
# Stock's float32 means drift here; the float64 oracle decides. (1031, 4097)
# crosses the 64 row-block cap and a 1-column tail block (4.2M elements, so
# only a few steps).
LARGE_SHAPES = [
    ((70000,), STEPS),
    ((3, 4099), STEPS),
    ((3, 16385), 5),
    ((2000, 40), 10),
    ((300, 700), 10),
    ((1031, 4097), 2),
    ((70000, 1), 10),
    ((1, 70000), 10),
    ((3, 70, 4099), 3),
    ((2, 2, 300, 130), 5),
]
EMPTY_SHAPES = [(0,), (0, 5), (5, 0), (2, 0, 3), (3, 0)]
# Tall matrices, where every sum of the step runs over N rows: the mean of
# the row state as much as the column sums and sum(p^2) (NOTE: [chunked
# sums]). (N, 64) stops at N = 64K rows, 4M elements like the others: at
# N = 4M rows stock alone would need gigabytes and a minute.
TALL_SHAPES = [(1 << 20, 1), (1 << 22, 1), (1 << 22, 2), (1 << 16, 64)]

OPTIONS = {
    "default": {},
    "beta_1=0.9": {"beta_1": 0.9},
    "beta_1=0": {"beta_1": 0.0},
    "weight_decay": {"weight_decay": 0.1},
    "no_scale": {"scale_parameter": False},
    "lr": {"relative_step": False, "learning_rate": 1e-2},
    "lr_no_scale_all": {
        "relative_step": False,
        "learning_rate": 3e-3,
        "scale_parameter": False,
        "beta_1": 0.8,
        "weight_decay": 0.05,
    },
    "warmup_init": {"warmup_init": True},
    "clip_0.5": {"clip_threshold": 0.5},
    "clip_100": {"clip_threshold": 100.0},
    "decay_-0.5": {"decay_rate": -0.5},
    "decay_-0.997": {"decay_rate": -0.997},
    "eps_big": {"eps": (1e-2, 2.0)},
    "eps_zero": {"eps": (0.0, 0.0)},
    "cosine_schedule": {
        "relative_step": False,
        "learning_rate": optim.cosine_decay(1e-2, 20, 1e-4),
    },
    "warmup_schedule": {
        "relative_step": False,
        "beta_1": 0.9,
        "learning_rate": optim.join_schedules(
            [optim.linear_schedule(0.0, 1e-2, 5), optim.exponential_decay(1e-2, 0.9)],
            [5],
        ),
    },
    "warmup_init_no_scale": {"warmup_init": True, "scale_parameter": False},
    # Ignored with relative_step=True (stock ignores it too; fused warns).
    "lr_ignored": {"learning_rate": 0.5},
    "schedule_ignored": {"learning_rate": optim.step_decay(0.5, 0.5, 3), "beta_1": 0.9},
    "lr_array": {"relative_step": False, "learning_rate": mx.array(2e-2)},
}

TREE_SHAPES = {
    "w": (31, 33),
    "b": (33,),
    "s": (),
    "conv": (2, 3, 5),
    "blocks": [{"w": (4, 1)}, {"w": (1, 7), "b": (1,)}],
}


def tree_of(shapes, fn):
    if isinstance(shapes, dict):
        return {k: tree_of(v, fn) for k, v in shapes.items()}
    if isinstance(shapes, list):
        return [tree_of(v, fn) for v in shapes]
    return fn(shapes)


def three_runs(options, params, grads):
    """Stock, fused eager and fused compiled, each from the same start."""
    out = {}
    for name, kind, compiled in (
        ("stock", "stock", False),
        ("eager", "fused", False),
        ("lazy", "fused", True),
    ):
        opt = make(kind, **options)
        p = run(opt, params, grads, compiled=compiled)
        out[name] = (p, opt.state)
    return out


def check_fused_paths(out, tol, what):
    # The two fused paths share their code and tiles: bitwise equal.
    assert_trees_equal(out["eager"], out["lazy"], f"{what} eager vs lazy")
    for path in ("eager", "lazy"):
        assert_trees_close(out[path], out["stock"], tol, f"{what} {path}")


@pytest.mark.parametrize("shape", ACCURATE_SHAPES, ids=str)
def test_shapes_match_stock(shape):
    params = {"p": rand(shape, 1)}
    grads = [{"p": g} for g in grad_seq(shape, STEPS, 2)]
    out = three_runs({}, params, grads)
    check_fused_paths(out, TOL["float32"]["STOCK"], str(shape))


@pytest.mark.parametrize("shape", [(33,), (31, 32), (2, 3, 5)], ids=str)
def test_shapes_match_stock_with_momentum_and_decay(shape):
    options = {"beta_1": 0.9, "weight_decay": 0.01}
    params = {"p": rand(shape, 3)}
    grads = [{"p": g} for g in grad_seq(shape, STEPS, 4)]
    out = three_runs(options, params, grads)
    check_fused_paths(out, TOL["float32"]["STOCK"], str(shape))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_match_stock(name):
    options = OPTIONS[name]
    counter = iter(range(1000))
    params = tree_of(TREE_SHAPES, lambda s: rand(s, 100 + next(counter)))
    seqs = tree_of(TREE_SHAPES, lambda s: grad_seq(s, STEPS, 200 + next(counter)))
    grads = [tree_of_index(seqs, i) for i in range(STEPS)]
    if "learning_rate" in options and options.get("relative_step", True):
        with pytest.warns(UserWarning, match="ignored"):
            out = three_runs(options, params, grads)
    else:
        out = three_runs(options, params, grads)
    check_fused_paths(out, TOL["float32"]["STOCK"], name)
    # The state tree is the stock one, learning_rate included.
    assert sorted(flat(out["eager"][1])) == sorted(flat(out["stock"][1]))


def tree_of_index(seqs, i):
    if isinstance(seqs, dict):
        return {k: tree_of_index(v, i) for k, v in seqs.items()}
    if isinstance(seqs, list) and seqs and isinstance(seqs[0], (dict, list)):
        return [tree_of_index(v, i) for v in seqs]
    return seqs[i]


@pytest.mark.parametrize("shape,steps", LARGE_SHAPES, ids=lambda x: str(x))
def test_large_shapes_no_worse_than_stock(shape, steps):
    options = {"beta_1": 0.9} if len(shape) == 2 else {}
    p0 = rand(shape, 5)
    gs = grad_seq(shape, steps, 6)
    out = three_runs(options, {"p": p0}, [{"p": g} for g in gs])
    assert_trees_equal(out["eager"], out["lazy"], "eager vs lazy")

    p64, s64 = run64(to64(p0), [to64(g) for g in gs], **options)
    ref = {"p": p64, **s64}
    tol = TOL["float32"]
    for path in ("eager", "lazy"):
        got = flat({"p": out[path][0]["p"], **out[path][1]["p"]})
        stock = flat({"p": out["stock"][0]["p"], **out["stock"][1]["p"]})
        for key, expected in ref.items():
            scale = max_abs(expected)
            err_fused = max_err(got[key], expected)
            err_stock = max_err(stock[key], expected)
            assert err_fused <= err_stock + tol["SLACK"] * scale, (
                f"{path} {key}: fused error {err_fused:.3g} > stock error "
                f"{err_stock:.3g} against float64"
            )
            assert_close_to_max(got[key], stock[key], tol["LOOSE"], f"{path} {key}")


@pytest.mark.parametrize("shape", TALL_SHAPES, ids=str)
def test_tall_shapes_no_worse_than_stock(shape):
    # One step: the row mean's error shows at once (with one column the
    # factors are r_i / mean(r) against mean(g^2); a sequential float32
    # mean put the fused update 2-3.7x further from float64 than stock's).
    # The update p - p0 is measured against its largest element, as the
    # issue did; the state entries against their own largest.
    p0 = rand(shape, 5)
    gs = grad_seq(shape, 1, 6)
    got = {}
    for kind in ("stock", "fused"):
        opt = make(kind)
        p = run(opt, {"p": p0}, [{"p": g} for g in gs])
        got[kind] = flat({"p": p["p"], **opt.state["p"]})
    p64, s64 = run64(to64(p0), [to64(g) for g in gs])
    start = to64(p0)
    ref = {"update": p64 - start, **s64}
    for kind in got:
        got[kind]["update"] = got[kind].pop("p") - start
    for key, expected in ref.items():
        scale = max_abs(expected)
        err_fused = max_err(got["fused"][key], expected) / scale
        err_stock = max_err(got["stock"][key], expected) / scale
        # Both exact to a few ulps of float32 is a coin toss: 2^-21 slack.
        assert err_fused <= err_stock + 2.0**-21, (
            f"{shape} {key}: fused error {err_fused:.3g} > stock error "
            f"{err_stock:.3g} against float64 (relative to max |x|)"
        )


@pytest.mark.parametrize("scale", [1e-16, 1e-19], ids=["tiny", "subnormal"])
def test_tiny_second_moments_match_stock(scale):
    # With eps1 = 0 the row EMAs follow g^2: below the fold's floor at 1e-16
    # (NOTE: [folded update sum]) and subnormal at 1e-19, where 1/r_i
    # overflows. Those matrices take pass 2, and must still match stock; the
    # unit-scale matrix beside them folds.
    shapes = {"a": (40, 50), "b": (7, 300)}
    params = {k: rand(s, 11) for k, s in shapes.items()}
    params["c"] = rand((20, 30), 12)
    seqs = {k: grad_seq(s, 6, 13) for k, s in shapes.items()}
    grads = [
        {**{k: scale * seqs[k][i] for k in shapes}, "c": g}
        for i, g in enumerate(grad_seq((20, 30), 6, 14))
    ]
    out = three_runs({"eps": (0.0, 1e-3)}, params, grads)
    check_fused_paths(out, TOL["float32"]["STOCK"], f"scale {scale}")


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_tensors_match_stock(shape):
    # Stock's mean over an empty axis is NaN; the fused path keeps that.
    params = {"e": mx.zeros(shape), "w": rand((3, 4), 7)}
    grads = [{"e": mx.ones(shape), "w": g} for g in grad_seq((3, 4), 5, 8)]
    out = three_runs({"beta_1": 0.5}, params, grads)
    check_fused_paths(out, TOL["float32"]["STOCK"], str(shape))


def noncontiguous_inputs():
    """Parameters and gradients that are not row-contiguous: transposes,
    strided slices, and a broadcast (stride 0) gradient."""
    base_p = rand((33, 40), 9)
    base_p1 = rand((70,), 10)
    p = {"t": base_p.T, "s": base_p1[::2], "b": rand((5, 33), 11)[:, 1:]}
    grads = []
    for i, g in enumerate(grad_seq((33, 40), 6, 12)):
        g1 = rand((70,), 300 + i)
        grads.append(
            {
                "t": g.T,
                "s": g1[1::2],
                "b": mx.broadcast_to(rand((1, 32), 400 + i), (5, 32)),
            }
        )
    return p, grads


def test_noncontiguous_inputs_match_stock():
    params, grads = noncontiguous_inputs()
    out = three_runs({"beta_1": 0.9}, params, grads)
    check_fused_paths(out, TOL["float32"]["STOCK"], "non-contiguous")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_large_strided_gradients_equal_contiguous_copies(compiled):
    """Gradients as the backward pass leaves them (a linear layer's weight
    gradient is a transposed view), large enough to be deferred and copied
    in many tiles on every thread; also batched, reversed and broadcast:
    bitwise the step on contiguous copies."""
    shapes = {"t": (700, 1100), "b": (3, 130, 700), "r": (300_000,), "c": (600, 520)}
    params = {k: rand(s, 60 + i) for i, (k, s) in enumerate(shapes.items())}
    grads = []
    for j in range(2):
        grads.append({
            "t": rand((1100, 700), 70 + j).T,
            "b": mx.swapaxes(rand((3, 700, 130), 80 + j), 1, 2),
            "r": rand((300_000,), 90 + j)[::-1],
            "c": mx.broadcast_to(rand((1, 520), 95 + j), (600, 520)),
        })
    contiguous = [{k: mx.array(np.array(v)) for k, v in g.items()} for g in grads]
    out = {}
    for name, gs in (("views", grads), ("copies", contiguous)):
        opt = Adafactor(beta_1=0.9)
        out[name] = (run(opt, params, gs, compiled=compiled), opt.state)
    assert_trees_equal(out["views"], out["copies"], "strided vs contiguous")


def test_many_tensors_one_step_match_stock():
    # Enough tensors and elements for the threaded path, fused in one
    # primitive: every one must match its own stock update.
    shapes = [(17, 3), (4099,), (64, 1100), (1,), (5, 4, 3), (70000,), (2, 4097)]
    params = {f"t{i}": rand(s, 20 + i) for i, s in enumerate(shapes)}
    seqs = {f"t{i}": grad_seq(s, 4, 40 + i) for i, s in enumerate(shapes)}
    grads = [{k: v[j] for k, v in seqs.items()} for j in range(4)]
    out = three_runs({}, params, grads)
    assert_trees_equal(out["eager"], out["lazy"], "eager vs lazy")
    # (64, 1100) and (70000,) are in stock's drift range; LOOSE here, the
    # single-tensor tests hold the tight bound.
    assert_trees_close(out["eager"], out["stock"], TOL["float32"]["LOOSE"], "many")


@pytest.mark.parametrize("t0", [5000, 2**24 + 1, 10**8, 2**40])
@pytest.mark.parametrize("options", [{"beta_1": 0.9}, {"warmup_init": True}], ids=["momentum", "warmup"])
def test_step_count_continues_from_loaded_state(t0, options):
    # Late steps: beta_2 close to 1, rsqrt(step) below 1e-2 (and below
    # 1e-6 * step with warmup_init), step counts float32 cannot hold exactly.
    params = {"w": rand((8, 9), 13), "b": rand((9,), 14)}
    grads = [{"w": g, "b": h} for g, h in zip(grad_seq((8, 9), 4, 15), grad_seq((9,), 4, 16))]
    out = {}
    for name, kind, compiled in (("stock", "stock", False), ("eager", "fused", False), ("lazy", "fused", True)):
        opt = make(kind, **options)
        opt.init(params)
        opt.state["step"] = mx.array(t0, mx.uint64)
        p = run(opt, params, grads, compiled=compiled)
        out[name] = (p, opt.state)
    assert int(out["eager"][1]["step"].item()) == t0 + 4
    check_fused_paths(out, TOL["float32"]["STOCK"], f"step {t0}")


def test_noncontiguous_state_and_parameters():
    """A loaded state (or a parameter) may be a view: broadcast, strided or
    transposed. Results are bitwise those of contiguous copies."""
    p = rand((6, 8), 1)
    grads = [{"p": g} for g in grad_seq((6, 8), 2, 2)]
    views = {
        "exp_avg_sq_row": mx.broadcast_to(mx.array(0.5), (6,)),
        "exp_avg_sq_col": mx.abs(rand((16,), 3))[::2],
        "exp_avg": rand((8, 6), 4).T,
    }
    copies = {k: mx.array(np.array(v)) for k, v in views.items()}
    p_view = mx.broadcast_to(rand((1, 8), 5), (6, 8))
    p_copy = mx.array(np.array(p_view))
    results = []
    for state, param in ((copies, p_copy), (views, p_view)):
        for compiled in (False, True):
            opt = make("fused", beta_1=0.9)
            opt.init({"p": param})
            opt.state["p"].update(state)
            new = run(opt, {"p": param}, grads, compiled=compiled)
            results.append((new, opt.state))
    for other in results[1:]:
        assert_trees_equal(other, results[0], "views")


def test_lazy_primitive_matches_eager_from_any_state():
    """The lazy primitive (the step traced by mx.compile) gives bitwise the
    eager results from an arbitrary state at step 7, and both are stock's
    step from that state."""
    from mlx_fused_adafactor import _ext

    shapes = [(31, 33), (33,), (2, 3, 5), (), (3, 4099)]
    ps = [rand(s, 50 + i) for i, s in enumerate(shapes)]
    gs = [grad_seq(s, 1, 60 + i)[0] for i, s in enumerate(shapes)]
    hyper = Adafactor(beta_1=0.9, weight_decay=0.01).hyper
    states = []
    for p in ps:
        if p.ndim >= 2:
            st = {"exp_avg_sq_row": mx.abs(rand(p.shape[:-1], 70)),
                  "exp_avg_sq_col": mx.abs(rand(p.shape[:-2] + p.shape[-1:], 71))}
        else:
            st = {"exp_avg_sq": mx.abs(rand(p.shape, 72))}
        st["exp_avg"] = rand(p.shape, 73)
        states.append(st)
    names = [f"t{i}" for i in range(len(shapes))]

    def step(ps, gs, states):
        return _ext.apply_leaves(mx.array(7, mx.uint64), mx.array(0.0), ps, gs,
                                 states, names, hyper)

    lazy = mx.compile(step)(ps, gs, states)
    eager = step(ps, gs, states)
    assert_trees_equal(lazy, eager, "lazy vs eager")
    # And both are stock's step 7 from this state.
    opt = StockAdafactor(beta_1=0.9, weight_decay=0.01)
    opt.state["step"] = mx.array(7, mx.uint64)
    for i, (p, g, st) in enumerate(zip(ps, gs, states)):
        state = dict(st)
        new_p = opt.apply_single(g, p, state)
        tol = TOL["float32"]["LOOSE" if p.size > 10000 else "STOCK"]
        assert_close_to_max(to64(lazy[0][i]), to64(new_p), tol, f"{names[i]} param")
        for k, expected in state.items():
            assert_close_to_max(to64(lazy[1][i][k]), to64(expected), tol,
                                f"{names[i]} {k}")


def test_parity_check_catches_a_small_error():
    """The comparison is not vacuous: a 3e-5 relative error in one element
    of one state entry (on both fused paths alike) fails it."""
    shape = (31, 32)
    params = {"p": rand(shape, 1)}
    grads = [{"p": g} for g in grad_seq(shape, 3, 2)]
    out = three_runs({}, params, grads)
    check_fused_paths(out, TOL["float32"]["STOCK"], "clean")
    for path in ("eager", "lazy"):
        row = np.array(out[path][1]["p"]["exp_avg_sq_row"])
        row[7] *= 1 + 3e-5 * row.max() / row[7]
        out[path][1]["p"]["exp_avg_sq_row"] = mx.array(row)
    with pytest.raises(AssertionError, match="exp_avg_sq_row"):
        check_fused_paths(out, TOL["float32"]["STOCK"], "corrupted")


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=["f32", "bf16", "fp16"])
def test_noncontiguous_inputs_equal_contiguous_copies(dtype):
    params, grads = noncontiguous_inputs()
    params = {k: v.astype(dtype) for k, v in params.items()}
    params["t"] = rand((33, 40), 9, dtype).T  # transposed in the dtype itself
    grads = [{k: v.astype(dtype) for k, v in g.items()} for g in grads]
    for i, g in enumerate(grads):
        g["t"] = grad_seq((33, 40), 1, 500 + i, dtype)[0].T
    copy = lambda x: mx.array(np.array(x.astype(mx.float32))).astype(dtype)  # noqa: E731
    results = []
    for p, gs in ((params, grads), ({k: copy(v) for k, v in params.items()},
                                    [{k: copy(v) for k, v in g.items()} for g in grads])):
        for compiled in (False, True):
            opt = make("fused", beta_1=0.9)
            new = run(opt, p, gs, compiled=compiled)
            results.append((new, opt.state))
    for other in results[1:]:
        assert_trees_equal(other, results[0], "non-contiguous vs copies")
