"""Checkpoint and resume through safetensors.

A run interrupted by save/load into fresh objects must be bitwise identical
to the uninterrupted run; a stock Adafactor checkpoint loads and continues;
a truncated or mismatched file raises naming the path and changes nothing.
"""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_fused_adafactor import (
    Adafactor,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)

STEPS = 10
SPLIT = 4
# Fused vs stock in float32: same math, different operation order.
FP32_ATOL = 1e-5


class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.layers = [nn.Linear(8, width), nn.Linear(width, width)]
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 4, bias=False)
        self.kind = "mlp"

    def __call__(self, x):
        for layer in self.layers:
            x = nn.gelu(layer(x))
        return self.head(self.norm(x))


def make_net(seed, width=16, dtype=mx.float32):
    mx.random.seed(seed)
    net = Net(width)
    net.set_dtype(dtype)
    mx.eval(net.parameters())
    return net


def batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        x = rng.standard_normal((32, 8)).astype(np.float32)
        y = rng.standard_normal((32, 4)).astype(np.float32)
        yield mx.array(x), mx.array(y)


def loss_fn(net, x, y):
    out = net(x.astype(net.head.weight.dtype))
    return nn.losses.mse_loss(out, y.astype(mx.float32))


def train(net, opt, data, compiled):
    value_and_grad = nn.value_and_grad(net, loss_fn)

    def step(x, y):
        loss, grads = value_and_grad(net, x, y)
        opt.update(net, grads)
        return loss

    if compiled:
        state = [net.state, opt.state]
        step = mx.compile(step, inputs=state, outputs=state)
    for x, y in data:
        step(x, y)
        mx.eval(net.parameters(), opt.state)


def to_numpy(v):
    # NumPy has no bfloat16; widening to float32 is exact.
    return np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)


def snapshot(net, opt):
    out = {"model." + k: to_numpy(v) for k, v in tree_flatten(net.parameters())}
    out.update(("optimizer." + k, to_numpy(v)) for k, v in tree_flatten(opt.state))
    return out


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def split_data():
    data = list(batches())
    return data[:SPLIT], data[SPLIT:]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("beta_1", [None, 0.9], ids=["no_momentum", "momentum"])
def test_resume_is_bitwise(tmp_path, compiled, beta_1):
    def optimizer():
        return Adafactor(beta_1=beta_1, weight_decay=0.01)

    net, opt = make_net(0), optimizer()
    train(net, opt, batches(), compiled)
    expected = snapshot(net, opt)

    first, second = split_data()
    net, opt = make_net(0), optimizer()
    train(net, opt, first, compiled)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, net, opt)

    net, opt = make_net(123), optimizer()
    meta = load_checkpoint(path, net, opt)
    assert meta["optimizer"].endswith("Adafactor")
    assert opt.state["step"].dtype == mx.uint64
    assert opt.state["step"].item() == SPLIT
    train(net, opt, second, compiled)
    assert_same(snapshot(net, opt), expected)


def test_step_zero_checkpoint(tmp_path):
    net, opt = make_net(0), Adafactor()
    save_checkpoint(tmp_path / "c.safetensors", net, opt)
    net2, opt2 = make_net(5), Adafactor()
    load_checkpoint(tmp_path / "c.safetensors", net2, opt2)
    train(net, opt, batches(), False)
    train(net2, opt2, batches(), False)
    assert_same(snapshot(net2, opt2), snapshot(net, opt))


def test_stock_checkpoint_continues_in_float32(tmp_path):
    net, opt = make_net(0), mlx.optimizers.Adafactor()
    train(net, opt, batches(), False)
    expected = snapshot(net, opt)

    first, second = split_data()
    net, opt = make_net(0), mlx.optimizers.Adafactor()
    train(net, opt, first, False)
    save_checkpoint(tmp_path / "stock.safetensors", net, opt)
    # The plain format of the MLX docs, written by stock code.
    flat = dict(tree_flatten(opt.state))
    mx.save_safetensors(str(tmp_path / "opt.safetensors"), flat)
    net.save_weights(str(tmp_path / "weights.safetensors"))

    fused_net, fused = make_net(7), Adafactor()
    load_checkpoint(tmp_path / "stock.safetensors", fused_net, fused)
    train(fused_net, fused, second, False)
    assert_same(snapshot(fused_net, fused), expected, atol=FP32_ATOL)

    plain_net, plain = make_net(7), Adafactor()
    plain_net.load_weights(str(tmp_path / "weights.safetensors"))
    load_optimizer_state(tmp_path / "opt.safetensors", plain_net, plain)
    assert plain.state["step"].dtype == mx.uint64
    train(plain_net, plain, second, False)
    assert_same(snapshot(plain_net, plain), snapshot(fused_net, fused))


def test_stock_bfloat16_checkpoint_is_cast_to_float32_state(tmp_path):
    first, second = split_data()
    net, opt = make_net(0, dtype=mx.bfloat16), mlx.optimizers.Adafactor()
    train(net, opt, first, False)
    assert opt.state["head"]["weight"]["exp_avg_sq_row"].dtype == mx.bfloat16
    save_checkpoint(tmp_path / "stock.safetensors", net, opt)

    fused_net, fused = make_net(1, dtype=mx.bfloat16), Adafactor()
    load_checkpoint(tmp_path / "stock.safetensors", fused_net, fused)
    row = fused.state["head"]["weight"]["exp_avg_sq_row"]
    assert row.dtype == mx.float32
    np.testing.assert_array_equal(
        np.array(row), to_numpy(opt.state["head"]["weight"]["exp_avg_sq_row"])
    )
    train(fused_net, fused, second, False)
    assert fused.state["step"].item() == STEPS
    assert fused_net.head.weight.dtype == mx.bfloat16
    for k, v in snapshot(fused_net, fused).items():
        assert np.isfinite(v).all(), k

    # And back: a fused checkpoint loads into stock with the stock layout.
    save_checkpoint(tmp_path / "fused.safetensors", fused_net, fused)
    stock_net, stock = make_net(2, dtype=mx.bfloat16), mlx.optimizers.Adafactor()
    load_checkpoint(tmp_path / "fused.safetensors", stock_net, stock)
    assert stock.state["head"]["weight"]["exp_avg_sq_row"].dtype == mx.bfloat16


def trained(tmp_path, **kw):
    net, opt = make_net(0), Adafactor(**kw)
    train(net, opt, split_data()[0], False)
    path = tmp_path / "good.safetensors"
    save_checkpoint(path, net, opt)
    return path


def fresh_pair(width=16, **kw):
    net, opt = make_net(9, width=width), Adafactor(**kw)
    train(net, opt, split_data()[0][:2], False)
    return net, opt


def assert_unchanged(net, opt, before):
    assert_same(snapshot(net, opt), before)


def rewrite(path, out, edit):
    arrays, meta = mx.load(str(path), return_metadata=True)
    edit(arrays)
    mx.save_safetensors(str(out), arrays, metadata=meta)
    return out


@pytest.mark.parametrize(
    "case, match",
    [
        ("truncated", "could not be read"),
        ("empty", "could not be read"),
        ("wider_model", r"model parameter 'layers\.0\.weight' has shape"),
        ("momentum_missing", r"'layers\.0\.weight' has no optimizer state 'exp_avg'"),
        ("row_shape", r"'layers\.1\.weight': optimizer state 'exp_avg_sq_row' has"),
        ("missing_entry", r"'norm\.bias' has no optimizer state 'exp_avg_sq'"),
        ("extra_param", r"optimizer state 'extra\.weight\.exp_avg_sq', which fits no"),
        ("no_step", "has no 'step'"),
        ("not_a_checkpoint", "is not a"),
        ("extra_scalar", r"optimizer state 'foo', which this optimizer does not keep"),
        ("negative_step", r"'step' must be an integer >= 0, got -3"),
        ("float_step", r"'step' must be an integer >= 0, got 4\.0"),
        ("bool_step", r"'step' has dtype mlx.core.bool"),
        ("vector_step", r"'step' has shape \(1,\), expected a scalar"),
        ("nested_entry", r"'norm\.bias\.exp_avg_sq\.x', which fits no"),
        ("nan_learning_rate", r"'learning_rate' is nan, expected a finite"),
        ("integer_state", r"'exp_avg_sq' has dtype mlx.core.int32, expected a float"),
    ],
)
def test_bad_checkpoint_raises_and_changes_nothing(tmp_path, case, match):
    kw = {"learning_rate": 1e-2, "relative_step": False} if case == "nan_learning_rate" else {}
    good = trained(tmp_path, **kw)
    width = 16
    if case == "truncated":
        path = tmp_path / "bad.safetensors"
        path.write_bytes(good.read_bytes()[:-100])
    elif case == "empty":
        path = tmp_path / "bad.safetensors"
        path.write_bytes(b"")
    elif case == "wider_model":
        path, width = good, 32
    elif case == "momentum_missing":
        path, kw = good, {"beta_1": 0.9}
    elif case == "row_shape":
        def edit(a):
            a["optimizer.layers.1.weight.exp_avg_sq_row"] = mx.zeros((3,))
        path = rewrite(good, tmp_path / "bad.safetensors", edit)
    elif case == "missing_entry":
        def edit(a):
            a.pop("optimizer.norm.bias.exp_avg_sq")
        path = rewrite(good, tmp_path / "bad.safetensors", edit)
    elif case == "extra_param":
        def edit(a):
            a["optimizer.extra.weight.exp_avg_sq"] = mx.zeros((4,))
        path = rewrite(good, tmp_path / "bad.safetensors", edit)
    elif case == "no_step":
        def edit(a):
            a.pop("optimizer.step")
        path = rewrite(good, tmp_path / "bad.safetensors", edit)
    elif case == "not_a_checkpoint":
        path = tmp_path / "plain.safetensors"
        mx.save_safetensors(str(path), {"step": mx.array(1, mx.uint64)})
    else:
        edits = {
            "extra_scalar": ("optimizer.foo", mx.array(1.0)),
            "negative_step": ("optimizer.step", mx.array(-3, mx.int32)),
            "float_step": ("optimizer.step", mx.array(4.0)),
            "bool_step": ("optimizer.step", mx.array(True)),
            "vector_step": ("optimizer.step", mx.array([4], mx.uint64)),
            "nested_entry": ("optimizer.norm.bias.exp_avg_sq.x", mx.zeros((16,))),
            "nan_learning_rate": ("optimizer.learning_rate", mx.array(float("nan"))),
            "integer_state": ("optimizer.norm.bias.exp_avg_sq", mx.zeros((16,), mx.int32)),
        }
        key, value = edits[case]

        def edit(a):
            a[key] = value
        path = rewrite(good, tmp_path / "bad.safetensors", edit)

    net, opt = fresh_pair(width, **kw)
    before = snapshot(net, opt)
    state_before = opt.state
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, net, opt)
    assert opt.state is state_before
    assert_unchanged(net, opt, before)
    # The optimizer still steps where it was.
    train(net, opt, split_data()[1][:1], False)
    assert opt.state["step"].item() == 3


# ------------------------------------------------------- paths, missing files


def test_paths_round_trip_by_mlx_naming_rule(tmp_path):
    # MLX's save_safetensors adds ".safetensors" unless the path ends with
    # it; loading takes the same path the user gave to save.
    net, opt = make_net(0), Adafactor(beta_1=0.9)
    train(net, opt, split_data()[0], False)
    expected = snapshot(net, opt)
    for given, written in [
        ("run1", "run1.safetensors"),
        ("ckpt.bin", "ckpt.bin.safetensors"),
        ("run2.safetensors", "run2.safetensors"),
    ]:
        for as_path in (False, True):
            target = tmp_path / given if as_path else str(tmp_path / given)
            save_checkpoint(target, net, opt)
            assert (tmp_path / written).is_file(), written
            net2, opt2 = make_net(3), Adafactor(beta_1=0.9)
            load_checkpoint(target, net2, opt2)
            assert_same(snapshot(net2, opt2), expected)
            (tmp_path / written).unlink()
    # A file at exactly the given path (copied or renamed by the user) loads
    # when the named rule's file does not exist.
    save_checkpoint(tmp_path / "a", net, opt)
    (tmp_path / "a.safetensors").rename(tmp_path / "renamed")
    net2, opt2 = make_net(3), Adafactor(beta_1=0.9)
    load_checkpoint(tmp_path / "renamed", net2, opt2)
    assert_same(snapshot(net2, opt2), expected)
    # load_optimizer_state follows the same rule.
    mx.save_safetensors(str(tmp_path / "plain"), dict(tree_flatten(opt.state)))
    net3, opt3 = make_net(3), Adafactor(beta_1=0.9)
    load_optimizer_state(tmp_path / "plain", net3, opt3)
    assert opt3.state["step"].item() == SPLIT


@pytest.mark.parametrize("loader", ["checkpoint", "optimizer_state"])
def test_missing_file_is_file_not_found(tmp_path, loader):
    net, opt = fresh_pair()
    before = snapshot(net, opt)
    with pytest.raises(FileNotFoundError, match=r"\[adafactor\] checkpoint .*nothing_here"):
        if loader == "checkpoint":
            load_checkpoint(tmp_path / "nothing_here", net, opt)
        else:
            load_optimizer_state(tmp_path / "nothing_here", net, opt)
    assert_unchanged(net, opt, before)


@pytest.mark.parametrize(
    "value", [0.5, np.zeros((16,), np.float32), "x", None, [mx.zeros((16,))]],
    ids=["float", "numpy", "str", "None", "list"])
def test_optimizer_state_dict_with_non_array_value(value):
    net, opt = fresh_pair()
    arrays = dict(tree_flatten(opt.state))
    arrays["norm.bias.exp_avg_sq"] = value
    before = snapshot(net, opt)
    state_before = opt.state
    with pytest.raises(ValueError, match=r"'norm\.bias\.exp_avg_sq' is a .*not an mlx array"):
        load_optimizer_state(arrays, net, opt)
    assert opt.state is state_before
    assert_unchanged(net, opt, before)


# ----------------------------------------------------------- MultiOptimizer


def multi(beta_1=0.9):
    # The fused class for the linear layers' weights, another for the rest.
    return mlx.optimizers.MultiOptimizer(
        [Adafactor(beta_1=beta_1), Adafactor(weight_decay=0.01)],
        [lambda path, _: path.endswith("weight") and "norm" not in path],
    )


def test_multi_optimizer_checkpoint_resumes_bitwise(tmp_path):
    net, opt = make_net(0), multi()
    train(net, opt, batches(), False)
    expected = snapshot(net, opt)

    first, second = split_data()
    net, opt = make_net(0), multi()
    train(net, opt, first, False)
    save_checkpoint(tmp_path / "multi", net, opt)
    net, opt = make_net(5), multi()
    load_checkpoint(tmp_path / "multi", net, opt)
    assert opt.state["states"][0]["step"].item() == SPLIT
    train(net, opt, second, False)
    assert_same(snapshot(net, opt), expected)


@pytest.mark.parametrize("into", ["single", "three", "options"])
def test_multi_optimizer_checkpoint_that_does_not_fit(tmp_path, into):
    net, opt = make_net(0), multi()
    train(net, opt, split_data()[0], False)
    save_checkpoint(tmp_path / "multi", net, opt)
    net = make_net(9)
    if into == "single":
        target, match = Adafactor(), r"optimizer state 'states\.\d\.\w+"
    elif into == "three":
        target = mlx.optimizers.MultiOptimizer(
            [Adafactor(), Adafactor(), Adafactor()],
            [lambda p, _: "layers.0" in p, lambda p, _: "layers.1" in p])
        match = r"optimizer state 'states\.0\.layers\.1\.weight\.exp_avg_sq_row', which fits no"
    else:
        target = multi(beta_1=None)
        match = r"'layers\.0\.weight' has optimizer state 'exp_avg', which this optimizer does not keep"
    before = snapshot(net, target)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(tmp_path / "multi", net, target)
    assert_unchanged(net, target, before)
