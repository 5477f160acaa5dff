"""Compile the kernel source that ships for the CPU emulation of Metal.

The source is the one the package embeds and compiles into its .metallib:
kernels/embed_metal.py flattens kernels/*.metal and their headers into it,
here as in the CMake build, so the emulator compiles the same bytes
(tests/metal/test_metal_build.py compares their SHA-256 with the one the
installed extension carries).

Modes: 'run' (every dtype), 'tsan' and 'asan' (float32 instantiations only,
under ThreadSanitizer / AddressSanitizer), each one executable: the
rewritten source and gpu.cpp (the emulated GPU), compiled as Metal against
the test doubles of include/, and host.cpp with the package's launch plan
and encoding (csrc/metal, csrc/schema), compiled as the host C++ it is; and
`lint`, clang -fsyntax-only with Metal's address spaces. Builds are cached
under build/metal-emu by a hash of their inputs.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import importlib.util

from .rewrite import rewrite

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
KERNELS = ROOT / "kernels"
CSRC = ROOT / "csrc"
INCLUDE = HERE / "include"
GENERATOR = ROOT / "kernels" / "embed_metal.py"


def _generator():
    spec = importlib.util.spec_from_file_location("embed_metal", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


embed_metal = _generator()
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
    # ones left are in the kernels' own af_instantiate_kernel.
    "-Wno-attributes",
    # The kernel source's `#pragma clang diagnostic`.
    "-Wno-unknown-pragmas",
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


def kernel_source(sources=None, include_dirs=()):
    """The flattened kernel source of `sources` (default: kernels/*.metal,
    which is what the package ships), as the CMake build makes it."""
    return embed_metal.flatten(
        [Path(s) for s in (sources or kernel_files())],
        [*map(Path, include_dirs), KERNELS], root=ROOT)


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


def _host_inputs():
    """Everything the host objects and gpu.cpp are compiled from."""
    deps = [HERE / "gpu.cpp", HERE / "emu.h", HERE / "encoder.h", *HOST_SOURCES]
    deps += list((CSRC / "metal").glob("*.h")) + list((CSRC / "schema").glob("*.h"))
    deps += list(INCLUDE.rglob("*")) + list(KERNELS.glob("*.h"))
    return [p for p in deps if Path(p).is_file()]


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def _check(proc, what):
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-6000:]}")


# Object files compiled from the one kernel source, each with every
# SHARDS-th instantiation (emu_runtime.h), so that two compilers share it.
SHARDS = {"run": 2, "tsan": 1, "asan": 1}


def _compile(units, what):
    """Compile the (flags, source, object) units whose object is missing,
    two compilers at a time (the machine has two cores); each object is
    written under a temporary name first, so a cached one is complete."""
    todo = [u for u in units if not u[2].exists()]
    for k in range(0, len(todo), 2):
        procs = []
        for flags, src, obj in todo[k:k + 2]:
            obj.parent.mkdir(parents=True, exist_ok=True)
            tmp = obj.with_name(obj.name + f".tmp{os.getpid()}")
            # From the root: the kernel source's #line paths are relative
            # to it, and so then are the debug line tables.
            procs.append((src, obj, tmp, subprocess.Popen(
                [cxx(), *flags, "-c", str(src), "-o", str(tmp)], cwd=ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        for src, obj, tmp, proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"compiling {src} ({what}) failed:\n{err[-6000:]}")
            tmp.replace(obj)


def build(mode, sources=None, include_dirs=()):
    """Path of the emulator executable for `mode` with the kernels of
    `sources` (default: kernels/*.metal), compiling what is not cached: the
    host objects and the emulated GPU are shared by every kernel source."""
    sources = [Path(s) for s in (sources or kernel_files())]
    text = kernel_source(sources, include_dirs)
    flags = COMMON + MODES[mode]
    incs = [f"-I{INCLUDE}"]
    host_key = _digest(_host_inputs(), (cxx(), flags))
    kernel_key = _digest([HERE / "rewrite.py", *INCLUDE.rglob("*")],
                         (cxx(), flags, text))
    objects = CACHE / "objects"
    # The kernels and the emulated GPU as Metal, the host side as plain C++
    # against MLX's headers.
    shards = SHARDS[mode]
    gen = objects / f"{mode}-kernels-{kernel_key}.cpp"
    units = [(flags + incs + [f"-DEMU_SHARDS={shards}", f"-DEMU_SHARD={k}"],
              gen, objects / f"{mode}-kernels-{kernel_key}-{k}.o")
             for k in range(shards)]
    units.append((flags + incs, HERE / "gpu.cpp",
                  objects / f"{mode}-gpu-{host_key}.o"))
    host_flags = [f for f in flags if f != "-D__METAL__"] + [
        f"-I{HERE}", f"-I{CSRC}", f"-I{KERNELS}", f"-I{mlx_include()}"]
    units += [(host_flags, src, objects / f"{mode}-{src.stem}-{host_key}.o")
              for src in HOST_SOURCES]
    exe = CACHE / f"{mode}-{_digest([], [str(u[2]) for u in units])}" / "emu_runner"
    if exe.exists():
        return exe
    if not all(obj.exists() for _, src, obj in units if src == gen):
        objects.mkdir(parents=True, exist_ok=True)
        gen.write_text(rewrite(text, "kernel_source.metal", "run"))
    _compile(units, mode)
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f"emu_runner.tmp{os.getpid()}")
    _check(_run([cxx(), *flags, *[str(u[2]) for u in units], "-o", str(tmp)]),
           f"linking the {mode} emulator")
    tmp.replace(exe)
    return exe


def lint(source, include_dirs=()):
    """clang -fsyntax-only on the lint rewrite of the flattened `source`
    (a .metal file, with the headers it includes); the process."""
    return lint_text(kernel_source([source], include_dirs),
                     f"{Path(source).stem}-{os.getpid()}")


def lint_text(text, name="kernel_source"):
    """clang -fsyntax-only on the lint rewrite of a flattened kernel source;
    the process."""
    gen_dir = CACHE / "lint"
    gen_dir.mkdir(parents=True, exist_ok=True)
    gen = gen_dir / f"{name}-{os.getpid()}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.cpp"
    gen.write_text(rewrite(text, "kernel_source.metal", "lint"))
    proc = _run([*clang(), *LINT, f"-I{INCLUDE}", str(gen)])
    gen.unlink()
    return proc
