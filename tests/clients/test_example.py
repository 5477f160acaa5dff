"""The example trainer, run as a user runs it, with tiny sizes.

python -m mlx_fused_adafactor.examples.train_lm: float32 against stock,
the bfloat16 second-moment freeze of stock Adafactor at step 2424,
save/resume matching an uninterrupted run bit for bit, and bfloat16 with
stochastic rounding against float32 and round to nearest.
"""

import importlib.util
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_fused_adafactor.patch import STOCK_ADAFACTOR

TINY = [
    "--dims", "32", "--layers", "1", "--heads", "2", "--seq-len", "16",
    "--batch-size", "8", "--max-bytes", "200000",
]


def run_example(tmp_path, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_fused_adafactor.examples.train_lm", *TINY, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def summary(out, name):
    m = re.search(
        rf"^\s*{name}: loss ([\d.]+) -> ([\d.]+) .* moment moved (\S+) ", out, re.M
    )
    assert m, out
    return float(m.group(1)), float(m.group(2)), m.group(3)


def test_compare_stock_float32_and_plot(tmp_path):
    out = run_example(
        tmp_path, "--steps", "8", "--report-every", "4", "--compare-stock",
        "--plot", "curves.png",
    )
    fused, stock = summary(out, "fused"), summary(out, "stock")
    assert fused[1] < fused[0], "the model did not train"
    np.testing.assert_allclose(fused[:2], stock[:2], atol=2e-3)
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in out
    else:
        png = (tmp_path / "curves.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bfloat16_stock_second_moment_freezes(tmp_path):
    # Reports at steps 2419, 2423 and 2427: between the last two, stock's
    # beta_2 is exactly 1.0 in bfloat16 and its second moment must not move.
    out = run_example(
        tmp_path, "--steps", "12", "--report-every", "4", "--compare-stock",
        "--dtype", "bfloat16", "--start-step", "2415", "--plot", "",
    )
    assert "exactly 1.0 from step 2424 on" in out
    fused, stock = summary(out, "fused"), summary(out, "stock")
    assert stock[2] == "0.00e+00", out
    assert float(fused[2]) > 1e-4, out


def test_resume_matches_uninterrupted_run(tmp_path):
    """--save after 4 steps, --resume for 3 more, --save: the same file,
    parameters and optimizer state, as 7 steps in one go."""
    run_example(tmp_path, "--steps", "4", "--plot", "", "--save", "first.safetensors")
    run_example(
        tmp_path, "--steps", "3", "--plot", "", "--resume", "first.safetensors",
        "--save", "resumed.safetensors",
    )
    run_example(tmp_path, "--steps", "7", "--plot", "", "--save", "straight.safetensors")

    resumed = mx.load(str(tmp_path / "resumed.safetensors"))
    straight = mx.load(str(tmp_path / "straight.safetensors"))
    assert resumed.keys() == straight.keys()
    assert any(k.startswith("optimizer.") for k in straight)
    assert straight["optimizer.step"].item() == 7
    for k in straight:
        assert mx.array_equal(resumed[k], straight[k]).item(), k


def test_stochastic_rounding_against_float32_and_round_to_nearest(tmp_path):
    """--compare-stock --dtype bfloat16 --stochastic-rounding at a fixed
    learning rate: four runs from the same weights on the same batches, one
    curve each in the plot. At 1e-3 most bfloat16 updates are below half a
    unit in the last place, so round to nearest (fused or stock) loses them
    and stochastic rounding keeps them on average."""
    from mlx_fused_adafactor.examples import train_lm

    argv = [
        *TINY, "--steps", "6", "--report-every", "3", "--compare-stock",
        "--dtype", "bfloat16", "--stochastic-rounding", "--learning-rate", "1e-3",
        "--plot", str(tmp_path / "rounding.png"),
    ]
    runs = {run.name: run for run in train_lm.main(argv)}
    assert list(runs) == ["stochastic", "nearest", "float32", "stock"]
    dtypes = {
        name: {v.dtype for _, v in tree_flatten(run.model.parameters())}
        for name, run in runs.items()
    }
    assert dtypes == {"stochastic": {mx.bfloat16}, "nearest": {mx.bfloat16},
                      "float32": {mx.float32}, "stock": {mx.bfloat16}}
    assert runs["stochastic"].optimizer.stochastic_rounding
    assert not runs["nearest"].optimizer.stochastic_rounding
    assert isinstance(runs["stock"].optimizer, STOCK_ADAFACTOR)
    for run in runs.values():
        assert run.optimizer.learning_rate.item() == np.float32(1e-3)
        assert not run.optimizer.relative_step and run.optimizer.scale_parameter

    # The same first loss (same weights and batch; float32 computes the
    # forward pass in float32), then apart: stochastic rounding stays with
    # float32, round to nearest (fused and stock) stays behind it.
    losses = {name: np.array(run.losses) for name, run in runs.items()}
    first = [v[0] for v in losses.values()]
    assert first[0] == first[1] == first[3], losses
    np.testing.assert_allclose(first[2], first[0], rtol=1e-3)
    assert losses["stochastic"][-1] < losses["stochastic"][0], "did not train"
    gap = {name: abs(v[-1] - losses["float32"][-1]) for name, v in losses.items()}
    assert gap["stochastic"] < 0.25 * gap["nearest"], gap
    np.testing.assert_allclose(losses["stock"], losses["nearest"], rtol=2e-3)
    differ = [
        k for k, v in tree_flatten(runs["stochastic"].model.parameters())
        if not mx.array_equal(v, dict(tree_flatten(runs["nearest"].model.parameters()))[k])
    ]
    assert differ, "stochastic rounding left every parameter as round to nearest"

    png = (tmp_path / "rounding.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    args = train_lm.parse_args(argv)
    fig = train_lm.plot(list(runs.values()), args, 1, str(tmp_path / "again.png"))
    assert len(fig.axes) == 1
    labels = sorted(line.get_label() for line in fig.axes[0].get_lines())
    assert labels == sorted(run.label for run in runs.values()), labels
    assert "stochastic rounding" in runs["stochastic"].label


def test_stochastic_rounding_needs_a_low_precision_dtype():
    from mlx_fused_adafactor.examples import train_lm

    args = train_lm.parse_args(["--stochastic-rounding"])
    with pytest.raises(SystemExit, match="--stochastic-rounding rounds bfloat16"):
        train_lm.setup(args, mx.distributed.init())
