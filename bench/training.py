"""What does the fused step buy in a whole training loop? Steps per second
of a small causal transformer (forward, backward, optimizer), with stock
MLX Adafactor and with this package, eager and with the whole step under
``mx.compile``.

The model is 4 layers of width 256 (3.3M parameters, float32) on 2 x 64
tokens: MLX's CPU matmul reaches only a few GFLOP/s on the reference
machine, so a bigger batch would take seconds per step and hide the
optimizer entirely.

    python -m bench.training
"""

from dataclasses import asdict, dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers

import mlx_fused_adafactor

from .common import Budget, release_memory, summarize, time_interleaved

ARMS = ("mlx-stock", "mlx-stock-compiled", "fused", "fused-compiled")


@dataclass
class Config:
    layers: int = 4
    dims: int = 256
    heads: int = 4
    seq: int = 64
    batch: int = 2
    vocab: int = 256


CONFIGS = {
    "small": Config(),
    "tiny": Config(layers=1, dims=32, heads=2, seq=16, batch=2, vocab=64),
}


class Block(nn.Module):
    def __init__(self, dims, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(dims)
        self.attn = nn.MultiHeadAttention(dims, heads)
        self.ln2 = nn.LayerNorm(dims)
        self.mlp = nn.Sequential(nn.Linear(dims, 4 * dims), nn.GELU(),
                                 nn.Linear(4 * dims, dims))

    def __call__(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, mask)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dims)
        self.pos = nn.Embedding(cfg.seq, cfg.dims)
        self.blocks = [Block(cfg.dims, cfg.heads) for _ in range(cfg.layers)]
        self.ln_f = nn.LayerNorm(cfg.dims)
        self.head = nn.Linear(cfg.dims, cfg.vocab)

    def __call__(self, tokens):
        seq = tokens.shape[1]
        mask = nn.MultiHeadAttention.create_additive_causal_mask(seq)
        x = self.embed(tokens) + self.pos(mx.arange(seq))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def _loss(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def _make_step(arm, cfg):
    """A fresh model and optimizer, and a function running one training
    step and returning once parameters and state are computed."""
    mx.random.seed(0)
    model = TinyLM(cfg)
    mx.eval(model.parameters())
    cls = mlx.optimizers.Adafactor if arm.startswith("mlx-stock") else mlx_fused_adafactor.Adafactor
    opt = cls()
    loss_and_grad = nn.value_and_grad(model, _loss)
    tokens = mx.random.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def train_step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        return loss

    if arm.endswith("compiled"):
        opt.init(model.trainable_parameters())
        state = [model.state, opt.state]
        train_step = partial(mx.compile, inputs=state, outputs=state)(train_step)

    def step():
        loss = train_step(x, y)
        mx.eval(loss, model.parameters(), opt.state)

    n_params = sum(v.size for _, v in mlx.utils.tree_flatten(model.parameters()))
    return step, opt, n_params


def run(cfg, budget, progress, arms=ARMS):
    """Steps per second of each arm, timed round-robin (one step of each arm
    per round); returns the result dict."""
    release_memory()
    progress.label("training: " + ", ".join(arms))
    made = {arm: _make_step(arm, cfg) for arm in arms}
    times = time_interleaved({arm: m[0] for arm, m in made.items()}, budget)
    rows = []
    for arm, (_, opt, n_params) in made.items():
        done = int(opt.state["step"].item())
        if done != budget.warmup + len(times[arm]):
            raise RuntimeError(f"bench: training arm {arm} did not update its state")
        row = {"arm": arm, **summarize(times[arm])}
        row["steps_per_second"] = 1e3 / row["median_ms"]
        rows.append(row)
        progress.advance()
    base = {r["arm"]: r["median_ms"] for r in rows}
    for r in rows:
        for key, arm in (("speedup_vs_stock", "mlx-stock"),
                         ("speedup_vs_stock_compiled", "mlx-stock-compiled")):
            r[key] = base[arm] / r["median_ms"] if arm in base else None
    del made
    release_memory()
    return {"config": asdict(cfg), "n_params": n_params, "dtype": "float32",
            "timing": "round-robin: one step of each arm per round",
            "budget": asdict(budget), "rows": rows}


TRAINING_BUDGET = Budget(warmup=3, min_reps=24, max_reps=40, seconds=30.0)
QUICK_TRAINING_BUDGET = Budget(warmup=2, min_reps=3, max_reps=10, seconds=0.5)


if __name__ == "__main__":
    from .common import Progress

    progress = Progress(len(ARMS), "training")
    result = run(CONFIGS["small"], TRAINING_BUDGET, progress)
    progress.close()
    for r in result["rows"]:
        print(f"{r['arm']:>20}: {r['steps_per_second']:6.2f} steps/s "
              f"(x{r['speedup_vs_stock']:.2f} vs stock)")
