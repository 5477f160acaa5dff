"""Transformations through a step: mx.grad, mx.jvp and mx.vmap over
apply_gradients work and match stock (the primitive's derivatives come from
the reference implementation, NOTE: [reference]), as does mx.compile of a
function that differentiates through a step (meta-learning)."""

import mlx.core as mx
import pytest

from mlx.utils import tree_flatten

from afhelpers import StockAdafactor, assert_trees_close, max_abs, max_err, rand, to64
from mlx_fused_adafactor import Adafactor

SHAPES = {"w": (5, 7), "b": (7,), "c": (2, 3, 4)}
OPTIONS = [
    {},
    {"beta_1": 0.9, "weight_decay": 0.01},
    {"relative_step": False, "learning_rate": 0.05, "scale_parameter": False},
]
TOL = 1e-5


def assert_grads_close(actual, expected, what):
    """Gradients agree to TOL of the largest gradient of the whole tree:
    some leaves' gradients are pure cancellation noise (a 1-D update hardly
    depends on the scale of its gradient), and compared with themselves only
    they would compare rounding."""
    fa, fe = dict(tree_flatten(actual)), dict(tree_flatten(expected))
    assert sorted(fa) == sorted(fe), what
    scale = max(max_abs(to64(v)) for v in fe.values())
    for k in fe:
        err = max_err(to64(fa[k]), to64(fe[k]))
        assert err <= TOL * scale, f"{what} {k}: {err:.3g} > {TOL} * {scale:.3g}"


def problem():
    params = {k: rand(s, i) for i, (k, s) in enumerate(SHAPES.items())}
    grads = {k: rand(s, 10 + i, scale=0.1) for i, (k, s) in enumerate(SHAPES.items())}
    return params, grads


def two_steps(cls, options):
    """A scalar of the parameters after two steps, as a function of the
    initial parameters."""

    def loss(params, grads):
        opt = cls(**options)
        p = opt.apply_gradients(grads, params)
        p = opt.apply_gradients(grads, p)
        return sum(((v * v).sum() for v in p.values()), mx.array(0.0))

    return loss


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "momentum", "lr"])
def test_grad_through_steps_matches_stock(options):
    params, grads = problem()
    ours = mx.grad(two_steps(Adafactor, options))(params, grads)
    stock = mx.grad(two_steps(StockAdafactor, options))(params, grads)
    assert_grads_close(ours, stock, "grad wrt params")
    # With respect to the gradients too (argnums=1).
    ours = mx.grad(two_steps(Adafactor, options), argnums=1)(params, grads)
    stock = mx.grad(two_steps(StockAdafactor, options), argnums=1)(params, grads)
    assert_grads_close(ours, stock, "grad wrt grads")


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "momentum", "lr"])
def test_jvp_through_a_step_matches_stock(options):
    params, grads = problem()
    tangents = {k: rand(v.shape, 30 + i) for i, (k, v) in enumerate(params.items())}
    keys = list(params)

    def fn(cls):
        def f(*flat):
            opt = cls(**options)
            new = opt.apply_gradients(grads, dict(zip(keys, flat)))
            return [new[k] for k in keys]

        return f

    args = [params[k] for k in keys]
    tan = [tangents[k] for k in keys]
    out_o, jvp_o = mx.jvp(fn(Adafactor), args, tan)
    out_s, jvp_s = mx.jvp(fn(StockAdafactor), args, tan)
    assert_trees_close(out_o, out_s, TOL, "primal")
    assert_grads_close(jvp_o, jvp_s, "tangent")


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "momentum", "lr"])
def test_vmap_over_a_step_matches_stock(options):
    """A batch of independent problems (say, one per task), one step each."""
    batch = 3
    params = {k: rand((batch, *s), i) for i, (k, s) in enumerate(SHAPES.items())}
    grads = {k: rand((batch, *s), 10 + i, scale=0.1) for i, (k, s) in enumerate(SHAPES.items())}

    def fn(cls):
        def f(p, g):
            opt = cls(**options)
            return opt.apply_gradients(g, p)

        return f

    ours = mx.vmap(fn(Adafactor))(params, grads)
    stock = mx.vmap(fn(StockAdafactor))(params, grads)
    assert_trees_close(ours, stock, TOL, "vmap")
    # And each batch entry is the plain step of that entry.
    for i in range(batch):
        one = Adafactor(**options).apply_gradients(
            {k: v[i] for k, v in grads.items()}, {k: v[i] for k, v in params.items()})
        assert_trees_close({k: v[i] for k, v in ours.items()}, one, TOL, f"entry {i}")


def test_compiled_meta_gradient_matches_stock():
    params, grads = problem()
    loss_o = mx.compile(mx.grad(two_steps(Adafactor, {"beta_1": 0.9})))
    loss_s = mx.grad(two_steps(StockAdafactor, {"beta_1": 0.9}))
    assert_grads_close(loss_o(params, grads), loss_s(params, grads), "compiled grad")
