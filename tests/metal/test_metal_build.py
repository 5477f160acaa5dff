"""macOS build wiring, on Linux: the project configured with the Metal
library on and a stand-in `xcrun` (xcrun_standin.py) that lints each
kernel and writes placeholder AIR and metallib files."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emu import build
from mlx_fused_adafactor._build import ext

# The library's name (metal::kLibraryName, csrc/metal/plan.h).
LIBRARY = "mlx_fused_adafactor"

HERE = Path(__file__).resolve().parent


def tool(name):
    """`name` from the test environment's own bin directory (setup.sh may
    pip-install it there), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metal-build")
    bindir = tmp / "bin"
    bindir.mkdir()
    xcrun = bindir / "xcrun"
    xcrun.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "xcrun_standin.py"}" "$@"\n'
    )
    xcrun.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    bdir = tmp / "build"
    cmake = tool("cmake")
    assert cmake, "no cmake: run tests/metal/setup.sh"
    ninja = tool("ninja")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    cmd = [
        cmake, "-S", str(build.ROOT), "-B", str(bdir), *gen,
        "-DMFA_BUILD_METALLIB=ON", f"-DPython_EXECUTABLE={sys.executable}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(
        [cmake, "--build", str(bdir), "--target",
         "mlx_fused_adafactor_metallib"],
        env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prefix = tmp / "prefix"
    proc = subprocess.run(
        [cmake, "--install", str(bdir), "--component", "metallib",
         "--prefix", str(prefix)],
        env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return bdir, prefix


def test_every_kernel_file_is_compiled_into_the_library(configured):
    bdir, _ = configured
    lib = bdir / f"{LIBRARY}.metallib"
    listed = lib.read_text().splitlines()[1:]
    assert sorted(listed) == sorted(str(f) for f in build.kernel_files())


def test_library_is_installed_beside_the_extension(configured):
    bdir, prefix = configured
    installed = prefix / "mlx_fused_adafactor" / f"{LIBRARY}.metallib"
    assert installed.is_file()
    # The extension's destination, as CMake would install it.
    script = (bdir / "cmake_install.cmake").read_text()
    ext_dest = re.search(
        r'file\(INSTALL DESTINATION "\$\{CMAKE_INSTALL_PREFIX\}/([^"]+)" '
        r'TYPE MODULE FILES "[^"]*_ext[^"]*"\)', script)
    assert ext_dest, "no install rule for the extension"
    assert prefix / ext_dest.group(1) == installed.parent
    # The installed package is laid out the same way: the host looks for
    # the library in the directory of the extension binary.
    assert Path(ext.__file__).parent.name == installed.parent.name


def test_a_kernel_the_lint_rejects_fails_the_build(tmp_path):
    bad = tmp_path / "bad.metal"
    bad.write_text('#include "adafactor_kernels.h"\nvoid f(device float* p) '
                   '{ float* q = p; (void)q; }\n')
    proc = subprocess.run(
        [sys.executable, str(HERE / "xcrun_standin.py"), "-sdk", "macosx",
         "metal", f"-I{build.KERNELS}", "-c", str(bad), "-o",
         str(tmp_path / "bad.air")],
        capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"{bad}:2:" in proc.stderr
