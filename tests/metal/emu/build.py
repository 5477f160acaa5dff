"""Compile the unchanged kernels/*.metal for the CPU emulation of Metal.

Modes: 'run' (every dtype), 'tsan' and 'asan' (float32 instantiations only,
under ThreadSanitizer / AddressSanitizer), each one executable: the kernels
and gpu.cpp (the emulated GPU, compiled as Metal against the test doubles of
include/), and host.cpp with the package's launch plan (csrc/metal,
csrc/schema, compiled as the host C++ it is); and `lint`, clang
-fsyntax-only with Metal's address spaces. Builds are cached under
build/metal-emu by a hash of their inputs.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .rewrite import rewrite

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
KERNELS = ROOT / "kernels"
CSRC = ROOT / "csrc"
INCLUDE = HERE / "include"
# The package's host code of the Metal path, compiled into the emulator.
HOST_SOURCES = [
    HERE / "host.cpp",
    CSRC / "metal" / "plan.cpp",
    CSRC / "metal" / "traffic.cpp",
    CSRC / "schema" / "slots.cpp",
    CSRC / "schema" / "hyper.cpp",
]
CACHE = Path(os.environ.get("EMU_CACHE", ROOT / "build" / "metal-emu"))

COMMON = [
    # C++20 for the atomics' wait/notify of the emulated barriers.
    "-std=c++20",
    "-pthread",
    "-D__METAL__",
    # As the CPU path: a*b+c rounds twice.
    "-ffp-contract=off",
    "-Wall",
    # [[buffer(n)]] and friends are read by the rewrite, then removed; the
    # ones left are inside instantiate_kernel.
    "-Wno-attributes",
]
MODES = {
    "run": ["-O1"],
    "tsan": ["-O1", "-g", "-fsanitize=thread", "-DEMU_FLOAT32_ONLY"],
    "asan": [
        "-O1",
        "-g",
        "-fsanitize=address",
        "-fno-omit-frame-pointer",
        "-DEMU_FLOAT32_ONLY",
    ],
}
LINT = [
    "-fsyntax-only",
    "-x",
    "c++",
    "-std=c++17",
    "-nostdinc",
    "-nostdinc++",
    "-D__METAL__",
    "-DEMU_LINT",
    "-fno-exceptions",
    "-fno-rtti",
    "-Werror",
    # As mlx_build_metallib compiles them.
    "-Wall",
    "-Wextra",
    "-Wdouble-promotion",
    "-target",
    "x86_64-linux-gnu",
]


def kernel_files():
    return sorted(KERNELS.glob("*.metal"))


def cxx():
    return os.environ.get("CXX", "g++")


def clang():
    """The clang that lints: $EMU_CLANG, else the one in the `ziglang`
    package (tests/metal/setup.sh installs it), else clang++ on PATH."""
    if os.environ.get("EMU_CLANG"):
        return os.environ["EMU_CLANG"].split()
    try:
        import ziglang  # noqa: F401

        return [sys.executable, "-m", "ziglang", "clang"]
    except ImportError:
        pass
    found = shutil.which("clang++")
    if found:
        return [found]
    raise RuntimeError(
        "no clang for the Metal lint: run tests/metal/setup.sh "
        "(pip install ziglang)"
    )


def _digest(paths, extra):
    h = hashlib.sha256()
    for p in sorted(set(Path(x) for x in paths)):
        h.update(str(p).encode())
        h.update(p.read_bytes())
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


def mlx_include():
    import mlx.core

    return Path(mlx.core.__file__).parent / "include"


def _inputs(sources):
    deps = list(sources) + [HERE / "gpu.cpp", HERE / "emu.h", HERE / "rewrite.py"]
    deps += HOST_SOURCES + list((CSRC / "metal").glob("*.h"))
    deps += list((CSRC / "schema").glob("*.h"))
    deps += list(INCLUDE.rglob("*")) + list(KERNELS.glob("*.h"))
    return [p for p in deps if Path(p).is_file()]


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def _check(proc, what):
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-6000:]}")


def build(mode, sources=None, include_dirs=()):
    """Path of the emulator executable for `mode` with the kernels of
    `sources` (default: kernels/*.metal), compiling it if needed."""
    sources = [Path(s) for s in (sources or kernel_files())]
    flags = COMMON + MODES[mode]
    incs = [f"-I{d}" for d in include_dirs] + [f"-I{INCLUDE}", f"-I{KERNELS}"]
    key = _digest(_inputs(sources), (cxx(), flags, incs))
    out = CACHE / f"{mode}-{key}"
    exe = out / "emu_runner"
    if exe.exists():
        return exe
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # (compile flags, source) per object: the kernels and the emulated GPU
    # as Metal, the host side as plain C++ against MLX's headers.
    units = []
    for src in sources:
        gen = tmp / (src.stem + ".cpp")
        gen.write_text(rewrite(src.read_text(), str(src), "run"))
        units.append((flags + incs, gen))
    units.append((flags + incs, HERE / "gpu.cpp"))
    host_flags = [f for f in flags if f != "-D__METAL__"] + [
        f"-I{HERE}", f"-I{CSRC}", f"-I{KERNELS}", f"-I{mlx_include()}"]
    units += [(host_flags, src) for src in HOST_SOURCES]
    procs, objs = [], []
    # Two compilers at a time: the machine has two cores.
    for k, (unit_flags, unit) in enumerate(units):
        obj = tmp / f"{k}_{unit.stem}.o"
        objs.append(obj)
        procs.append(
            (unit, subprocess.Popen(
                [cxx(), *unit_flags, "-c", str(unit), "-o", str(obj)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        )
        if len(procs) >= 2 or k == len(units) - 1:
            for u, p in procs:
                _, err = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError(f"compiling {u} ({mode}) failed:\n{err[-6000:]}")
            procs = []
    _check(
        _run([cxx(), *flags, *map(str, objs), "-o", str(tmp / "emu_runner")]),
        f"linking the {mode} emulator",
    )
    if out.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    return exe


def lint(source, include_dirs=()):
    """clang -fsyntax-only on the lint rewrite of `source`; the process."""
    source = Path(source)
    gen_dir = CACHE / "lint"
    gen_dir.mkdir(parents=True, exist_ok=True)
    gen = gen_dir / f"{source.stem}-{os.getpid()}-{_digest([source], 'lint')}.cpp"
    gen.write_text(rewrite(source.read_text(), str(source), "lint"))
    # The test doubles first: they stand in for MLX's own kernel headers.
    incs = [f"-I{INCLUDE}"] + [f"-I{d}" for d in include_dirs] + [f"-I{KERNELS}"]
    proc = _run([*clang(), *LINT, *incs, str(gen)])
    gen.unlink()
    return proc
