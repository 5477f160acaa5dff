"""Exact Adafactor on sharded parameters (NOTE: [sharded step] in
csrc/op/reference.h), with real processes: mlx.launch -n 2 and -n 3
--backend ring on loopback, each rank running shard_worker.py.

The ring backend has no reduce-scatter, so nn.fully_shard's backward cannot
run here: the shards are cut from full tensors, and the group pick-up is
tested on a real FullyShardedModule with gradients supplied directly.
mlx.launch exits 0 when a rank fails, so each rank's file is read.
"""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from afhelpers import max_abs, max_err, to64
from mlx_fused_adafactor import Adafactor
from test_distributed import free_port_pair, launcher

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shard_worker  # noqa: E402

# Gathered shards against one process on the whole tensors: the same math,
# with the sums over shards added in another order.
TOL = 2e-6


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory):
    size = request.param
    out = tmp_path_factory.mktemp(f"shards{size}")
    proc = subprocess.run(
        [launcher(), "-n", str(size), "--backend", "ring",
         "--starting-port", str(free_port_pair(size)),
         sys.executable, str(HERE / "shard_worker.py"), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    results = []
    for r in range(size):
        path = out / f"rank{r}.safetensors"
        assert path.exists(), (
            f"rank {r} of {size} wrote no result:\n{proc.stdout}\n{proc.stderr}")
        arrays, meta = mx.load(str(path), return_metadata=True)
        assert meta["size"] == str(size)
        results.append(arrays)
    return size, results


def gathered(results, key, replicated=False):
    """The whole array from the ranks' shards (axis 0), or, for an array
    every rank holds whole, each rank's."""
    parts = [r[key] for r in results]
    if replicated:
        return parts
    return [mx.concatenate(parts, axis=0)]


def single_process(options, dtype=mx.float32):
    params, grads = shard_worker.full_problem(dtype)
    p, s = shard_worker.train(Adafactor(**options), params, grads, False)
    return p, s


def is_replicated(key):
    """Column state of a matrix split along its rows: every rank keeps all
    of it (init_single makes it from the shard's shape)."""
    param, _, entry = key.split("/")[-1].partition(".")
    return entry == "exp_avg_sq_col" and len(shard_worker.SHAPES[param]) == 2


def relative_error(got, want):
    return max_err(to64(got), to64(want)) / max(max_abs(to64(want)), 1e-30)


def compare(results, prefix, params, state, tol):
    """The worst relative error of the gathered parameters and state
    against one process's; with `tol`, the fused step's contract: within
    tol, and whole arrays bitwise the same on every rank."""
    errors = {}
    for k, v in params.items():
        (got,) = gathered(results, f"{prefix}/param/{k}")
        errors[k] = relative_error(got, v)
    for k, v in state.items():
        if not isinstance(v, dict):
            continue
        for entry, value in v.items():
            key = f"{prefix}/state/{k}.{entry}"
            copies = gathered(results, key, replicated=is_replicated(key))
            if tol is not None:
                for c in copies[1:]:
                    assert mx.array_equal(c, copies[0]).item(), f"{key} differs across ranks"
            errors[f"{k}.{entry}"] = max(relative_error(c, value) for c in copies)
    worst = max(errors.values())
    if tol is not None:
        assert worst <= tol, (prefix, errors)
    return worst


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("name", sorted(shard_worker.OPTIONS))
def test_sharded_step_equals_single_process(ranks, name, mode):
    size, results = ranks
    params, state = single_process(shard_worker.OPTIONS[name])
    compare(results, f"fused/{name}/{mode}", params, state, TOL)


@pytest.mark.parametrize("name", sorted(shard_worker.OPTIONS))
def test_stock_on_shards_is_not_single_process(ranks, name):
    """Stock sums its statistics over the shard only: every rank applies
    another update than one process would (README, sharded training)."""
    size, results = ranks
    params, state = single_process(shard_worker.OPTIONS[name])
    stock = compare(results, f"stock/{name}/eager", params, state, None)
    assert stock > 100 * TOL, stock


def test_bfloat16_stochastic_rounding_on_shards(ranks):
    """The shards draw the bits of their elements in the whole tensor; the
    float32 values they round differ from one process's by the order of
    the sums only, so at most a few elements land one unit apart."""
    size, results = ranks
    options = shard_worker.BF16["stochastic"]
    params, _ = single_process(options, mx.bfloat16)
    for k, v in params.items():
        (got,) = gathered(results, f"bf16/stochastic/eager/param/{k}")
        got = np.array(got.astype(mx.float32))
        want = np.array(v.astype(mx.float32))
        differ = got != want
        assert differ.mean() <= 0.05, (k, differ.mean())
        spacing = np.abs(want) * 2.0**-7 + 1e-30
        assert (np.abs(got - want)[differ] <= spacing[differ] * 1.01).all(), k


def test_update_finds_the_group_of_a_fully_sharded_module(ranks):
    size, results = ranks
    keys = [k for k in results[0] if k.startswith("module/explicit/param/")]
    assert keys
    for r in results:
        for k in keys:
            auto = k.replace("module/explicit", "module/automatic")
            assert mx.array_equal(r[k], r[auto]).item(), k


def update_error(results, prefix, params, initial):
    """The worst error of the gathered parameters, relative to the largest
    change one process made to them in the run."""
    worst = 0.0
    for k, v in params.items():
        (got,) = gathered(results, f"{prefix}/param/{k}")
        moved = max_abs(to64(v) - to64(initial[k]))
        worst = max(worst, max_err(to64(got), to64(v)) / moved)
    return worst


def test_stock_sharded_distance_is_what_the_readme_states(ranks):
    """The distances the README quotes (printed with -s): the parameters'
    error relative to how far one process moved them, and the state's."""
    size, results = ranks
    initial, _ = shard_worker.full_problem()
    for name, options in shard_worker.OPTIONS.items():
        params, state = single_process(options)
        stock = update_error(results, f"stock/{name}/eager", params, initial)
        fused = update_error(results, f"fused/{name}/eager", params, initial)
        stock_state = compare(results, f"stock/{name}/eager", {}, state, None)
        print(f"{size} shards, {name}: parameters off by {stock:.2g} (stock) "
              f"and {fused:.2g} (fused) of the update; stock state off by "
              f"{stock_state:.2g}")
        assert stock > 100 * fused
