"""The CPU path converts float16/bfloat16 with its own code: branch-free
element conversions (csrc/cpu/types.h) that its loops vectorize, and block
conversions of float16 by the hardware's instructions where it has them
(csrc/cpu/convert.cpp, NOTE: [float16 blocks]). They must round exactly as
MLX's types do. Compiles tests/cpp/conversions.cpp with convert.cpp against
MLX's headers and runs it; on x86-64 with F16C and on arm64 the vector path
the step takes must be among those checked."""

import platform
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
        # The extension's flags for its CPU code (CMakeLists.txt).
        [cxx, "-O3", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=off",
         "-std=c++17", f"-I{include}", f"-I{ROOT / 'csrc'}",
         str(ROOT / "tests" / "cpp" / "conversions.cpp"),
         str(ROOT / "csrc" / "cpu" / "convert.cpp"), "-o", str(exe)],
        check=True,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert "mismatches: 0" in run.stdout
    assert "path scalar: checked" in run.stdout
    if platform.machine() in ("arm64", "aarch64"):
        assert "path neon: checked (the one the step takes)" in run.stdout
    elif _has_f16c():
        assert "path f16c: checked (the one the step takes)" in run.stdout, run.stdout


def _has_f16c():
    try:
        with open("/proc/cpuinfo") as f:
            return " f16c" in f.read()
    except OSError:
        return False


def test_stochastic_rounding_matches_the_shared_math_bit_for_bit(tmp_path):
    """csrc/cpu/rounding.h (branch-free, so pass 3 vectorizes) against
    adafactor_round_bf16/f16 of kernels/adafactor_math.h."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    assert cxx, "a C++ compiler is needed (the test set-up installs one)"
    exe = tmp_path / "stochastic"
    subprocess.run(
        [cxx, "-O3", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=off",
         "-std=c++17", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'kernels'}",
         str(ROOT / "tests" / "cpp" / "stochastic.cpp"), "-o", str(exe)],
        check=True,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert "mismatches: 0" in run.stdout
