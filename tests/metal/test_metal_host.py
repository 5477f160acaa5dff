"""The Metal host code (csrc/metal/host.cpp with _METAL_) type-checked
against MLX's real Metal host headers, with only the metal-cpp names
declared (host_stub/Metal/Metal.hpp): the encoder calls and the library
lookup use MLX's API as it is. Nothing is linked or run."""

import os
import subprocess
from pathlib import Path

import mlx.core

from emu import build

HERE = Path(__file__).resolve().parent
MLX_INCLUDE = Path(mlx.core.__file__).parent / "include"


def check(defines):
    cmd = [
        build.cxx(), "-std=c++20", "-fsyntax-only", *defines,
        f"-I{HERE / 'host_stub'}", f"-I{build.ROOT / 'csrc'}",
        f"-I{build.KERNELS}", f"-I{MLX_INCLUDE}",
        str(build.ROOT / "csrc" / "metal" / "host.cpp"),
    ]
    return subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ))


def test_metal_host_compiles_against_mlx_headers():
    proc = check(["-D_METAL_"])
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_the_stub_declares_no_encoder_api_of_its_own():
    # The stub has metal-cpp names only: MLX's CommandEncoder methods the
    # host calls come from MLX's device.h.
    stub = (HERE / "host_stub" / "Metal" / "Metal.hpp").read_text()
    for name in ("set_input_array", "set_output_array", "dispatch_threadgroups",
                 "get_library", "get_kernel", "add_temporary"):
        assert name not in stub
        assert name in (build.ROOT / "csrc" / "metal" / "host.cpp").read_text()
