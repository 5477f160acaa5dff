"""The fused step is one multi-output MLX primitive per dtype group (at most
kMaxLazyOutputs outputs each, NOTE [lazy chunks]), and the lazy primitive is
the eager step (NOTE [eager step]). The lazy form is what mx.compile traces;
its graph is read with mx.export_to_dot before it is evaluated."""

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


def test_one_primitive_per_dtype_group(tmp_path):
    params = {
        "w": rand((5, 6), 1), "b": rand((6,), 2), "s": rand((), 3), "c": rand((2, 3, 4), 4),
        "h": rand((4, 4), 5, mx.bfloat16), "hb": rand((4,), 6, mx.bfloat16),
    }
    grads = {k: rand(v.shape, 10 + i, v.dtype) for i, (k, v) in enumerate(params.items())}
    opt = Adafactor(beta_1=0.9)
    new = compiled_step(opt, grads, params)
    groups = [["w", "b", "s", "c"], ["h", "hb"]]
    for names in groups:
        outs = [new[k] for k in names] + [a for k in names for a in opt.state[k].values()]
        # float32: two factored (param, row, col, exp_avg), two flat (param,
        # exp_avg_sq, exp_avg); bfloat16: one of each.
        assert len(outs) == (4 + 3) * len(names) // 2
        assert producers(outs, tmp_path) == 1, names
    everything = list(new.values()) + [a for k in params for a in opt.state[k].values()]
    assert producers(everything, tmp_path) == 2
    mx.eval(new, opt.state)

    eager = Adafactor(beta_1=0.9)
    expected = eager.apply_gradients(grads, params)
    assert_trees_equal((new, opt.state), (expected, eager.state), "lazy vs eager")


# NOTE [lazy chunks] (csrc/op/adafactor.cpp): MLX's compile grows faster than
# linearly in a primitive's sibling count, so the lazy step cuts a dtype group
# into primitives of at most this many outputs.
MAX_LAZY_OUTPUTS = 48


def expected_chunks(outputs_per_tensor):
    chunks, used = 0, 0
    for n in outputs_per_tensor:
        if chunks == 0 or used + n > MAX_LAZY_OUTPUTS:
            chunks, used = chunks + 1, 0
        used += n
    return chunks


def test_large_group_is_chunked_and_equals_eager(tmp_path):
    shapes = [(4, 8) if i % 3 else (16,) for i in range(40)]
    params = {f"t{i:02d}": rand(s, i) for i, s in enumerate(shapes)}
    grads = {k: rand(v.shape, 100 + i) for i, (k, v) in enumerate(params.items())}
    opt = Adafactor(beta_1=0.9)
    new = compiled_step(opt, grads, params)
    per_tensor = [4 if len(s) == 2 else 3 for s in shapes]
    outs = list(new.values()) + [a for k in params for a in opt.state[k].values()]
    assert len(outs) == sum(per_tensor)
    assert producers(outs, tmp_path) == expected_chunks(per_tensor) > 1
    mx.eval(new, opt.state)

    eager = Adafactor(beta_1=0.9)
    expected = eager.apply_gradients(grads, params)
    assert_trees_equal((new, opt.state), (expected, eager.state), "chunked vs eager")
    # And under mx.compile, several steps.
    compiled = Adafactor(beta_1=0.9)
    eager = Adafactor(beta_1=0.9)
    seq = [{k: rand(v.shape, 1000 * j + i) for i, (k, v) in enumerate(params.items())} for j in range(3)]
    assert_trees_equal(
        (run(compiled, params, seq, compiled=True), compiled.state),
        (run(eager, params, seq), eager.state),
        "compiled chunks",
    )


def test_eager_step_returns_evaluated_arrays(tmp_path):
    # Outside transformations the step has already run (NOTE [eager step]):
    # its outputs have no graph behind them.
    params = {"w": rand((5, 6), 1), "b": rand((6,), 2)}
    grads = {k: rand(v.shape, 3 + i) for i, (k, v) in enumerate(params.items())}
    opt = Adafactor()
    new = opt.apply_gradients(grads, params)
    for name in params:
        # A graph-less array: nothing but the array itself in its dot graph.
        assert not primitive_nodes([new[name]], tmp_path), name
