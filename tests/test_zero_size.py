"""Parameters without elements (issue 11 item 1): every shape family, with
column counts on both sides of AF_CPU_COL_BLOCK (16384; narrow matrices take
NOTE [folded update sum], wide ones pass 2), give stock's results on the
eager and the lazy path, and state of the right dtypes and shapes.

A matrix without rows has no tiles: its column partials and T_j partials
are empty scratch regions. Reading them read past the step's scratch, which
crashed or not depending on the heap layout; tests/test_sanitizers_cpu.py
runs this module under AddressSanitizer, where such a read always fails, and
shows that it does with the read planted back (NOTE: [fault switch])."""

import mlx.core as mx
import pytest

from afhelpers import DTYPES, assert_trees_close, assert_trees_equal, make, rand, run

NARROW = 16384  # AF_CPU_COL_BLOCK: one tile spans the row, the sum folds
WIDE = 16385  # two column blocks: pass 2
SHAPES = [
    (0,),
    (0, 5),
    (0, NARROW),
    (0, WIDE),
    (7, 0),
    (2, 3, 0),
    (2, 0, 5),
    (2, 0, NARROW),
    (3, 0, WIDE),
    (0, 3, 5),
    (0, 0),
]
OPTIONS = {"plain": {}, "momentum": {"beta_1": 0.9, "weight_decay": 0.01}}
STEPS = 3


def expected_state(shape, dtype, momentum):
    """{key: (shape, dtype)} of a parameter's state: the second moment in
    float32, exp_avg in the parameter dtype."""
    if len(shape) >= 2:
        state = {
            "exp_avg_sq_row": (shape[:-1], mx.float32),
            "exp_avg_sq_col": (shape[:-2] + shape[-1:], mx.float32),
        }
    else:
        state = {"exp_avg_sq": (shape, mx.float32)}
    if momentum:
        state["exp_avg"] = (shape, dtype)
    return state


def check_state(opt, params, momentum):
    for name, p in params.items():
        st = opt.state[name]
        want = expected_state(tuple(p.shape), p.dtype, momentum)
        got = {k: (tuple(v.shape), v.dtype) for k, v in st.items()}
        assert got == want, (name, got, want)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_zero_size_parameter_matches_stock(shape, options, compiled):
    # The parameter alone: its scratch regions end the step's scratch, so a
    # read past them leaves the allocation.
    params = {"e": mx.zeros(shape)}
    grads = [{"e": mx.ones(shape)} for _ in range(STEPS)]
    stock = make("stock", **OPTIONS[options])
    expected = run(stock, params, grads)
    fused = make("fused", **OPTIONS[options])
    got = run(fused, params, grads, compiled=compiled)
    check_state(fused, params, "beta_1" in OPTIONS[options])
    # Stock's mean over an empty axis is NaN; NaN-equal comparison.
    assert_trees_close((got, fused.state), (expected, stock.state), 0.0, str(shape))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_zero_size_parameters_beside_others(dtype_name, compiled):
    # Every family in one step (one primitive), between non-empty tensors:
    # the empty ones give stock's results, the others are bitwise what they
    # are in a step without the empty ones.
    dtype = DTYPES[dtype_name]
    empty = {f"z{i:02d}": mx.zeros(s, dtype) for i, s in enumerate(SHAPES)}
    full = {"a": rand((5, 7), 1, dtype), "b": rand((9,), 2, dtype),
            "c": rand((3, 4, 6), 3, dtype)}
    params = {**empty, **full}
    grads = [{k: rand(v.shape, 10 * j + i, dtype) for i, (k, v) in enumerate(params.items())}
             for j in range(STEPS)]
    options = OPTIONS["momentum"]

    fused = make("fused", **options)
    got = run(fused, params, grads, compiled=compiled)
    check_state(fused, params, True)
    assert all(got[k].dtype == dtype for k in params)

    stock = make("stock", **options)
    expected = run(stock, empty, [{k: g[k] for k in empty} for g in grads])
    assert_trees_close(({k: got[k] for k in empty}, {k: fused.state[k] for k in empty}),
                       (expected, {k: stock.state[k] for k in empty}), 0.0, "empty")

    alone = make("fused", **options)
    got_full = run(alone, full, [{k: g[k] for k in full} for g in grads], compiled=compiled)
    assert_trees_equal(({k: got[k] for k in full}, {k: fused.state[k] for k in full}),
                       (got_full, {k: alone.state[k] for k in full}), "non-empty")
