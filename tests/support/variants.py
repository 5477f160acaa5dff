"""Test builds of the package: the same sources, configured with the CMake
options only tests use (MFA_FAULTS, MFA_SANITIZE), built with CMake into
build/variants/<name>-<digest>/ and laid out as an importable package.
Never installed, never in a wheel.

    site = variants.build("faults")
    run = variants.run_pytest("faults", site, ["tests/test_parity.py"],
                              MLX_FUSED_ADAFACTOR_FAULT=1)

In the subprocess `import mlx_fused_adafactor` then loads the variant (its
directory comes first on PYTHONPATH) against the installed MLX; run_pytest
reports what that process imported. Builds are cached by a digest of
everything they are made from. fault_table() lists the planted faults of
csrc/cpu/faults.h (NOTE: [fault switch]).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "variants"
PACKAGE = ROOT / "python" / "mlx_fused_adafactor"

# NOTE: [fault switch]: the faults that read out of bounds. Whether such a
# read changes a result or crashes depends on the heap layout, so
# tests/test_sanitizers_cpu.py shows that AddressSanitizer reports them;
# tests/test_faults.py shows that the CPU tests catch every other fault.
OUT_OF_BOUNDS_FAULTS = ("partials_without_rows",)

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
        e["LD_PRELOAD"] = " ".join(
            [_runtime("libasan.so"), _runtime("libubsan.so")])
        e["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
        e["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def _runtime(lib):
    cxx = os.environ.get("CXX", "g++")
    out = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True,
                         text=True).stdout.strip()
    if not os.path.isabs(out):
        raise RuntimeError(f"{cxx} has no {lib}: run tests/metal/setup.sh")
    return out


def fault_table():
    """{name: id} of the faults the enum in csrc/cpu/faults.h declares, in
    the spelling of the fault builds' `_ext.faults` (snake case)."""
    text = (ROOT / "csrc" / "cpu" / "faults.h").read_text()
    body = re.search(r"enum class Fault\b[^{]*\{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = [n.strip() for n in body.split(",") if n.strip()]
    assert names[0] == "None = 0" and names[-1] == "Count", names
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", n).lower(): i
            for i, n in enumerate(names[1:-1], start=1)}


# Runs pytest in a variant's process after saying what it imported.
_DRIVER = """
import json, sys
import mlx_fused_adafactor
from mlx_fused_adafactor import _ext
print("VARIANT " + json.dumps({"file": mlx_fused_adafactor.__file__,
                               "faults": getattr(_ext, "faults", None)}),
      flush=True)
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


class VariantRun:
    """A pytest process of a variant: `proc` (returncode, stdout, stderr)
    and `imported` ({"file", "faults"} as that process saw its package)."""

    def __init__(self, proc):
        self.proc = proc
        line = re.search(r"^VARIANT (.*)$", proc.stdout, re.M)
        self.imported = json.loads(line.group(1)) if line else None

    def output(self, chars=6000):
        return (f"exit code {self.proc.returncode}\n"
                f"--- stdout\n{self.proc.stdout[-chars:]}\n"
                f"--- stderr\n{self.proc.stderr[-chars:]}")


def run_pytest(name, site, args, timeout=900, **extra):
    """Run pytest with `args` (paths relative to the checkout) in a process
    of variant `name` built at `site`; `extra` goes into its environment."""
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT, env=env(name, site, **extra), capture_output=True, text=True,
        timeout=timeout)
    run = VariantRun(proc)
    assert run.imported is not None, run.output()
    assert Path(run.imported["file"]).is_relative_to(site), (
        f"the test process imported {run.imported['file']}, not the "
        f"{name} variant at {site}")
    return run
