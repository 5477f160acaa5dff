"""One rank of the sharded-step test (tests/clients/test_sharded.py), run by
mlx.launch: every rank builds the same full tensors and gradients, keeps its
axis-0 shard (nn.fully_shard's layout), steps it with the fused optimizer
(shard_group, eager and compiled), with stock Adafactor (which sums its
statistics over the shard only), and through optimizer.update on a real
nn.FullyShardedModule; it writes its shards to OUT/rank<r>.safetensors.

    python tests/clients/shard_worker.py OUT
"""

import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlx_fused_adafactor import Adafactor

# Axis 0 divisible by 2 and by 3. Factored matrices are split along their
# rows (column sums and the row mean span shards), 3-D tensors along their
# batch of matrices, 1-D tensors along their elements.
SHAPES = {"w": (12, 10), "tall": (12, 1), "b": (24,), "c": (6, 4, 5)}
STEPS = 4
OPTIONS = {
    "default": {},
    "momentum_decay": {"beta_1": 0.9, "weight_decay": 0.01},
    "lr_unscaled": {"relative_step": False, "learning_rate": 1e-2,
                    "scale_parameter": False},
    "warmup_clip": {"warmup_init": True, "clip_threshold": 0.05},
}
BF16 = {"stochastic": {"stochastic_rounding": True, "beta_1": 0.9,
                       "relative_step": False, "learning_rate": 1e-3}}


def full_problem(dtype=mx.float32):
    """The full parameters and STEPS gradients, the same on every rank."""
    key = mx.random.key(0)
    params, grads = {}, [{} for _ in range(STEPS)]
    for name, shape in SHAPES.items():
        key, k = mx.random.split(key)
        params[name] = mx.random.normal(shape, key=k).astype(dtype)
        for s in range(STEPS):
            key, k = mx.random.split(key)
            rows = mx.exp(0.5 * mx.random.normal(shape[:1] + (1,) * (len(shape) - 1), key=k))
            key, k = mx.random.split(key)
            grads[s][name] = (rows * mx.random.normal(shape, key=k)).astype(dtype)
    return params, grads


def shard(tree, rank, size):
    def take(a):
        n = a.shape[0] // size
        return a[rank * n:(rank + 1) * n]
    return tree_map(take, tree)


def train(opt, params, grads, compiled):
    opt.init(params)
    step = opt.apply_gradients
    if compiled:
        state = opt.state
        step = partial(mx.compile, inputs=state, outputs=state)(
            lambda g, p: opt.apply_gradients(g, p))
    for g in grads:
        params = step(g, params)
        mx.eval(params, opt.state)
    return params, opt.state


def record(out, prefix, params, state):
    for k, v in tree_flatten(params):
        out[f"{prefix}/param/{k}"] = v
    for k, v in tree_flatten(state):
        out[f"{prefix}/state/{k}"] = v


def main(out_dir):
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    out = {}
    params, grads = full_problem()
    local = shard(params, rank, size)
    local_grads = [shard(g, rank, size) for g in grads]
    for name, options in OPTIONS.items():
        for compiled in (False, True):
            mode = "compiled" if compiled else "eager"
            p, s = train(Adafactor(shard_group=group, **options), local,
                         local_grads, compiled)
            record(out, f"fused/{name}/{mode}", p, s)
        p, s = train(optim.Adafactor(**options), local, local_grads, False)
        record(out, f"stock/{name}/eager", p, s)

    bparams, bgrads = full_problem(mx.bfloat16)
    blocal = shard(bparams, rank, size)
    blocal_grads = [shard(g, rank, size) for g in bgrads]
    for name, options in BF16.items():
        p, s = train(Adafactor(shard_group=group, **options), blocal,
                     blocal_grads, False)
        record(out, f"bf16/{name}/eager", p, s)

    # A real FullyShardedModule: update() finds its group itself.
    mx.random.seed(1)
    model = nn.fully_shard(nn.Sequential(nn.Linear(6, 12), nn.Linear(12, 6)),
                           group=group)
    mx.eval(model.parameters())
    grads = tree_map(lambda p: mx.random.normal(p.shape), model.trainable_parameters())
    explicit = Adafactor(shard_group=group, beta_1=0.9)
    params = explicit.apply_gradients(grads, model.trainable_parameters())
    automatic = Adafactor(beta_1=0.9)
    automatic.update(model, grads)
    mx.eval(params, model.parameters())
    record(out, "module/explicit", params, {})
    record(out, "module/automatic", model.trainable_parameters(), {})

    mx.eval(out)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(Path(out_dir) / f"rank{rank}.safetensors"), out,
                        metadata={"size": str(size)})


if __name__ == "__main__":
    main(sys.argv[1])
