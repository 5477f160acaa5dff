"""Train a small byte-level transformer language model with fused Adafactor.

The text is the Python standard library's own source, so nothing is
downloaded. The loss is printed and plotted to a PNG.

    python -m mlx_fused_adafactor.examples.train_lm
    python -m mlx_fused_adafactor.examples.train_lm --compare-stock
    python -m mlx_fused_adafactor.examples.train_lm --compare-stock \\
        --dtype bfloat16 --start-step 2300 --steps 300

``--compare-stock`` trains the same model from the same initial weights on
the same batches with ``mlx.optimizers.Adafactor`` as well. In bfloat16 stock
computes beta_2 = 1 - t^-0.8 in bfloat16, where it rounds to exactly 1.0 from
step 2424 on: its second moment stops updating. ``--start-step`` starts the
optimizers' step count late so the freeze shows within a short run.

``--learning-rate`` trains with that fixed learning rate (relative_step=False,
scale_parameter=True), the way mlx-lm runs Adafactor with ``--learning-rate``
and ``relative_step: false`` in its ``optimizer_config``; without it the
optimizers use Adafactor's relative step size.

``--stochastic-rounding`` rounds the new bfloat16 or float16 parameters
stochastically (``Adafactor(stochastic_rounding=True)``). With
``--compare-stock`` it trains four runs from the same initial weights on the
same batches: the fused optimizer in float32, in the low-precision dtype with
round to nearest and with stochastic rounding, and stock in that dtype
(which rounds to nearest):

    python -m mlx_fused_adafactor.examples.train_lm --compare-stock \\
        --dtype bfloat16 --stochastic-rounding --learning-rate 1e-3

Data parallel over processes with ``mx.distributed`` (each process takes its
share of every batch; gradients are averaged with
``mlx.nn.average_gradients``):

    mlx.launch -n 2 --backend ring \\
        python -m mlx_fused_adafactor.examples.train_lm --batch-size 32

``--save``/``--resume`` write and read a checkpoint of model and optimizer
(mlx_fused_adafactor.save_checkpoint / load_checkpoint).
"""

import argparse
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers
from mlx.utils import tree_flatten

from mlx_fused_adafactor import Adafactor, load_checkpoint, save_checkpoint

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
SECOND_MOMENT_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")


# ---------------------------------------------------------------- data


def stdlib_bytes(max_bytes, root=None):
    """Up to ``max_bytes`` of the standard library's Python source, read in
    a fixed order so every process and every run sees the same text."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise SystemExit(f"no Python source found under {root}")
    text = b"".join(chunks)[:max_bytes]
    return mx.array(memoryview(text)).astype(mx.int32)


class Batches:
    """Random windows of the text, drawn from (seed, step): the same global
    batch on every process, of which each takes its contiguous share, and
    the same batches after a resume as in an uninterrupted run."""

    def __init__(self, tokens, batch_size, seq_len, seed, rank=0, world=1):
        if batch_size % world:
            raise SystemExit(
                f"--batch-size {batch_size} is not divisible by the "
                f"{world} processes"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        share = batch_size // world
        self.rows = slice(rank * share, (rank + 1) * share)

    def get(self, step):
        key = mx.random.key(self.seed * 1_000_003 + step)
        starts = mx.random.randint(
            0, self.tokens.size - self.seq_len - 1, (self.batch_size,), key=key
        )[self.rows]
        window = self.tokens[starts[:, None] + mx.arange(self.seq_len + 1)]
        return window[:, :-1], window[:, 1:]


# --------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, dims, heads):
        super().__init__()
        self.norm1 = nn.RMSNorm(dims)
        self.attn = nn.MultiHeadAttention(dims, heads)
        self.norm2 = nn.RMSNorm(dims)
        self.up = nn.Linear(dims, 4 * dims)
        self.down = nn.Linear(4 * dims, dims)

    def __call__(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, mask)
        return x + self.down(nn.gelu(self.up(self.norm2(x))))


class ByteLM(nn.Module):
    def __init__(self, dims, layers, heads, context):
        super().__init__()
        self.embed = nn.Embedding(256, dims)
        self.pos = nn.Embedding(context, dims)
        self.blocks = [Block(dims, heads) for _ in range(layers)]
        self.norm = nn.RMSNorm(dims)
        self.out = nn.Linear(dims, 256)

    def __call__(self, x):
        n = x.shape[1]
        mask = nn.MultiHeadAttention.create_additive_causal_mask(n)
        h = self.embed(x) + self.pos(mx.arange(n))
        mask = mask.astype(h.dtype)
        for block in self.blocks:
            h = block(h, mask)
        return self.out(self.norm(h))


def loss_fn(model, x, y):
    logits = model(x).astype(mx.float32)
    return nn.losses.cross_entropy(logits, y, reduction="mean")


# ------------------------------------------------------------ training


def stock_beta2_freeze_step(dtype, decay_rate=-0.8, limit=1_000_000):
    """First step from which stock Adafactor's beta_2, computed in ``dtype``
    as stock does, is exactly 1.0 (None if not before ``limit``)."""
    t = mx.arange(1, limit).astype(mx.uint64)
    frozen = 1.0 - (t**decay_rate).astype(dtype) == 1.0
    if not frozen.any().item():
        return None
    first = mx.argmax(frozen).item()
    return first + 1 if frozen[first:].all().item() else None


class Run:
    """One model in ``dtype`` and its optimizer, with a (compiled) step;
    ``label`` names it in the plot."""

    def __init__(self, name, label, optimizer, dtype, args, world, init_weights,
                 resume=None):
        self.name = name
        self.label = label
        self.model = ByteLM(args.dims, args.layers, args.heads, args.seq_len)
        self.model.set_dtype(DTYPES[dtype])
        self.model.load_weights([(k, v.astype(DTYPES[dtype])) for k, v in init_weights])
        self.optimizer = optimizer
        self.world = world
        self.losses = []
        self.second_moment_change = []
        self.moment_steps = []
        self.seconds = 0.0
        self._previous_second_moment = None
        self.optimizer.init(self.model.trainable_parameters())
        if args.start_step:
            self.optimizer.state["step"] = mx.array(args.start_step, mx.uint64)
        if resume:
            load_checkpoint(resume, self.model, self.optimizer)

        value_and_grad = nn.value_and_grad(self.model, loss_fn)

        def step(x, y):
            loss, grads = value_and_grad(self.model, x, y)
            if world.size() > 1:
                grads = nn.average_gradients(grads, group=world)
                loss = mx.distributed.all_sum(loss, group=world) / world.size()
            self.optimizer.update(self.model, grads)
            return loss

        self.state = [self.model.state, self.optimizer.state]
        self.step = (
            mx.compile(step, inputs=self.state, outputs=self.state)
            if args.compile
            else step
        )

    def train_step(self, x, y):
        tic = time.perf_counter()
        loss = self.step(x, y)
        mx.eval(loss, self.state)
        self.seconds += time.perf_counter() - tic
        self.losses.append(loss.item())

    def record_second_moment(self, step):
        """Relative change of the second-moment statistics since the last
        call (None on the first), recorded at optimizer step ``step``."""
        flat = [
            v.astype(mx.float32).reshape(-1)
            for k, v in tree_flatten(self.optimizer.state)
            if k.rpartition(".")[2] in SECOND_MOMENT_KEYS
        ]
        now = mx.concatenate(flat)
        change = None
        prev = self._previous_second_moment
        if prev is not None and mx.abs(prev).sum().item() > 0:
            change = (mx.abs(now - prev).sum() / mx.abs(prev).sum()).item()
        self._previous_second_moment = now
        self.second_moment_change.append(change)
        self.moment_steps.append(step)
        return change


class Progress:
    """tqdm when installed, else a line every ``every`` steps."""

    def __init__(self, total, every, enabled):
        self.enabled = enabled
        self.every = every
        self.total = total
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def update(self, i, text):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif i % self.every == 0 or i == self.total:
            print(f"step {i:>6}/{self.total}  {text}", flush=True)

    def write(self, text):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def moving_mean(values, k):
    """Means of the windows of ``k`` consecutive values."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    return [(sums[i + k] - sums[i]) / k for i in range(len(values) - k + 1)]


def mean(values):
    return sum(values) / len(values)


def plot(runs, args, first_step, path):
    """Write the loss curves (and, comparing with stock in one dtype, the
    second moment's change) to ``path``; return the figure (None without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib).")
        return
    show_moment = args.compare_stock and not args.stochastic_rounding
    fig, axes = plt.subplots(
        2 if show_moment else 1, 1, figsize=(8, 7 if show_moment else 4.5),
        sharex=True, squeeze=False,
    )
    steps = list(range(first_step, first_step + args.steps))
    ax = axes[0][0]
    # Float32, the curve to match, drawn first and wide so the others show
    # on top of it.
    styles = {
        "stock": {"color": "tab:red", "ls": "--", "lw": 1.6},
        "float32": {"color": "black", "lw": 3.5, "alpha": 0.3},
        "nearest": {"color": "tab:orange", "lw": 1.6},
        "stochastic": {"color": "tab:blue", "lw": 1.2},
    }
    k = max(1, args.steps // 50)
    for run in sorted(runs, key=lambda r: r.name != "float32"):
        smooth = moving_mean(run.losses, k)
        ax.plot(steps[k - 1 :], smooth, label=run.label,
                **styles.get(run.name, {"lw": 1.6}))
    ax.set_ylabel("training loss (nats/byte)" + (f", mean of {k} steps" if k > 1 else ""))
    rate = ("relative step" if args.learning_rate is None
            else f"learning rate {args.learning_rate:g}")
    ax.set_title(f"Byte-level LM on the Python standard library ({rate})")
    freeze = stock_beta2_freeze_step(DTYPES[args.dtype])
    if show_moment:
        ax2 = axes[1][0]
        for run in runs:
            points = [
                (s, c)
                for s, c in zip(run.moment_steps, run.second_moment_change)
                if c is not None
            ]
            if points:
                xs, ys = zip(*points)
                ax2.plot(xs, ys, marker=".", ls=styles.get(run.name, {}).get("ls", "-"),
                         label=run.name)
        ax2.set_ylabel("relative change of the second\nmoment since the last report")
        ax2.set_xlabel("optimizer step")
        if freeze is not None and first_step <= freeze <= first_step + args.steps:
            for a in (ax, ax2):
                a.axvline(freeze, color="gray", ls="--", lw=1)
            ax2.text(freeze, ax2.get_ylim()[1], f" stock beta_2 == 1 in {args.dtype}",
                     va="top", fontsize=8)
        ax2.legend()
    else:
        ax.set_xlabel("optimizer step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
    return fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16,
                   help="global batch (split over processes)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dims", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--compare-stock", action="store_true",
                   help="also train with mlx.optimizers.Adafactor and plot both")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="a fixed learning rate (relative_step=False, as with "
                   "mlx-lm's --learning-rate); default: the relative step size")
    p.add_argument("--stochastic-rounding", action="store_true",
                   help="round bfloat16/float16 parameters stochastically; with "
                   "--compare-stock, also train float32 and round to nearest")
    p.add_argument("--start-step", type=int, default=0,
                   help="start the optimizers' step count here: e.g. 2300 in "
                   "bfloat16 shows stock's second moment freeze at step 2424 "
                   "(start before 2424, or stock never leaves its zero state)")
    p.add_argument("--data", default=None,
                   help="directory of .py files (default: the standard library)")
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the step eagerly instead of under mx.compile")
    p.add_argument("--plot", default="train_lm.png", help="PNG path ('' for none)")
    p.add_argument("--save", default=None, help="checkpoint path to write at the end")
    p.add_argument("--resume", default=None, help="checkpoint to start from")
    return p.parse_args(argv)


def optimizer_options(args):
    """Options of both optimizers: a fixed --learning-rate with
    relative_step=False, else Adafactor's defaults (the relative step)."""
    if args.learning_rate is None:
        return {}
    return {"learning_rate": args.learning_rate, "relative_step": False}


def run_plan(args):
    """(name, plot label, optimizer factory, dtype) of each run; the first
    is the fused optimizer as the options ask for it, the one --save and
    --resume use."""
    options = optimizer_options(args)
    dtype = args.dtype
    sr = args.stochastic_rounding

    def fused(stochastic_rounding=sr):
        return Adafactor(**options, stochastic_rounding=stochastic_rounding)

    def stock():
        return mlx.optimizers.Adafactor(**options)

    if not args.compare_stock:
        return [("fused", f"fused ({dtype})", fused, dtype)]
    if not sr:
        return [("fused", f"fused ({dtype})", fused, dtype),
                ("stock", f"stock ({dtype})", stock, dtype)]
    return [
        ("stochastic", f"fused, {dtype}, stochastic rounding", fused, dtype),
        ("nearest", f"fused, {dtype}, round to nearest",
         lambda: fused(stochastic_rounding=False), dtype),
        ("float32", "fused, float32", lambda: fused(stochastic_rounding=False),
         "float32"),
        ("stock", f"stock, {dtype} (round to nearest)", stock, dtype),
    ]


def setup(args, world):
    """The runs to train (see run_plan), from one initialisation, the
    batches, and the first step."""
    if args.resume and args.compare_stock:
        raise SystemExit("--resume and --compare-stock do not go together")
    if args.stochastic_rounding and args.dtype == "float32":
        raise SystemExit(
            "--stochastic-rounding rounds bfloat16 and float16 parameters; "
            "pick one with --dtype"
        )
    tokens = stdlib_bytes(args.max_bytes, args.data)
    mx.random.seed(args.seed)
    init = ByteLM(args.dims, args.layers, args.heads, args.seq_len)
    # The initial weights as the training dtype holds them, so a float32
    # run starts from exactly the same values.
    init_weights = [
        (k, v.astype(DTYPES[args.dtype])) for k, v in tree_flatten(init.parameters())
    ]

    runs = [
        Run(name, label, make(), dtype, args, world, init_weights,
            args.resume if i == 0 else None)
        for i, (name, label, make, dtype) in enumerate(run_plan(args))
    ]
    data = Batches(tokens, args.batch_size, args.seq_len, args.seed,
                   world.rank(), world.size())
    first_step = runs[0].optimizer.state["step"].item() + 1
    return runs, data, first_step


def main(argv=None):
    args = parse_args(argv)
    world = mx.distributed.init()
    lead = world.rank() == 0
    runs, data, first_step = setup(args, world)

    if lead:
        n_params = sum(v.size for _, v in tree_flatten(runs[0].model.parameters()))
        print(
            f"byte-level LM: {n_params / 1e6:.2f}M parameters, {args.dtype}, "
            f"{data.tokens.size / 1e6:.1f} MB of text, batch {args.batch_size} x "
            f"{args.seq_len} over {world.size()} process(es), steps {first_step}.."
            f"{first_step + args.steps - 1}"
        )
        if args.dtype != "float32":
            freeze = stock_beta2_freeze_step(DTYPES[args.dtype])
            print(
                f"stock Adafactor computes beta_2 = 1 - t^-0.8 in {args.dtype}: "
                f"exactly 1.0 from step {freeze} on, so its second moment "
                "stops updating; the fused step keeps it in float32."
            )

    for run in runs:
        run.record_second_moment(first_step - 1)
    progress = Progress(args.steps, args.report_every, lead)
    for i in range(1, args.steps + 1):
        step = first_step + i - 1
        batch = data.get(step)
        for run in runs:
            run.train_step(*batch)
        if i % args.report_every == 0 or i == args.steps:
            for run in runs:
                run.record_second_moment(step)
        progress.update(i, "  ".join(f"{r.name} {r.losses[-1]:.3f}" for r in runs))
    progress.close()

    if lead:
        tail = max(1, args.steps // 10)
        width = max(len(run.name) for run in runs)
        for run in runs:
            change = run.second_moment_change[-1]
            moved = "n/a" if change is None else f"{change:.2e}"
            print(
                f"{run.name:>{width}}: loss {mean(run.losses[:tail]):.3f} -> "
                f"{mean(run.losses[-tail:]):.3f} (mean of first/last {tail} "
                f"steps), {1e3 * run.seconds / args.steps:.1f} ms/step, second "
                f"moment moved {moved} (relative) since the previous report"
            )
        if args.plot:
            plot(runs, args, first_step, args.plot)
        if args.save:
            save_checkpoint(args.save, runs[0].model, runs[0].optimizer)
            print(f"checkpoint written to {args.save}")
    return runs


if __name__ == "__main__":
    main()
