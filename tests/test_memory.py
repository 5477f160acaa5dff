"""Memory: the step holds nothing of its own (NOTE: [output buffers]), and
large tensors take their new values in place once the caller has let go of
the old arrays (NOTE: [donation], NOTE: [eager step]).

The observables are MLX's allocator counters (active, peak and cache
memory) and, against stock, the resident memory of a process between steps,
measured in subprocesses so that each starts clean. Speed is the
benchmark's business, never a test's."""

import gc
import json
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from afhelpers import assert_trees_equal, to64
from mlx_fused_adafactor import Adafactor

MB = 2**20


def large_params(seed=0):
    """Tensors the eager path defers (at least 1 MiB), factored and flat,
    and a small one it runs at once."""
    keys = mx.random.split(mx.random.key(seed), 3)
    params = {
        "w": 0.02 * mx.random.normal((512, 1024), key=keys[0]),
        "v": 0.02 * mx.random.normal((300_000,), key=keys[1]),
        "b": 0.02 * mx.random.normal((64,), key=keys[2]),
    }
    mx.eval(params)
    return params


def grads_like(params, seed):
    out = {}
    for i, (k, p) in enumerate(sorted(params.items())):
        out[k] = 1e-3 * mx.random.normal(p.shape, key=mx.random.key(1000 * seed + i))
    mx.eval(out)
    return out


def stepper(opt, compiled):
    """One step as a training loop takes it: ``params = step(grads,
    params)``, the caller's old arrays dropped before the evaluation."""
    fn = lambda g, p: opt.apply_gradients(g, p)  # noqa: E731
    if compiled:
        fn = mx.compile(fn, inputs=opt.state, outputs=opt.state)
    return fn


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_step_updates_in_place_when_the_caller_lets_go(compiled):
    params = large_params()
    opt = Adafactor(beta_1=0.9)
    opt.init(params)
    step = stepper(opt, compiled)
    grads = [grads_like(params, i) for i in range(3)]
    for g in grads[:2]:
        params = step(g, params)
        mx.eval(params, opt.state)
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    params = step(grads[2], params)
    mx.eval(params, opt.state)
    mx.synchronize()
    # Without donation the new w, v and exp_avg alone would be 6.5 MB.
    assert mx.get_peak_memory() - before < 256 * 1024
    assert mx.get_active_memory() - before < 64 * 1024


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_arrays_the_caller_holds_keep_their_values(compiled):
    """Held arrays are never written in place, and holding them does not
    change the results: bitwise those of the run that lets go."""
    grads = [grads_like(large_params(), i) for i in range(4)]
    final = {}
    for hold in (False, True):
        params = large_params()
        opt = Adafactor(beta_1=0.9)
        opt.init(params)
        step = stepper(opt, compiled)
        held, snaps = [], []
        for g in grads:
            params = step(g, params)
            mx.eval(params, opt.state)
            if hold:
                leaves = [v for _, v in tree_flatten((params, opt.state))]
                held.append(leaves)
                snaps.append([to64(v) for v in leaves])
        for leaves, snap in zip(held, snaps):
            for v, s in zip(leaves, snap):
                np.testing.assert_array_equal(to64(v), s)
        final[hold] = (params, opt.state)
    assert_trees_equal(final[True], final[False], "held vs let go")


def test_nothing_is_retained_once_the_optimizer_is_gone():
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    baseline = mx.get_active_memory()
    # 32 MiB: a fresh buffer of it is advised as huge pages.
    params = large_params()
    params["big"] = mx.zeros((4096, 2048))
    opt = Adafactor(beta_1=0.9)
    grads = grads_like(params, 0)
    kept = None
    for compiled in (False, True, False):
        step = stepper(opt, compiled)
        for _ in range(2):
            # Hold one step's outputs, then let go: both kinds of buffer.
            kept, params = params, step(grads, params)
            mx.eval(params, opt.state)
    del opt, params, grads, kept, step
    gc.collect()
    mx.synchronize()
    assert mx.get_active_memory() == baseline
    mx.clear_cache()
    assert mx.get_cache_memory() == 0


def test_cache_limit_bounds_what_is_kept():
    old = mx.set_cache_limit(0)
    try:
        mx.clear_cache()
        params = large_params()
        opt = Adafactor()
        step = stepper(opt, False)
        for i in range(3):
            params = step(grads_like(params, i), params)
            mx.eval(params, opt.state)
        assert mx.get_cache_memory() == 0
    finally:
        mx.set_cache_limit(old)


RSS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import mlx.core as mx
    sys.path.insert(0, {tests!r})
    from afhelpers import StockAdafactor
    from mlx_fused_adafactor import Adafactor

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    cls = Adafactor if sys.argv[1] == "fused" else StockAdafactor
    params = {{f"w{{i}}": 0.02 * mx.random.normal((1024, 4096), key=mx.random.key(i))
              for i in range(4)}}
    params["b"] = mx.zeros((4096,))
    grads = {{k: 1e-3 * mx.random.normal(v.shape, key=mx.random.key(9 + i))
             for i, (k, v) in enumerate(params.items())}}
    mx.eval(params, grads)
    opt = cls(beta_1=0.9)
    mx.reset_peak_memory()
    samples = []
    for i in range(4):
        params = opt.apply_gradients(grads, params)
        mx.eval(params, opt.state)
        samples.append(rss())
    print(json.dumps({{"rss": max(samples[1:]), "peak": mx.get_peak_memory()}}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_resident_and_peak_memory_no_more_than_stock(tmp_path):
    """72 MB of float32 parameters with momentum: resident memory between
    steps within 5% of stock's, MLX's peak no higher than stock's."""
    from pathlib import Path

    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT.format(tests=str(Path(__file__).parent)))
    out = {}
    for kind in ("stock", "fused"):
        proc = subprocess.run([sys.executable, str(script), kind],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind] = json.loads(proc.stdout)
    assert out["fused"]["rss"] <= 1.05 * out["stock"]["rss"], out
    assert out["fused"]["peak"] <= out["stock"]["peak"], out
