"""Test builds of the package: the same sources, configured with the CMake
options only tests use (MFA_FAULTS, MFA_SANITIZE), built with CMake into
build/variants/<name>-<digest>/ and laid out as an importable package.
Never installed, never in a wheel.

    site = variants.build("faults")
    subprocess.run([sys.executable, "-m", "pytest", ...],
                   env=variants.env("faults", site))

In the subprocess `import mlx_fused_adafactor` then loads the variant (its
directory comes first on PYTHONPATH) against the installed MLX. Builds are
cached by a digest of everything they are made from.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "variants"
PACKAGE = ROOT / "python" / "mlx_fused_adafactor"

# name: (CMake definitions, build type)
VARIANTS = {
    # NOTE: [fault switch] (csrc/cpu/faults.h): the planted faults.
    "faults": ({"MFA_FAULTS": "ON"}, "Release"),
    # The CPU path under AddressSanitizer and UndefinedBehaviorSanitizer.
    "asan": ({"MFA_SANITIZE": "address,undefined", "MFA_FAULTS": "ON"},
             "RelWithDebInfo"),
}


def tool(name):
    """`name` from this Python's bin directory (the test set-up installs
    cmake and ninja there), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"no {name}: run tests/metal/setup.sh")
    return found


def _sources():
    files = [ROOT / "CMakeLists.txt"]
    for top in ("csrc", "kernels", "python"):
        files += [p for p in (ROOT / top).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files)


def _digest(name):
    defines, build_type = VARIANTS[name]
    h = hashlib.sha256()
    for p in _sources():
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    h.update(repr((defines, build_type, sys.executable, mx.__version__,
                   os.environ.get("CXX"))).encode())
    return h.hexdigest()[:16]


def build(name):
    """The directory to put first on PYTHONPATH for variant `name`,
    building it if needed."""
    defines, build_type = VARIANTS[name]
    out = CACHE / f"{name}-{_digest(name)}"
    site = out / "site"
    if (site / ".complete").exists():
        return site
    bdir = out / "cmake"
    cmd = [
        tool("cmake"), "-S", str(ROOT), "-B", str(bdir), "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}",
        f"-DCMAKE_BUILD_TYPE={build_type}",
        f"-DPython_EXECUTABLE={sys.executable}",
        # No Metal here; the emulator tests the kernels.
        "-DMFA_BUILD_METALLIB=OFF",
        *[f"-D{k}={v}" for k, v in defines.items()],
    ]
    for step in (cmd, [tool("cmake"), "--build", str(bdir), "--target", "_ext",
                       "-j", "2"]):
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"building the {name} variant failed ({' '.join(step[:3])}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(PACKAGE, site / "mlx_fused_adafactor",
                    ignore=shutil.ignore_patterns("*.in", "__pycache__"))
    for built in list(bdir.glob("_ext*.so")) + [bdir / "_build_info.py"]:
        shutil.copy2(built, site / "mlx_fused_adafactor" / built.name)
    (site / ".complete").write_text(name + "\n")
    return site


def env(name, site, **extra):
    """The environment of a process that runs variant `name` from `site`."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(ROOT / "tests"), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if "MFA_SANITIZE" in VARIANTS[name][0]:
        # Python itself is not instrumented: the runtimes are preloaded, and
        # the interpreter's own allocations at exit are not leaks of ours.
        runtimes = [_runtime("libasan.so"), _runtime("libubsan.so")]
        e["LD_PRELOAD"] = " ".join(r for r in runtimes if r)
        e["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
        e["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def _runtime(lib):
    cxx = os.environ.get("CXX", "g++")
    out = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True,
                         text=True).stdout.strip()
    return out if out and os.path.isabs(out) else None
