"""The CPU path converts float16/bfloat16 with its own branch-free code
(csrc/cpu/types.h) so that its loops vectorize; it must round exactly as
MLX's types do. Compiles tests/cpp/conversions.cpp against MLX's headers and
runs it."""

import shutil
import subprocess
from pathlib import Path

import mlx

ROOT = Path(__file__).resolve().parents[1]


def test_conversions_match_mlx_bit_for_bit(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    assert cxx, "a C++ compiler is needed (the test set-up installs one)"
    exe = tmp_path / "conversions"
    include = Path(mlx.__path__[0]) / "include"
    subprocess.run(
        [cxx, "-O2", "-std=c++17", f"-I{include}", f"-I{ROOT / 'csrc'}",
         str(ROOT / "tests" / "cpp" / "conversions.cpp"), "-o", str(exe)],
        check=True,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert "mismatches: 0" in run.stdout
