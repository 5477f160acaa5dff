"""Bad input: a clear error naming the parameter path, and nothing changed
(params, every state entry and the step count are what they were)."""

import re
import warnings

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from afhelpers import (
    StockAdafactor,
    assert_trees_close,
    assert_unchanged,
    flat,
    grad_seq,
    make,
    rand,
    run,
    snapshot,
)
from mlx_fused_adafactor import Adafactor


def model_params(dtype=mx.float32):
    return {
        "embed": {"weight": rand((7, 5), 1, dtype)},
        "layers": [
            {"weight": rand((5, 5), 2, dtype), "bias": rand((5,), 3, dtype)},
            {"weight": rand((5, 4), 4, dtype), "bias": rand((4,), 5, dtype)},
        ],
        "scale": rand((), 6, dtype),
    }


def grads_like(params, seed=10):
    flat_p = tree_flatten(params)
    return tree_unflatten(
        [(k, rand(v.shape, seed + i, v.dtype)) for i, (k, v) in enumerate(flat_p)]
    )


def fresh_and_stepped(**options):
    """A fresh optimizer and one that has taken a step (state present)."""
    params = model_params()
    fresh = Adafactor(**options)
    stepped = Adafactor(**options)
    stepped_params = stepped.apply_gradients(grads_like(params), params)
    mx.eval(stepped_params, stepped.state)
    return [(fresh, params), (stepped, stepped_params)]


def expect_error(opt, grads, params, exc, path):
    snap = snapshot(params, opt)
    with pytest.raises(exc) as info:
        out = opt.apply_gradients(grads, params)
        mx.eval(out)
    message = str(info.value)
    assert f"'{path}'" in message, message
    assert message.startswith("[adafactor]"), message
    assert_unchanged(snap, params, opt)
    return message


def with_grad(grads, path, value):
    flat_g = dict(tree_flatten(grads))
    flat_g[path] = value
    return tree_unflatten(list(flat_g.items()))


# ----------------------------------------------------------- tree mismatches


@pytest.mark.parametrize("which", ["fresh", "stepped"])
def test_gradient_without_parameter(which):
    opt, params = fresh_and_stepped()[which == "stepped"]
    grads = grads_like(params)
    grads["layers"][1]["extra"] = rand((4,), 99)
    expect_error(opt, grads, params, ValueError, "layers.1.extra")
    grads = grads_like(params)
    grads["head"] = {"weight": rand((3, 3), 98)}
    expect_error(opt, grads, params, ValueError, "head")


@pytest.mark.parametrize("which", ["fresh", "stepped"])
def test_gradient_list_longer_than_parameters(which):
    opt, params = fresh_and_stepped()[which == "stepped"]
    grads = grads_like(params)
    grads["layers"].append({"weight": rand((4, 4), 97)})
    expect_error(opt, grads, params, ValueError, "layers")


@pytest.mark.parametrize("which", ["fresh", "stepped"])
def test_gradient_tree_deeper_or_shallower(which):
    opt, params = fresh_and_stepped()[which == "stepped"]
    grads = grads_like(params)
    grads["scale"] = {"x": rand((), 96)}  # a dict where the parameter is an array
    expect_error(opt, grads, params, ValueError, "scale")
    grads = grads_like(params)
    grads["embed"] = rand((7, 5), 95)  # an array where the parameters are a dict
    expect_error(opt, grads, params, ValueError, "embed")


@pytest.mark.parametrize("which", ["fresh", "stepped"])
@pytest.mark.parametrize(
    "path,shape",
    [("layers.0.weight", (5, 4)), ("layers.1.bias", (5,)), ("scale", (1,)), ("embed.weight", (5, 7))],
)
def test_gradient_shape_mismatch(which, path, shape):
    opt, params = fresh_and_stepped()[which == "stepped"]
    grads = with_grad(grads_like(params), path, rand(shape, 94))
    expect_error(opt, grads, params, ValueError, path)


def test_missing_gradient_is_a_subset_not_an_error():
    # Params may be a superset of the gradients (stock semantics): the
    # missing parameter is neither updated nor given state.
    params = model_params()
    grads = grads_like(params)
    del grads["embed"]
    opt = Adafactor()
    new = opt.apply_gradients(grads, params)
    assert "embed" not in new and "embed" not in opt.state


def test_error_in_one_dtype_group_leaves_other_groups_alone():
    params = {"a": rand((6, 5), 1), "b": rand((6, 5), 2, mx.bfloat16), "c": rand((5,), 3, mx.float16)}
    opt = Adafactor(beta_1=0.9)
    params = opt.apply_gradients(grads_like(params), params)
    mx.eval(params, opt.state)
    for bad in ("a", "b", "c"):
        grads = grads_like(params, seed=50)
        grads[bad] = rand((2, 2), 60, params[bad].dtype)
        expect_error(opt, grads, params, ValueError, bad)
    # And the optimizer still works, from the unchanged state.
    params = opt.apply_gradients(grads_like(params, seed=70), params)
    mx.eval(params)
    assert opt.state["step"].item() == 2


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.bool_, mx.complex64, mx.int64])
@pytest.mark.parametrize("which", ["fresh", "stepped"])
def test_non_float_parameter(dtype, which):
    opt, params = fresh_and_stepped()[which == "stepped"]
    params = dict(params)
    params["layers"] = [dict(params["layers"][0]), params["layers"][1]]
    params["layers"][0]["bias"] = mx.zeros((5,), dtype)
    grads = grads_like(params)
    grads["layers"][0]["bias"] = mx.zeros((5,), mx.float32)
    expect_error(opt, grads, params, TypeError, "layers.0.bias")
    grads["layers"][0]["bias"] = mx.zeros((5,), dtype)
    expect_error(opt, grads, params, TypeError, "layers.0.bias")


@pytest.mark.parametrize("dtype", [mx.int32, mx.complex64])
def test_non_float_gradient(dtype):
    opt, params = fresh_and_stepped()[1]
    grads = with_grad(grads_like(params), "layers.1.weight", mx.zeros((5, 4), dtype))
    expect_error(opt, grads, params, TypeError, "layers.1.weight")


def test_non_array_gradient():
    opt, params = fresh_and_stepped()[1]
    grads = grads_like(params)
    grads["scale"] = 1.0
    expect_error(opt, grads, params, TypeError, "scale")


# ---------------------------------------------------------- hyper-parameters

# Values for which the step is meaningless (ValueError) or that are not
# numbers at all (TypeError); each message names the option.
BAD_HYPER = [
    ({"decay_rate": 0.5}, ValueError, "decay_rate"),
    ({"clip_threshold": 0.0}, ValueError, "clip_threshold"),
    ({"clip_threshold": -1.0}, ValueError, "clip_threshold"),
    ({"eps": (1e-30,)}, TypeError, "eps"),
    ({"eps": (1e-30, 1e-3, 1.0)}, TypeError, "eps"),
    ({"eps": (-1e-30, 1e-3)}, ValueError, "eps[0]"),
    ({"eps": (1e-30, -1e-3)}, ValueError, "eps[1]"),
    ({"eps": 1e-3}, TypeError, "eps"),
    ({"eps": "ab"}, TypeError, "eps"),
    ({"eps": ("a", 1e-3)}, TypeError, "eps[0]"),
    ({"eps": (1e-30, None)}, TypeError, "eps[1]"),
    ({"eps": (float("nan"), 1e-3)}, ValueError, "eps[0]"),
    ({"eps": (1e-30, float("inf"))}, ValueError, "eps[1]"),
    ({"beta_1": -0.1}, ValueError, "beta_1"),
    ({"beta_1": 1.5}, ValueError, "beta_1"),
    ({"relative_step": False}, ValueError, "learning_rate"),
    ({"relative_step": False, "learning_rate": None}, ValueError, "learning_rate"),
    ({"clip_threshold": None}, TypeError, "clip_threshold"),
    ({"clip_threshold": float("nan")}, ValueError, "clip_threshold"),
    ({"clip_threshold": float("inf")}, ValueError, "clip_threshold"),
    ({"clip_threshold": 1e300}, ValueError, "clip_threshold"),
    ({"decay_rate": "fast"}, TypeError, "decay_rate"),
    ({"decay_rate": float("nan")}, ValueError, "decay_rate"),
    ({"decay_rate": -float("inf")}, ValueError, "decay_rate"),
    ({"beta_1": "0.9"}, TypeError, "beta_1"),
    ({"beta_1": float("nan")}, ValueError, "beta_1"),
    ({"weight_decay": None}, TypeError, "weight_decay"),
    ({"weight_decay": float("nan")}, ValueError, "weight_decay"),
    ({"weight_decay": mx.array([0.1, 0.2])}, TypeError, "weight_decay"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_HYPER,
                         ids=[str(k) for k, _, _ in BAD_HYPER])
def test_bad_hyper_parameters_raise_at_construction(kwargs, exc, name):
    with pytest.raises(exc, match=re.escape(name)):
        Adafactor(**kwargs)


@pytest.mark.parametrize("kwargs,exc,name",
                         [c for c in BAD_HYPER if "relative_step" not in c[0]],
                         ids=[str(k) for k, _, _ in BAD_HYPER
                              if "relative_step" not in k])
def test_bad_hyper_parameters_raise_on_assignment(kwargs, exc, name):
    """An assignment after construction is checked as the constructor
    checks, and a refused one changes nothing: neither the attribute nor
    the next step."""
    opt = Adafactor(beta_1=0.5)
    params = {"w": mx.ones((2, 3))}
    grads = {"w": mx.full((2, 3), 0.1)}
    expected = Adafactor(beta_1=0.5).apply_gradients(grads, params)
    (key, value), = kwargs.items()
    before = getattr(opt, key)
    with pytest.raises(exc, match=re.escape(name)):
        setattr(opt, key, value)
    assert getattr(opt, key) == before
    got = opt.apply_gradients(grads, params)
    assert mx.array_equal(got["w"], expected["w"]).item()


def test_stock_fails_late_without_learning_rate():
    # What the construction-time error replaces: stock builds, then fails in
    # the first step with a KeyError.
    opt = StockAdafactor(relative_step=False)
    with pytest.raises(KeyError):
        opt.apply_gradients({"w": mx.ones((2, 2))}, {"w": mx.ones((2, 2))})


# Values at the edge of what is well defined, and the value types stock
# takes (NumPy scalars, 0-D mlx arrays): accepted, with stock's results.
EDGE_HYPER = [
    {"beta_1": 0.0}, {"beta_1": 1.0}, {"weight_decay": 0.0}, {"eps": (0.0, 0.0)},
    {"eps": [1e-30, 1e-3]}, {"decay_rate": -1e-3}, {"decay_rate": 0.0},
    {"clip_threshold": 1e-6}, {"beta_1": 0.999}, {"weight_decay": -0.01},
    {"relative_step": False, "learning_rate": 0.0},
    {"clip_threshold": np.float32(1.0)}, {"clip_threshold": np.float64(0.5)},
    {"clip_threshold": mx.array(2.0)}, {"decay_rate": np.float32(-0.5)},
    {"beta_1": np.float32(0.9)}, {"weight_decay": mx.array(0.01)},
    {"eps": (np.float32(1e-30), mx.array(1e-3))}, {"eps": np.array([1e-30, 1e-3])},
    {"scale_parameter": np.bool_(False)}, {"clip_threshold": 2},
]


@pytest.mark.parametrize("kwargs", EDGE_HYPER, ids=str)
def test_edge_hyper_parameters_accepted_as_stock(kwargs):
    params = {"w": mx.ones((2, 3)), "b": mx.ones((3,))}
    grads = {"w": mx.full((2, 3), 0.1), "b": mx.full((3,), 0.2)}
    opt = Adafactor(**kwargs)
    stock = StockAdafactor(**kwargs)
    for _ in range(3):
        p = opt.apply_gradients(grads, params)
        s = stock.apply_gradients(grads, params)
    assert_trees_close(p, s, 1e-5, str(kwargs))


def test_learning_rate_with_relative_step_warns():
    with pytest.warns(UserWarning, match="relative_step"):
        Adafactor(learning_rate=1e-3)
    with pytest.warns(UserWarning, match="relative_step"):
        Adafactor(learning_rate=optim.cosine_decay(1e-3, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Adafactor(learning_rate=1e-3, relative_step=False)
        Adafactor()


# ------------------------------------------------------------- loaded state


def stepped_state(**options):
    (_, _), (opt, params) = fresh_and_stepped(**options)
    return opt, params


@pytest.mark.parametrize(
    "path,key,value",
    [
        ("layers.0.weight", "exp_avg_sq_row", mx.zeros((4,))),
        ("layers.0.weight", "exp_avg_sq_col", mx.zeros((5, 5))),
        ("layers.1.bias", "exp_avg_sq", mx.zeros((5,))),
        ("scale", "exp_avg_sq", mx.zeros((1,))),
        ("embed.weight", "exp_avg", mx.zeros((5, 7))),
    ],
)
def test_loaded_state_with_wrong_shape(path, key, value):
    opt, params = stepped_state(beta_1=0.9)
    state = dict(tree_flatten(opt.state))
    state[f"{path}.{key}"] = value
    opt.state = tree_unflatten(list(state.items()))
    expect_error(opt, grads_like(params), params, ValueError, path)


@pytest.mark.parametrize("path,key", [("layers.0.weight", "exp_avg_sq_col"), ("layers.1.bias", "exp_avg")])
def test_loaded_state_missing_entry(path, key):
    opt, params = stepped_state(beta_1=0.9)
    state = [(k, v) for k, v in tree_flatten(opt.state) if k != f"{path}.{key}"]
    opt.state = tree_unflatten(state)
    expect_error(opt, grads_like(params), params, ValueError, path)


def test_loaded_state_entry_not_an_array():
    # A numpy array where an mlx array belongs (assert_unchanged can only
    # snapshot array-like entries).
    value = np.zeros((5,), np.float32)
    opt, params = stepped_state()
    state = dict(tree_flatten(opt.state))
    state["layers.1.bias.exp_avg_sq"] = value
    opt.state = tree_unflatten(list(state.items()))
    message = expect_error(opt, grads_like(params), params, ValueError, "layers.1.bias")
    assert "not a float mlx array" in message, message


def test_loaded_state_missing_entry_names_what_it_has():
    opt, params = stepped_state()
    state = [(k, v) for k, v in tree_flatten(opt.state) if k != "layers.0.weight.exp_avg_sq_row"]
    opt.state = tree_unflatten(state)
    message = expect_error(opt, grads_like(params), params, ValueError, "layers.0.weight")
    assert "no 'exp_avg_sq_row'" in message and "['exp_avg_sq_col']" in message, message


def test_loaded_state_in_other_dtypes_is_cast():
    # Integer and float16 second moments (as a stock float16 run saves them)
    # are cast to float32 on use, as the Python code before them did.
    opt, params = stepped_state(beta_1=0.9)
    state = dict(tree_flatten(opt.state))
    expected = Adafactor(beta_1=0.9)
    expected.state = tree_unflatten(list(state.items()))
    state["layers.1.bias.exp_avg_sq"] = state["layers.1.bias.exp_avg_sq"].astype(mx.float16)
    state["layers.0.weight.exp_avg_sq_col"] = mx.ones_like(state["layers.0.weight.exp_avg_sq_col"], mx.int32)
    expected_state = dict(state)
    expected_state["layers.1.bias.exp_avg_sq"] = expected_state["layers.1.bias.exp_avg_sq"].astype(mx.float32)
    expected_state["layers.0.weight.exp_avg_sq_col"] = expected_state["layers.0.weight.exp_avg_sq_col"].astype(mx.float32)
    opt.state = tree_unflatten(list(state.items()))
    expected.state = tree_unflatten(list(expected_state.items()))
    grads = grads_like(params)
    got = opt.apply_gradients(grads, params)
    want = expected.apply_gradients(grads, params)
    assert_trees_close((got, opt.state), (want, expected.state), 0.0, "cast state")
    assert opt.state["layers"][1]["bias"]["exp_avg_sq"].dtype == mx.float32


def test_loaded_state_of_other_layout():
    # A state saved for a 1-D parameter loaded onto a 2-D one of the path.
    opt, params = stepped_state()
    state = dict(tree_flatten(opt.state))
    for k in [k for k in state if k.startswith("layers.0.weight.")]:
        del state[k]
    state["layers.0.weight.exp_avg_sq"] = mx.zeros((5, 5))
    opt.state = tree_unflatten(list(state.items()))
    expect_error(opt, grads_like(params), params, ValueError, "layers.0.weight")


# A malformed state in any container: (path to the corrupted place, the
# value put there, the path the message must name). The parameters are
# model_params(): a dict holding a list of dicts, a dict and a scalar.
MALFORMED_STATES = [
    (("layers",), "junk", "layers"),
    (("layers",), {"0": {}, "1": {}}, "layers"),
    (("layers",), ({"weight": {}}, [{}]), "layers.1"),
    (("layers", 0), 3, "layers.0"),
    (("layers", 0), [{}, {}], "layers.0"),
    (("layers", 0), None, "layers.0"),
    (("layers", 1, "bias"), 3, "layers.1.bias"),
    (("layers", 1, "bias"), [mx.zeros((4,))], "layers.1.bias"),
    (("layers", 1, "bias"), (mx.zeros((4,)),), "layers.1.bias"),
    (("layers", 1, "bias"), mx.zeros((4,)), "layers.1.bias"),
    (("layers", 1, "bias"), None, "layers.1.bias"),
    (("layers", 1, "bias"), [], "layers.1.bias"),
    (("layers", 0, "weight", "exp_avg_sq_row"), None, "layers.0.weight"),
    (("layers", 0, "weight", "exp_avg_sq_row"), {"x": mx.zeros((5,))}, "layers.0.weight"),
    (("layers", 0, "weight", "exp_avg_sq_row"), "x", "layers.0.weight"),
    (("embed",), [mx.zeros((7,))], "embed"),
    (("embed",), None, "embed"),
    (("embed", "weight"), (1,), "embed.weight"),
    (("scale",), 3, "scale"),
    (("scale",), {"exp_avg_sq": [mx.zeros(())]}, "scale"),
    (("step",), 3, "step"),
    (("step",), "3", "step"),
    (("step",), None, "step"),
    (("step",), np.uint64(3), "step"),
    (("step",), mx.array([1, 2], mx.uint64), "step"),
    (("step",), mx.array(1 + 2j), "step"),
]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


@pytest.mark.parametrize("via_setter", [False, True], ids=["in_place", "setter"])
@pytest.mark.parametrize("path,bad,named", MALFORMED_STATES,
                         ids=[f"{'.'.join(map(str, p))}={b!r}"[:60]
                              for p, b, _ in MALFORMED_STATES])
def test_malformed_state_in_any_container(path, bad, named, via_setter):
    """A ValueError or TypeError naming the path, and nothing changed: the
    corrupted value stays where it was put, and everything else (params,
    every state entry, the step) is as it was."""
    opt, params = stepped_state()
    snap = snapshot(params, opt)
    parent = _get(opt.state, path[:-1])
    good = parent[path[-1]]
    parent[path[-1]] = bad
    if via_setter:
        # A state assigned through the setter: the next step also builds the
        # state of new parameters (Optimizer.init).
        opt.state = opt.state
    with pytest.raises((ValueError, TypeError)) as info:
        mx.eval(opt.apply_gradients(grads_like(params), params))
    message = str(info.value)
    assert message.startswith("[adafactor]"), message
    assert f"'{named}'" in message, message
    assert _get(opt.state, path) is bad
    parent[path[-1]] = good
    assert_unchanged(snap, params, opt)


@pytest.mark.parametrize("bad", [[], (), "state", None, 3], ids=repr)
def test_state_that_is_not_a_dict(bad):
    opt, params = stepped_state()
    snap = snapshot(params, opt)
    good = opt.state
    opt.state = bad
    with pytest.raises((ValueError, TypeError), match=r"^\[adafactor\] the optimizer state is a"):
        opt.apply_gradients(grads_like(params), params)
    assert opt.state is bad
    opt.state = good
    assert_unchanged(snap, params, opt)


def test_state_without_step():
    opt, params = stepped_state()
    snap = snapshot(params, opt)
    step = opt.state.pop("step")
    with pytest.raises(ValueError, match=r"^\[adafactor\] the optimizer state has no 'step'"):
        opt.apply_gradients(grads_like(params), params)
    opt.state["step"] = step
    assert_unchanged(snap, params, opt)


def test_well_formed_state_containers_still_work():
    # What stock's Optimizer.init makes or accepts: tuples for lists, a
    # shorter list (new parameters appended), empty dicts for parameters
    # without state yet, a float step. Each gives stock's next step.
    cases = {
        "tuple": lambda s: s.__setitem__("layers", tuple(s["layers"])),
        "short_list": lambda s: s.__setitem__("layers", s["layers"][:1]),
        "empty_leaf": lambda s: s["layers"][1].__setitem__("bias", {}),
        "float_step": lambda s: s.__setitem__("step", s["step"].astype(mx.float32)),
    }
    for name, edit in cases.items():
        opt, params = stepped_state()
        stock = StockAdafactor()
        stock.state = tree_unflatten(tree_flatten(opt.state))
        edit(opt.state)
        edit(stock.state)
        got = opt.apply_gradients(grads_like(params, 30), params)
        want = stock.apply_gradients(grads_like(params, 30), params)
        assert_trees_close(got, want, 1e-5, name)


def test_state_without_learning_rate_with_relative_step_false():
    opt = Adafactor(learning_rate=1e-2, relative_step=False)
    params = model_params()
    params = opt.apply_gradients(grads_like(params), params)
    state = {k: v for k, v in tree_flatten(opt.state) if k != "learning_rate"}
    opt.state = tree_unflatten(list(state.items()))
    snap = snapshot(params, opt)
    with pytest.raises(ValueError, match="learning rate"):
        opt.apply_gradients(grads_like(params), params)
    assert_unchanged(snap, params, opt)


def test_compiled_step_error_names_path():
    opt, params = stepped_state()
    state = opt.state
    grads = with_grad(grads_like(params), "layers.1.weight", rand((4, 5), 3))
    before = flat(params)

    def step(g, p):
        return opt.apply_gradients(g, p)

    with pytest.raises(ValueError, match="'layers.1.weight'"):
        mx.compile(step, inputs=state, outputs=state)(grads, params)
    # mx.compile itself leaves the captured state holding tracers when the
    # traced function raises (it does so for any function, stock included),
    # so only the parameters can be checked here.
    after = flat(params)
    assert all(np.array_equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------- NaN and Inf


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize(
    "shape,index,value",
    [
        ((6, 7), (2, 3), float("nan")),
        ((6, 7), (0, 0), float("inf")),
        ((6, 7), (5, 6), -float("inf")),
        ((2, 3, 4), (1, 2, 3), float("nan")),
        ((9,), (4,), float("nan")),
        ((9,), (0,), float("inf")),
        ((), (), float("nan")),
    ],
)
def test_nan_inf_gradients_propagate_as_stock(shape, index, value, compiled):
    p0 = rand(shape, 1)
    gs = grad_seq(shape, 3, 2)
    bad = np.array(gs[1])
    bad[index] = value
    gs[1] = mx.array(bad)
    out = {}
    for kind, comp in (("stock", False), ("fused", compiled)):
        opt = make(kind, beta_1=0.9)
        p = run(opt, {"p": p0}, [{"p": g} for g in gs], compiled=comp)
        out[kind] = (p, opt.state)
    # Same NaN/Inf pattern everywhere, same finite values.
    assert_trees_close(out["fused"], out["stock"], 1e-5, "nan/inf")


def test_nan_parameter_propagates_as_stock():
    p0 = np.array(rand((5, 6), 1))
    p0[1, 1] = np.nan
    p0 = mx.array(p0)
    gs = grad_seq((5, 6), 2, 3)
    out = {}
    for kind in ("stock", "fused"):
        opt = make(kind)
        out[kind] = (run(opt, {"p": p0}, [{"p": g} for g in gs]), opt.state)
    assert_trees_close(out["fused"], out["stock"], 1e-5, "nan param")


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "shape,index,value",
    [((6, 7), (2, 3), float("nan")), ((6, 7), (0, 0), float("inf")), ((9,), (4,), float("nan")),
     ((9,), (0,), -float("inf"))],
)
def test_nan_inf_pattern_as_stock_in_low_precision(dtype, shape, index, value):
    # Values differ by design in low precision (float32 math); where NaN and
    # Inf end up must not.
    p0 = rand(shape, 1, dtype)
    gs = grad_seq(shape, 3, 2, dtype)
    bad = np.array(gs[1].astype(mx.float32))
    bad[index] = value
    gs[1] = mx.array(bad).astype(dtype)
    out = {}
    for kind in ("stock", "fused"):
        opt = make(kind, beta_1=0.9)
        out[kind] = flat((run(opt, {"p": p0}, [{"p": g} for g in gs]), opt.state))
    assert sorted(out["fused"]) == sorted(out["stock"])
    for k, expected in out["stock"].items():
        got = out["fused"][k]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=k)
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected), err_msg=k)
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected), err_msg=k)
