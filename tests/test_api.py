"""The drop-in contract: everything a stock mlx.optimizers.Adafactor user does
works the same with the fused class (issue item 3)."""

import inspect
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import mlx_fused_adafactor
from afhelpers import (
    StockAdafactor,
    assert_trees_close,
    assert_trees_equal,
    grad_seq,
    make,
    rand,
    run,
    to64,
)
from mlx_fused_adafactor import Adafactor

# float32, shapes where stock's reductions are accurate (see test_parity).
TOL = 1e-5


def nested_params(dtype=mx.float32):
    return {
        "embed": {"weight": rand((9, 6), 1, dtype)},
        "layers": [
            {"w": rand((6, 6), 2, dtype), "b": rand((6,), 3, dtype)},
            {"w": rand((6, 3), 4, dtype), "b": rand((3,), 5, dtype), "gain": rand((), 6, dtype)},
        ],
        "conv": rand((2, 3, 3, 4), 7, dtype),
    }


def grads_for(params, step, dtype=None):
    leaves = tree_flatten(params)
    return tree_unflatten(
        [
            (k, grad_seq(v.shape, 1, 100 * step + i, dtype or v.dtype)[0])
            for i, (k, v) in enumerate(leaves)
        ]
    )


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)]
        self.norm = nn.LayerNorm(16)

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.gelu(self.norm(x) if i == 1 else x)
        return x


def make_model(seed=0):
    mx.random.seed(seed)
    model = MLP()
    mx.eval(model.parameters())
    return model


def batches(n, seed=1):
    key = mx.random.key(seed)
    out = []
    for i in range(n):
        k1, k2, key = mx.random.split(key, 3)
        out.append((mx.random.normal((32, 8), key=k1), mx.random.normal((32, 4), key=k2)))
    return out


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y)


# ------------------------------------------------------------------ surface


def test_import_subclass_and_signature():
    assert mlx_fused_adafactor.Adafactor is Adafactor
    assert issubclass(Adafactor, optim.Optimizer)
    # Stock's parameters, in stock's order, kinds and defaults; this
    # package's own options only after them, keyword-only.
    ours = list(inspect.signature(Adafactor.__init__).parameters.values())
    stock = list(inspect.signature(StockAdafactor.__init__).parameters.values())
    assert ours[: len(stock)] == stock
    extra = ours[len(stock):]
    assert extra and all(p.kind == p.KEYWORD_ONLY for p in extra)
    assert isinstance(Adafactor(), optim.Optimizer)


@pytest.mark.parametrize(
    "options",
    [{}, {"beta_1": 0.9}, {"learning_rate": 1e-2, "relative_step": False},
     {"learning_rate": optim.linear_schedule(1e-3, 1e-2, 10), "relative_step": False, "beta_1": 0.5}],
    ids=["default", "beta_1", "lr", "schedule"],
)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
def test_state_tree_is_stock(options, dtype):
    params = nested_params(dtype)
    trees = {}
    for kind in ("stock", "fused"):
        opt = make(kind, **options)
        opt.init(params)
        after_init = {k: (v.shape, v.dtype) for k, v in tree_flatten(opt.state)}
        opt.apply_gradients(grads_for(params, 0), params)
        after_step = {k: (v.shape, v.dtype) for k, v in tree_flatten(opt.state)}
        trees[kind] = after_init, after_step
    for stage in (0, 1):
        stock, fused = trees["stock"][stage], trees["fused"][stage]
        assert sorted(stock) == sorted(fused)
        for key in stock:
            assert stock[key][0] == fused[key][0], key
            if dtype == mx.float32 or key in ("step", "learning_rate") or key.endswith("exp_avg"):
                # The documented difference: the fused second moment is
                # float32 whatever the parameter dtype.
                assert stock[key][1] == fused[key][1], key
            else:
                assert fused[key][1] == mx.float32, key
    assert trees["fused"][1]["step"][1] == mx.uint64
    assert ("learning_rate" in trees["fused"][1]) == ("learning_rate" in options)


def test_init_gives_stock_zero_state():
    params = nested_params()
    opt = Adafactor(beta_1=0.9)
    opt.init(params)
    for k, v in tree_flatten(opt.state):
        assert np.all(np.array(v) == 0), k
    # The explicitly initialised state is the state the step uses and
    # updates (in the same dicts).
    leaf_state = opt.state["layers"][0]["w"]
    opt.apply_gradients(grads_for(params, 0), params)
    assert opt.state["layers"][0]["w"] is leaf_state
    assert float(mx.abs(leaf_state["exp_avg_sq_row"]).sum()) > 0


# -------------------------------------------------------------- tree shapes


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "lazy"])
def test_nested_dicts_and_lists_match_stock(compiled):
    params = nested_params()
    grads = [grads_for(params, i) for i in range(6)]
    out = {}
    for kind in ("stock", "fused"):
        opt = make(kind, beta_1=0.9, weight_decay=0.01)
        p = run(opt, params, grads, compiled=compiled and kind == "fused")
        out[kind] = (p, opt.state)
    assert_trees_close(out["fused"], out["stock"], TOL, "nested")
    assert isinstance(out["fused"][0]["layers"], list)


def test_parameters_superset_of_gradients():
    params = nested_params()
    grads = grads_for(params, 0)
    del grads["embed"]
    grads["layers"] = [grads["layers"][0]]  # only the first layer trains
    out = {}
    for kind in ("stock", "fused"):
        opt = make(kind)
        new = opt.apply_gradients(grads, params)
        out[kind] = (new, opt.state)
    # Result and state have the structure of the gradients, as in stock.
    assert [k for k, _ in tree_flatten(out["fused"][0])] == [k for k, _ in tree_flatten(out["stock"][0])]
    assert_trees_close(out["fused"], out["stock"], TOL, "superset")


def test_tuple_in_tree():
    params = {"pair": (rand((3, 4), 1), rand((4,), 2))}
    grads = [{"pair": (g, h)} for g, h in zip(grad_seq((3, 4), 3, 3), grad_seq((4,), 3, 4))]
    out = {}
    for kind in ("stock", "fused"):
        opt = make(kind)
        out[kind] = (run(opt, params, grads), opt.state)
    assert isinstance(out["fused"][0]["pair"], tuple)
    assert_trees_close(out["fused"], out["stock"], TOL, "tuple")


def test_dtype_groups_fuse_independently():
    """Parameters of several dtypes in one tree: each tensor gets exactly
    what it gets alone (bitwise), whatever else is in its fused group."""
    params = {
        "a": rand((5, 7), 1), "b": rand((7,), 2), "c": rand((5, 7), 3, mx.bfloat16),
        "d": rand((4,), 4, mx.float16), "e": rand((3, 2, 5), 5, mx.bfloat16),
    }
    grads = [
        {k: grad_seq(v.shape, 1, 50 + 10 * i + j, v.dtype)[0] for j, (k, v) in enumerate(params.items())}
        for i in range(4)
    ]
    together = Adafactor(beta_1=0.9)
    p_all = run(together, params, grads)
    for k in params:
        alone = Adafactor(beta_1=0.9)
        p_one = run(alone, {k: params[k]}, [{k: g[k]} for g in grads])
        assert_trees_equal((p_one[k], alone.state[k]), (p_all[k], together.state[k]), k)


# --------------------------------------------------------------- nn models


def train(opt, model, data, compiled=None):
    """nn.value_and_grad training loop; returns the losses. ``compiled`` is
    None, "impure" (inputs/outputs = [model.state, opt.state]) or "pure"
    (params and optimizer state passed in and returned)."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    losses = []
    if compiled is None:
        for x, y in data:
            loss, grads = loss_and_grad(model, x, y)
            opt.update(model, grads)
            mx.eval(loss, model.parameters(), opt.state)
            losses.append(loss.item())
    elif compiled == "impure":
        opt.init(model.trainable_parameters())
        state = [model.state, opt.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(x, y):
            loss, grads = loss_and_grad(model, x, y)
            opt.update(model, grads)
            return loss

        for x, y in data:
            loss = step(x, y)
            mx.eval(state)
            losses.append(loss.item())
    else:
        opt.init(model.trainable_parameters())

        def pure_loss(params, x, y):
            model.update(params)
            return loss_fn(model, x, y)

        @mx.compile
        def step(params, opt_state, x, y):
            loss, grads = mx.value_and_grad(pure_loss)(params, x, y)
            opt.state = opt_state
            new_params = opt.apply_gradients(grads, params)
            return loss, new_params, opt.state

        params, opt_state = model.trainable_parameters(), opt.state
        for x, y in data:
            loss, params, opt_state = step(params, opt_state, x, y)
            mx.eval(loss, params, opt_state)
            losses.append(loss.item())
        model.update(params)
        opt.state = opt_state
    return losses


@pytest.mark.parametrize("compiled", [None, "impure", "pure"])
@pytest.mark.parametrize("options", [{}, {"beta_1": 0.9, "weight_decay": 0.01}], ids=["default", "momentum"])
def test_update_model_matches_stock(compiled, options):
    data = batches(8)
    results = {}
    for kind in ("stock", "fused"):
        model = make_model()
        opt = make(kind, **options)
        losses = train(opt, model, data, compiled if kind == "fused" else None)
        results[kind] = (losses, model.trainable_parameters(), opt.state)
    np.testing.assert_allclose(results["fused"][0], results["stock"][0], rtol=1e-5)
    assert_trees_close(results["fused"][1:], results["stock"][1:], TOL, str(compiled))


def test_compiled_impure_equals_eager_bitwise():
    data = batches(5)
    out = {}
    for compiled in (None, "impure", "pure"):
        model = make_model()
        opt = Adafactor(beta_1=0.9)
        losses = train(opt, model, data, compiled)
        out[compiled] = (model.trainable_parameters(), opt.state)
    assert_trees_equal(out["impure"], out[None], "impure vs eager")
    assert_trees_equal(out["pure"], out[None], "pure vs eager")


# ------------------------------------------------------------ state round trip


def test_state_round_trip_continues_bitwise(tmp_path):
    params = nested_params()
    grads = [grads_for(params, i) for i in range(8)]
    straight = Adafactor(beta_1=0.9, relative_step=False, learning_rate=optim.cosine_decay(1e-2, 8))
    p_straight = run(straight, params, grads)

    first = Adafactor(beta_1=0.9, relative_step=False, learning_rate=optim.cosine_decay(1e-2, 8))
    p_mid = run(first, params, grads[:4])
    # Through a file, as a checkpoint does.
    mx.save_safetensors(str(tmp_path / "opt.safetensors"), dict(tree_flatten(first.state)))
    mx.save_safetensors(str(tmp_path / "params.safetensors"), dict(tree_flatten(p_mid)))
    second = Adafactor(beta_1=0.9, relative_step=False, learning_rate=optim.cosine_decay(1e-2, 8))
    second.state = tree_unflatten(list(mx.load(str(tmp_path / "opt.safetensors")).items()))
    p_loaded = tree_unflatten(list(mx.load(str(tmp_path / "params.safetensors")).items()))
    p_resumed = run(second, p_loaded, grads[4:])
    assert_trees_equal((p_resumed, second.state), (p_straight, straight.state), "resume")


def test_state_setter_round_trip_in_place():
    params = nested_params()
    grads = [grads_for(params, i) for i in range(4)]
    a, b = Adafactor(beta_1=0.5), Adafactor(beta_1=0.5)
    pa, pb = params, params
    for g in grads:
        pa = a.apply_gradients(g, pa)
        b.state = tree_unflatten(tree_flatten(b.state))
        pb = b.apply_gradients(g, pb)
        mx.eval(pa, pb, a.state, b.state)
    assert_trees_equal((pb, b.state), (pa, a.state), "setter each step")


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("options", [{}, {"beta_1": 0.9}, {"relative_step": False, "learning_rate": 3e-3}],
                         ids=["default", "beta_1", "lr"])
def test_load_stock_state(dtype, options):
    params = nested_params(dtype)
    grads = [grads_for(params, i) for i in range(10)]
    stock = make("stock", **options)
    p_mid = run(stock, params, grads[:5])
    saved = tree_unflatten(tree_flatten(stock.state))

    fused = make("fused", **options)
    fused.state = saved
    p_fused = run(fused, p_mid, grads[5:])
    assert int(fused.state["step"].item()) == 10

    if dtype == mx.float32:
        p_stock = run(stock, p_mid, grads[5:])
        assert_trees_close((p_fused, fused.state), (p_stock, stock.state), TOL, "stock state")
    else:
        # A bfloat16 stock state (second moment in bfloat16) is read as
        # float32: the same as loading that state already cast.
        cast = tree_map(
            lambda x: x.astype(mx.float32) if x.dtype == mx.bfloat16 else x,
            tree_unflatten(tree_flatten(stock.state)),
        )
        cast = tree_unflatten(
            [(k, v.astype(dtype) if k.endswith("exp_avg") else v) for k, v in tree_flatten(cast)]
        )
        ref = make("fused", **options)
        ref.state = cast
        p_ref = run(ref, p_mid, grads[5:])
        assert_trees_equal((p_fused, fused.state), (p_ref, ref.state), "bf16 stock state")
        for k, v in tree_flatten(fused.state):
            if k.endswith(("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")):
                assert v.dtype == mx.float32, k


def test_fused_state_loads_into_stock():
    # The other direction (float32): stock continues from a fused state.
    params = nested_params()
    grads = [grads_for(params, i) for i in range(8)]
    fused = Adafactor(beta_1=0.9)
    p_mid = run(fused, params, grads[:4])
    stock = StockAdafactor(beta_1=0.9)
    stock.state = tree_unflatten(tree_flatten(fused.state))
    p_stock = run(stock, p_mid, grads[4:])
    p_fused = run(fused, p_mid, grads[4:])
    assert_trees_close((p_fused, fused.state), (p_stock, stock.state), TOL, "fused state")


def test_learning_rate_property_setter():
    params = nested_params()
    grads = [grads_for(params, i) for i in range(4)]
    out = {}
    for kind in ("stock", "fused"):
        opt = make(kind, learning_rate=1e-2, relative_step=False)
        p = run(opt, params, grads[:2])
        opt.learning_rate = 0.1
        p = run(opt, p, grads[2:])
        out[kind] = (p, opt.state)
    assert_trees_close(out["fused"], out["stock"], TOL, "lr setter")
    assert out["fused"][1]["learning_rate"].item() == pytest.approx(0.1)


def test_apply_single_matches_stock():
    for shape in [(5, 6), (6,), ()]:
        p, g = rand(shape, 1), grad_seq(shape, 1, 2)[0]
        results = []
        for kind in ("stock", "fused"):
            opt = make(kind, beta_1=0.9)
            opt.state["step"] = mx.array(3, mx.uint64)
            state = {}
            opt.init_single(p, state)
            new = opt.apply_single(g, p, state)
            results.append((new, state))
        assert_trees_close(results[1], results[0], TOL, f"apply_single {shape}")


# ------------------------------------------------------------- MultiOptimizer


@pytest.mark.parametrize("compiled", [None, "impure"])
def test_multi_optimizer_matches_stock(compiled):
    data = batches(6)
    out = {}
    for kind in ("stock", "fused"):
        model = make_model()
        opt = optim.MultiOptimizer(
            [make(kind, beta_1=0.9), optim.Adam(1e-2)], [lambda path, p: p.ndim >= 2]
        )
        losses = train(opt, model, data, compiled if kind == "fused" else None)
        out[kind] = (losses, model.trainable_parameters(), opt.state)
    np.testing.assert_allclose(out["fused"][0], out["stock"][0], rtol=1e-5)
    assert_trees_close(out["fused"][1:], out["stock"][1:], TOL, "multi")


def test_multi_optimizer_two_fused_and_state_round_trip():
    data = batches(6)
    out = {}
    for kind in ("stock", "fused"):
        model = make_model()
        opt = optim.MultiOptimizer(
            [make(kind, relative_step=False, learning_rate=1e-2), make(kind, beta_1=0.5)],
            [lambda path, p: "layers.0" in path],
        )
        train(opt, model, data[:3])
        opt.state = tree_unflatten(tree_flatten(opt.state))
        train(opt, model, data[3:])
        out[kind] = (model.trainable_parameters(), opt.state)
    assert_trees_close(out["fused"], out["stock"], TOL, "multi round trip")


# ------------------------------------------------------------ buffer safety


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "lazy"])
def test_old_arrays_survive_later_steps(compiled):
    """Outputs take over donatable inputs' buffers (NOTE: [donation]);
    arrays the caller still holds must never be overwritten."""
    params = nested_params()
    grads = [grads_for(params, i) for i in range(6)]
    opt = Adafactor(beta_1=0.9)
    held, copies = [], []
    p = params
    for g in grads:
        p = _compiled_step(opt, p, g) if compiled else run(opt, p, [g])
        leaves = [v for _, v in tree_flatten((p, opt.state))]
        held.append(leaves)
        copies.append([to64(v) for v in leaves])
    for leaves, snaps in zip(held, copies):
        for v, s in zip(leaves, snaps):
            np.testing.assert_array_equal(to64(v), s)


def _compiled_step(opt, params, grads):
    if not opt._initialized:
        opt.init(params)
    state = opt.state
    fn = mx.compile(lambda p, g: opt.apply_gradients(g, p), inputs=state, outputs=state)
    out = fn(params, grads)
    mx.eval(out, opt.state)
    return out


def test_same_array_for_two_parameters():
    x = rand((4, 5), 1)
    params = {"a": x, "b": x}
    g = grad_seq((4, 5), 1, 2)[0]
    opt = Adafactor()
    new = opt.apply_gradients({"a": g, "b": g}, params)
    mx.eval(new)
    assert_trees_equal(new["a"], new["b"], "aliased")
    np.testing.assert_array_equal(to64(x), to64(params["a"]))


class ModelWithConfig(nn.Module):
    """Non-array attributes (as mlx-lm models keep) and a frozen layer: the
    gradient tree has empty subtrees over strings, ints and the frozen
    layer (nn.value_and_grad maps them to {} / [])."""

    def __init__(self):
        super().__init__()
        self.layer_types = ["full_attention", "sliding"]
        self.config = {"name": "tiny", "sizes": [8, 16]}
        self.lin = nn.Linear(8, 16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.freeze()
        self.head = nn.Linear(16, 4)

    def __call__(self, x):
        return self.head(nn.relu(self.frozen(self.lin(x))))


@pytest.mark.parametrize("compiled", [None, "impure"])
def test_module_with_non_array_attributes_and_frozen_layer(compiled):
    data = batches(4)
    out = {}
    for kind in ("stock", "fused"):
        mx.random.seed(0)
        model = ModelWithConfig()
        mx.eval(model.parameters())
        opt = make(kind, beta_1=0.9)
        losses = train(opt, model, data, compiled if kind == "fused" else None)
        out[kind] = (losses, model.parameters(), opt.state)
    np.testing.assert_allclose(out["fused"][0], out["stock"][0], rtol=1e-5)
    assert_trees_close(out["fused"][1:], out["stock"][1:], TOL, "module with config")


def test_alternating_eager_and_compiled_steps():
    """State arrays pass between the eager path and the compiled primitive
    and back: bitwise the all-eager run."""
    params = nested_params()
    grads = [grads_for(params, i) for i in range(6)]
    ref = Adafactor(beta_1=0.9)
    p_ref = run(ref, params, grads)
    opt = Adafactor(beta_1=0.9)
    p = params
    for i, g in enumerate(grads):
        p = run(opt, p, [g], compiled=bool(i % 2))
    assert_trees_equal((p, opt.state), (p_ref, ref.state), "alternating")
