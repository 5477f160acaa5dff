"""The extension must run only with the MLX it was compiled for."""

import subprocess
import sys

import mlx.core as mx

import mlx_fused_adafactor


def test_build_version_is_the_running_mlx():
    assert mlx_fused_adafactor.MLX_BUILD_VERSION == mx.__version__


def test_other_mlx_version_is_refused_with_a_clear_error():
    # Pretend the running MLX is another release before the package loads.
    code = (
        "import mlx.core as mx\n"
        "mx.__version__ = '0.0.1'\n"
        "import mlx_fused_adafactor\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert run.returncode != 0
    err = run.stderr
    assert "ImportError" in err
    assert f"compiled for MLX {mx.__version__}" in err
    assert "MLX 0.0.1 is installed" in err
    assert "--no-build-isolation" in err
    assert "undefined symbol" not in err and "Segmentation" not in err
