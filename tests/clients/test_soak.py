"""Soak: thousands of small steps must not grow memory.

A (64, 64) weight and a (64,) bias trained for STEPS steps on both paths (the
eager step and the lazy primitive under mx.compile). After a warm-up, MLX's
active memory, the number of Python objects and of allocated Python memory
blocks must stay flat; after the model and the optimizer are dropped, active
memory must come back to where it was before the model existed, and
mx.clear_cache() must leave nothing cached.
"""

import gc
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_fused_adafactor import Adafactor

STEPS = 3000
WARMUP = 100
SAMPLE_EVERY = 250
# One step writes 64*64 + 64 parameters plus their state: about 34 KB with
# momentum. A leak of anything per step grows by that much times thousands of
# steps; the slack only absorbs allocator rounding and MLX's own bookkeeping
# (a few scalars), far below one step's output.
ACTIVE_SLACK = 8 * 1024
OBJECT_SLACK = 50
BLOCK_SLACK = 500


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y)


def usage():
    gc.collect()
    return {
        "active": mx.get_active_memory(),
        "objects": len(gc.get_objects()),
        "blocks": sys.getallocatedblocks(),
    }


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_memory_flat_over_thousands_of_steps(compiled):
    mx.random.seed(0)
    x = mx.random.normal((16, 64))
    y = mx.random.normal((16, 64))
    mx.eval(x, y)
    mx.synchronize()
    baseline = usage()["active"]

    model = nn.Linear(64, 64)
    optimizer = Adafactor(beta_1=0.9, weight_decay=1e-3)
    value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(x, y):
        loss, grads = value_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    state = [model.state, optimizer.state]
    if compiled:
        step = mx.compile(step, inputs=state, outputs=state)

    samples = []
    losses = []
    for i in range(1, STEPS + 1):
        loss = step(x, y)
        mx.eval(loss, state)
        if i == WARMUP or i % SAMPLE_EVERY == 0:
            samples.append((i, usage()))
            losses.append(loss.item())
    assert optimizer.state["step"].item() == STEPS
    assert losses[-1] < losses[0]

    _, warm = samples[0]
    for i, now in samples[1:]:
        assert now["active"] - warm["active"] <= ACTIVE_SLACK, (i, now, warm)
        assert now["objects"] - warm["objects"] <= OBJECT_SLACK, (i, now, warm)
        assert now["blocks"] - warm["blocks"] <= BLOCK_SLACK, (i, now, warm)

    del model, optimizer, value_and_grad, step, state, loss
    mx.clear_cache()
    after = usage()
    assert mx.get_cache_memory() == 0
    assert after["active"] - baseline <= ACTIVE_SLACK, (after, baseline)
