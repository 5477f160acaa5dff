"""The lazy fused step is one multi-output MLX primitive per tensor (NOTE
[lazy chunks]), and the lazy primitive is the eager step (NOTE [eager
step]). The lazy form is what mx.compile traces; its graph is read with
mx.export_to_dot before it is evaluated."""

from functools import partial

import mlx.core as mx

from afhelpers import assert_trees_equal, rand, run
from mlx_fused_adafactor import Adafactor


def primitive_nodes(arrays, tmp_path):
    """Labels of the primitives in the graph that produces ``arrays``."""
    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), *arrays)
    nodes = {}
    for line in path.read_text().splitlines():
        if "[label =" in line:
            node = line.split("{")[1].split("[")[0].strip()
            nodes[node] = line.split('label ="')[1].split('"')[0]
    return nodes


def compiled_step(opt, grads, params):
    """One step under mx.compile with the state as inputs and outputs; the
    new parameters and state are returned unevaluated."""
    opt.init(params)
    state = opt.state

    @partial(mx.compile, inputs=state, outputs=state)
    def step(g, p):
        return opt.apply_gradients(g, p)

    return step(grads, params)


def producers(arrays, tmp_path):
    labels = primitive_nodes(arrays, tmp_path)
    return sum(label == "AdafactorStep" for label in labels.values())


def test_one_primitive_per_tensor(tmp_path):
    params = {
        "w": rand((5, 6), 1), "b": rand((6,), 2), "s": rand((), 3), "c": rand((2, 3, 4), 4),
        "h": rand((4, 4), 5, mx.bfloat16), "hb": rand((4,), 6, mx.bfloat16),
    }
    grads = {k: rand(v.shape, 10 + i, v.dtype) for i, (k, v) in enumerate(params.items())}
    opt = Adafactor(beta_1=0.9)
    new = compiled_step(opt, grads, params)
    for k in params:
        outs = [new[k]] + list(opt.state[k].values())
        # factored: param, row, col, exp_avg; flat: param, exp_avg_sq, exp_avg.
        assert len(outs) == (4 if params[k].ndim >= 2 else 3)
        assert producers(outs, tmp_path) == 1, k
    everything = list(new.values()) + [a for k in params for a in opt.state[k].values()]
    assert producers(everything, tmp_path) == len(params)
    mx.eval(new, opt.state)

    eager = Adafactor(beta_1=0.9)
    expected = eager.apply_gradients(grads, params)
    assert_trees_equal((new, opt.state), (expected, eager.state), "lazy vs eager")


def test_many_tensors_compiled_equal_eager():
    shapes = [(4, 8) if i % 3 else (16,) for i in range(40)]
    params = {f"t{i:02d}": rand(s, i) for i, s in enumerate(shapes)}
    seq = [{k: rand(v.shape, 1000 * j + i) for i, (k, v) in enumerate(params.items())}
           for j in range(3)]
    compiled = Adafactor(beta_1=0.9)
    eager = Adafactor(beta_1=0.9)
    assert_trees_equal(
        (run(compiled, params, seq, compiled=True), compiled.state),
        (run(eager, params, seq), eager.state),
        "compiled vs eager",
    )


def test_eager_step_returns_evaluated_arrays(tmp_path):
    # Outside transformations small tensors have already run (NOTE [eager
    # step]): their outputs have no graph behind them. Tensors of 1 MiB or
    # more are deferred: one primitive each, evaluated with the caller's
    # mx.eval, bitwise what the step gives them under mx.compile.
    params = {"w": rand((5, 6), 1), "b": rand((6,), 2),
              "big": rand((512, 600), 3), "long": rand((300_000,), 4)}
    grads = {k: rand(v.shape, 5 + i) for i, (k, v) in enumerate(params.items())}
    opt = Adafactor(beta_1=0.9)
    new = opt.apply_gradients(grads, params)
    for name in ("w", "b"):
        # A graph-less array: nothing but the array itself in its dot graph.
        assert not primitive_nodes([new[name]], tmp_path), name
    for name in ("big", "long"):
        assert producers([new[name]] + list(opt.state[name].values()), tmp_path) == 1
    mx.eval(new, opt.state)
    lazy = Adafactor(beta_1=0.9)
    expected = compiled_step(lazy, grads, params)
    mx.eval(expected, lazy.state)
    assert_trees_equal((new, opt.state), (expected, lazy.state), "deferred vs lazy")
