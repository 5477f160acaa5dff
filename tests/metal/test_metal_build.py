"""The build as macOS runs it, on Linux, with a stand-in `xcrun`
(xcrun_standin.py) that plays a Mac with the Command Line Tools alone (no
Metal compiler), an Xcode 26 without its Metal Toolchain, or a working
Metal compiler.

CMake is configured with MFA_BUILD_METALLIB=AUTO, the default where MLX has
Metal: it probes the compiler, and without one it builds everything but the
.metallib and says so in one status line; the installed extension then
compiles its embedded source at run time. With a compiler, the .metallib is
built from that same source and installed next to the extension, which
prefers it. And the emulator compiles the bytes that ship."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emu import build
from mlx_fused_adafactor._build import ext

sys.path.insert(0, str(build.ROOT / "tests"))

import xcrun_standin  # noqa: E402
from support import variants  # noqa: E402

# The library's name (metal::kLibraryName, csrc/metal/plan.h).
LIBRARY = "mlx_fused_adafactor"
HERE = Path(__file__).resolve().parent
PROBE_FAILED = re.compile(
    r"-- mlx_fused_adafactor: no \.metallib \(the Metal compiler failed: "
    r"(.*)\); the kernels will be compiled at run time from the embedded "
    r"source\n")
PROBE_OK = ("-- mlx_fused_adafactor: Metal compiler found; building "
            "mlx_fused_adafactor.metallib\n")


def standin_env(tmp, mode):
    """The environment of a build whose `xcrun` is the stand-in in `mode`."""
    bindir = Path(tmp) / "bin"
    bindir.mkdir(exist_ok=True)
    xcrun = bindir / "xcrun"
    xcrun.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "xcrun_standin.py"}" "$@"\n')
    xcrun.chmod(0o755)
    return dict(os.environ, XCRUN_STANDIN=mode,
                PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")


def cmake(*args, env):
    proc = subprocess.run([variants.tool("cmake"), *map(str, args)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def configure(bdir, env):
    return cmake("-S", build.ROOT, "-B", bdir, "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={variants.tool('ninja')}",
                 f"-DPython_EXECUTABLE={sys.executable}",
                 "-DMFA_BUILD_METALLIB=AUTO", env=env)


def install(bdir, prefix, env):
    """Install the build into `prefix` as the wheel lays it out: the
    extension (and the .metallib, if any) next to the Python package."""
    shutil.rmtree(prefix, ignore_errors=True)
    cmake("--install", bdir, "--prefix", prefix, env=env)
    package = prefix / "mlx_fused_adafactor"
    for src in variants.PACKAGE.rglob("*.py"):
        dest = package / src.relative_to(variants.PACKAGE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    return package


def what_the_extension_loads(prefix):
    """Ask the installed package, in a process of its own, where a Mac
    would take its kernels from."""
    code = ("import json, mlx_fused_adafactor as m; print(json.dumps("
            "{'metallib': m._ext.metallib_path(), "
            "'sha256': m._ext.kernel_source_sha256, "
            "'file': m._ext.__file__}))")
    env = dict(os.environ, PYTHONPATH=str(prefix))
    proc = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, cwd=prefix)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def mac_builds():
    """One build directory, configured and built as on a Mac with the
    Command Line Tools alone, installed; then configured again as on a Mac
    with a Metal compiler, built and installed. Returns what each configure
    printed and each install prefix. Cached under build/metal-emu by a
    digest of the sources (as tests/support/variants.py caches its builds)."""
    h = hashlib.sha256()
    for f in variants._sources() + sorted((HERE / "emu").rglob("*.py")) + [
            HERE / "xcrun_standin.py"]:
        h.update(str(f).encode())
        h.update(f.read_bytes())
    h.update(repr((sys.executable, os.environ.get("CXX"))).encode())
    tmp = build.CACHE / f"mac-build-{h.hexdigest()[:16]}"
    out = {"clt_prefix": tmp / "clt", "ok_prefix": tmp / "ok"}
    if not (tmp / "complete").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        bdir = tmp / "build"
        env = standin_env(tmp, "clt")
        (tmp / "clt_configure").write_text(configure(bdir, env))
        cmake("--build", bdir, "-j", "2", env=env)
        install(bdir, out["clt_prefix"], env)
        env = standin_env(tmp, "ok")
        (tmp / "ok_configure").write_text(configure(bdir, env))
        cmake("--build", bdir, "-j", "2", env=env)
        install(bdir, out["ok_prefix"], env)
        # The installs are what the tests look at.
        shutil.rmtree(bdir)
        (tmp / "complete").write_text("")
    for name in ("clt_configure", "ok_configure"):
        out[name] = (tmp / name).read_text()
    return out


def test_the_emulator_compiles_the_bytes_that_ship():
    text = build.kernel_source()
    assert text == ext.kernel_source()
    assert hashlib.sha256(text.encode()).hexdigest() == ext.kernel_source_sha256
    # Self-contained: the only include left is <metal_stdlib>.
    includes = re.findall(r"^\s*#\s*include\s*(\S+)", text, re.M)
    metal_side = [i for i in includes if i not in ("<cmath>", "<cstdint>",
                                                   "<cstring>")]
    assert metal_side == ["<metal_stdlib>"]


def test_without_a_metal_compiler_the_build_succeeds_without_metallib(
        mac_builds):
    lines = PROBE_FAILED.findall(mac_builds["clt_configure"])
    assert lines == [xcrun_standin.FAILURES["clt"]]
    package = mac_builds["clt_prefix"] / "mlx_fused_adafactor"
    assert not (package / f"{LIBRARY}.metallib").exists()
    loads = what_the_extension_loads(mac_builds["clt_prefix"])
    assert Path(loads["file"]).parent == package
    # No .metallib: a Mac compiles the embedded source at run time.
    assert loads["metallib"] is None
    assert loads["sha256"] == ext.kernel_source_sha256


def test_with_a_metal_compiler_the_metallib_is_installed_and_preferred(
        mac_builds):
    assert PROBE_OK in mac_builds["ok_configure"]
    assert not PROBE_FAILED.search(mac_builds["ok_configure"])
    package = mac_builds["ok_prefix"] / "mlx_fused_adafactor"
    installed = package / f"{LIBRARY}.metallib"
    assert installed.is_file()
    loads = what_the_extension_loads(mac_builds["ok_prefix"])
    assert Path(loads["file"]).parent == package
    assert loads["metallib"] == str(installed)
    # Compiled from the one flattened source, the bytes the extension
    # embeds.
    sources = installed.read_text().splitlines()[1:]
    assert len(sources) == 1
    assert sources[0].split()[1] == ext.kernel_source_sha256


def test_an_xcode_without_its_metal_toolchain_configures(tmp_path):
    out = configure(tmp_path / "build", standin_env(tmp_path, "toolchain"))
    assert PROBE_FAILED.findall(out) == [xcrun_standin.FAILURES["toolchain"]]


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
