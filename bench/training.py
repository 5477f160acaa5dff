"""What does the fused step buy in a whole training loop? Steps per second
of a causal transformer (forward, backward, optimizer), with stock MLX
Adafactor and with this package, eager and with the whole step under
``mx.compile``, and the optimizer's share of an eager step.

Two models. ``small`` is 4 layers of width 256 (3.3M float32 parameters) on
2 x 64 tokens: forward and backward dominate, as in most training on this
CPU. ``wide`` is 2 layers of width 1024 (26M parameters) on 1 x 4 tokens:
parameters large against activations (fine-tuning with a small batch), so
the optimizer's share is visible. The ``forward-backward`` arm runs the same
step without the optimizer; an eager arm's optimizer share is
1 - forward-backward / step, from the medians.

    python -m bench.training [small|wide]
"""

from dataclasses import asdict, dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers

import mlx_fused_adafactor

from .common import Budget, release_memory, summarize, time_interleaved

ARMS = ("mlx-stock", "mlx-stock-compiled", "fused", "fused-compiled")
# The step without the optimizer, for the optimizer's share.
BASELINE_ARM = "forward-backward"
SHARE_ARMS = ("mlx-stock", "fused")


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
    "wide": Config(layers=2, dims=1024, heads=8, seq=4, batch=1, vocab=1024),
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
    step and returning once parameters and state are computed; for the
    forward-backward arm, once the loss and gradients are."""
    mx.random.seed(0)
    model = TinyLM(cfg)
    mx.eval(model.parameters())
    loss_and_grad = nn.value_and_grad(model, _loss)
    tokens = mx.random.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    n_params = sum(v.size for _, v in mlx.utils.tree_flatten(model.parameters()))
    if arm == BASELINE_ARM:
        def step():
            loss, grads = loss_and_grad(model, x, y)
            mx.eval(loss, grads)

        return step, None, n_params

    cls = mlx.optimizers.Adafactor if arm.startswith("mlx-stock") else mlx_fused_adafactor.Adafactor
    opt = cls()

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

    return step, opt, n_params


def run(name, budget, progress, arms=ARMS):
    """Steps per second of each arm of model ``name``, timed round-robin
    (one step of each arm per round) with the forward-backward arm; returns
    the result dict."""
    cfg = CONFIGS[name]
    release_memory()
    progress.label(f"training {name}: " + ", ".join(arms))
    made = {arm: _make_step(arm, cfg) for arm in (*arms, BASELINE_ARM)}
    times = time_interleaved({arm: m[0] for arm, m in made.items()}, budget)
    rows = []
    for arm, (_, opt, n_params) in made.items():
        if opt is not None:
            done = int(opt.state["step"].item())
            if done != budget.warmup + len(times[arm]):
                raise RuntimeError(f"bench: training arm {arm} did not update its state")
        row = {"arm": arm, **summarize(times[arm])}
        row["steps_per_second"] = 1e3 / row["median_ms"]
        rows.append(row)
        if arm != BASELINE_ARM:
            progress.advance()
    base = {r["arm"]: r["median_ms"] for r in rows}
    for r in rows:
        for key, arm in (("speedup_vs_stock", "mlx-stock"),
                         ("speedup_vs_stock_compiled", "mlx-stock-compiled")):
            r[key] = base[arm] / r["median_ms"] if arm in base else None
        r["optimizer_share"] = (
            max(0.0, 1.0 - base[BASELINE_ARM] / r["median_ms"])
            if r["arm"] in SHARE_ARMS else None)
    del made
    release_memory()
    return {"name": name, "config": asdict(cfg), "n_params": n_params,
            "dtype": "float32",
            "timing": "round-robin: one step of each arm per round",
            "budget": asdict(budget), "rows": rows}


TRAINING_BUDGETS = {
    "small": Budget(warmup=3, min_reps=24, max_reps=40, seconds=30.0),
    "wide": Budget(warmup=2, min_reps=10, max_reps=30, seconds=15.0),
}
QUICK_TRAINING_BUDGET = Budget(warmup=2, min_reps=3, max_reps=10, seconds=0.5)


if __name__ == "__main__":
    import sys

    from .common import Progress

    names = sys.argv[1:] or ["small", "wide"]
    for name in names:
        progress = Progress(len(ARMS), "training")
        result = run(name, TRAINING_BUDGETS.get(name, QUICK_TRAINING_BUDGET), progress)
        progress.close()
        for r in result["rows"]:
            share = (f", optimizer {100 * r['optimizer_share']:.0f}% of the step"
                     if r["optimizer_share"] is not None else "")
            vs = f" (x{r['speedup_vs_stock']:.2f} vs stock)" if r["speedup_vs_stock"] else ""
            print(f"{name} {r['arm']:>20}: {r['steps_per_second']:6.2f} steps/s{vs}{share}")
