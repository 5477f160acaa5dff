"""The example trainer, run as a user runs it, with tiny sizes.

python -m mlx_fused_adafactor.examples.train_lm: float32 against stock,
the bfloat16 second-moment freeze of stock Adafactor at step 2424, and
save/resume matching an uninterrupted run bit for bit.
"""

import importlib.util
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np

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
