"""Deterministic reductions (issue item 4): bitwise identical results run to
run, between the eager and the lazy path, and whatever the number of threads
(the pool is created once per process, so thread counts need subprocesses)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from afhelpers import assert_trees_equal, grad_seq, rand, run
from mlx_fused_adafactor import Adafactor

# Shapes whose work is split into many tiles and spread over the pool
# (NOTE [tiles]): several row blocks, three column blocks (40000 columns,
# which also takes pass 2: NOTE [folded update sum]), several flat chunks,
# batched matrices; over the serial threshold in total. Three or more tiles
# per tensor, so that the order partials are combined in shows in the bits.
SHAPES = {
    "m": (300, 700),
    "wide": (3, 40000),
    "tall": (2000, 40),
    "flat": (140000,),
    "t3": (4, 130, 300),
    "small": (7, 5),
    "b": (33,),
}
STEPS = 8


def inputs():
    params = {k: rand(s, i + 1) for i, (k, s) in enumerate(SHAPES.items())}
    seqs = {k: grad_seq(s, STEPS, 10 * i + 3) for i, (k, s) in enumerate(SHAPES.items())}
    grads = [{k: v[j] for k, v in seqs.items()} for j in range(STEPS)]
    return params, grads


def results(compiled):
    params, grads = inputs()
    opt = Adafactor(beta_1=0.9, weight_decay=0.01)
    p = run(opt, params, grads, compiled=compiled)
    return p, opt.state


def test_run_to_run_bitwise():
    first = results(False)
    for compiled in (False, True, False):
        assert_trees_equal(results(compiled), first, f"compiled={compiled}")


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_fused_adafactor import _ext
    import test_determinism as t

    assert _ext.num_threads() == {threads}, _ext.num_threads()
    out = {{}}
    for compiled in (False, True):
        p, state = t.results(compiled)
        for k, v in tree_flatten((p, state)):
            out[f"{{compiled}}.{{k}}"] = np.array(v)
    np.savez({path!r}, **out)
    """
)


def bits(a):
    return np.atleast_1d(a).view(np.uint8)


def run_with_threads(threads, tmp_path):
    path = str(tmp_path / f"threads{threads}.npz")
    env = dict(os.environ, MLX_FUSED_ADAFACTOR_NUM_THREADS=str(threads))
    code = SCRIPT.format(tests=str(Path(__file__).parent), threads=threads, path=path)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    return dict(np.load(path))


def test_thread_count_does_not_change_results(tmp_path):
    one = run_with_threads(1, tmp_path)
    for threads in (2, 3):
        other = run_with_threads(threads, tmp_path)
        assert sorted(other) == sorted(one)
        for k in one:
            assert one[k].dtype == other[k].dtype, k
            assert np.array_equal(bits(one[k]), bits(other[k])), (threads, k)
    # And the in-process pool agrees with them.
    here = results(False)
    from mlx.utils import tree_flatten

    for k, v in tree_flatten(here):
        assert np.array_equal(bits(np.array(v)), bits(one[f"False.{k}"])), k
