"""Run one fused Adafactor step on the emulator.

The emulator computes the launch plan itself, with the package's code (the
plan eval_gpu encodes), and encodes it with the package's encode_plan on a
model of MLX's concurrent encoder; every array, scratch region and by-value
argument is its own exact-size buffer of the emulator, outputs and scratch
start as NaN bytes, and the dispatches between two of MLX's barriers run in
the order asked for: "plan" (encoding order), "reverse", "concurrent" or
("shuffle", seed). Hyper-parameters are an `_ext.Hyper` (tests build it
with `hyper(**options)`); the emulator takes its bytes, exactly as a kernel
reads them.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_fused_adafactor.optimizer import hyper_parameters as hyper

_RAW = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}
_NP = {mx.uint32: np.uint32, mx.uint16: np.uint16}


def buffer_index(name):
    """The kernels' buffer index AF_BUF_<name> (kernels/adafactor_args.h)."""
    text = (Path(__file__).resolve().parents[3] / "kernels" /
            "adafactor_args.h").read_text()
    m = re.search(rf"#define AF_BUF_{name} (\d+)", text)
    assert m, f"no AF_BUF_{name} in kernels/adafactor_args.h"
    return int(m.group(1))


def dtype_token(dtype):
    return str(dtype).split(".")[-1]


def to_bytes(a):
    a = mx.contiguous(a)
    raw = a.view(_RAW[a.dtype]) if a.dtype in _RAW else a
    return np.array(raw).tobytes()


def from_bytes(data, dtype, shape):
    raw = _RAW[dtype]
    arr = mx.array(np.frombuffer(data, dtype=_NP[raw]).copy()).view(dtype)
    return arr.reshape(shape)


def _nbytes(dtype, shape):
    n = 1
    for d in shape:
        n *= d
    return n * mx.zeros((), dtype).itemsize


def job_text(hyper, tensors, input_sizes=(), output_sizes=(), alias=False,
             order="plan", faults=()):
    """The emulator's job: `tensors` is a list of (param dtype token, grad
    dtype token, shape[, path]); `faults` are planted faults of the plan,
    each a tuple of words (emu/host.cpp lists them)."""
    if isinstance(order, tuple):
        order = " ".join(map(str, order))
    lines = [f"hyper {bytes(hyper).hex()}", f"alias {int(alias)}",
             f"order {order}"]
    lines += ["fault " + " ".join(map(str, f)) for f in faults]
    for pt, gt, shape, *path in tensors:
        path = path[0].encode().hex() if path and path[0] else "-"
        lines.append(" ".join(["tensor", pt, gt, str(len(shape)),
                               *map(str, shape), path]))
    lines.append(" ".join(["inputs", str(len(input_sizes)),
                           *map(str, input_sizes)]))
    lines.append(" ".join(["outputs", str(len(output_sizes)),
                           *map(str, output_sizes)]))
    return "\n".join(lines) + "\n"


def plan(exe, hyper, shapes, param_type="float32", grad_type="float32",
         faults=()):
    """The launch plan of one step over tensors of `shapes`, as a dict, with
    each binding's traffic (for reports) and whether MLX's encoder puts a
    barrier before each dispatch."""
    tensors = [(param_type, grad_type, tuple(s)) for s in shapes]
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job"
        job.write_text(job_text(hyper, tensors, faults=faults))
        proc = subprocess.run([str(exe), "--plan", str(job)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulatorError(proc.returncode, proc.stderr)
    return json.loads(proc.stdout)


def run_step(exe, step, lr, params, grads, states, hyper, alias=False,
             order="plan", faults=(), timeout=600, env=None, names=None):
    """New params and states after one step on the emulator `exe`.

    `states[i]` lists tensor i's state arrays in slot order; `names[i]` is
    tensor i's path (default "t<i>", as oracle.cpu_step names them). `alias`:
    outputs the plan lets take their input's buffer share it, as on a Metal
    device when MLX donates the input. `order` and `faults` as job_text.
    Raises EmulatorError with the emulator's output when it fails
    (sanitizer, watchdog and limit reports included)."""
    inputs = [mx.array(step, mx.float32), mx.array(lr, mx.float32)]
    outputs = []
    tensors = []
    names = names or [f"t{i}" for i in range(len(params))]
    for p, g, st, name in zip(params, grads, states, names):
        tensors.append((dtype_token(p.dtype), dtype_token(g.dtype), p.shape, name))
        inputs += [p, g, *st]
        outputs.append((p.dtype, p.shape))
        outputs += [(s.dtype, s.shape) for s in st]
    blobs = [to_bytes(a) for a in inputs]
    job = job_text(hyper, tensors, [len(b) for b in blobs],
                   [_nbytes(d, s) for d, s in outputs], alias, order, faults)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "job").write_text(job)
        (tmp / "in").write_bytes(b"".join(blobs))
        proc = subprocess.run(
            [str(exe), str(tmp / "job"), str(tmp / "in"), str(tmp / "out")],
            capture_output=True, text=True, timeout=timeout,
            env=sanitizer_env(env),
        )
        if proc.returncode != 0 or "WARNING: ThreadSanitizer" in proc.stderr:
            raise EmulatorError(proc.returncode, symbolize(proc.stderr, exe))
        data = (tmp / "out").read_bytes()
    result, offset = [], 0
    for dtype, shape in outputs:
        n = _nbytes(dtype, shape)
        result.append(from_bytes(data[offset:offset + n], dtype, shape))
        offset += n
    new_params, new_states, k = [], [], 0
    for st in states:
        new_params.append(result[k])
        new_states.append(result[k + 1:k + 1 + len(st)])
        k += 1 + len(st)
    return new_params, new_states


_FRAME = re.compile(r"\((\S*emu_runner)\+(0x[0-9a-f]+)\)")


def symbolize(report, exe):
    """Name file:line in the emulator's frames of a sanitizer report, with
    the functions they were inlined into (a kernel's load is inlined from
    the kernels' header into the kernel, whose .metal line tells where)."""
    addrs = sorted(set(m.group(2) for m in _FRAME.finditer(report)))
    addr2line = shutil.which("addr2line")
    if not addrs or not addr2line:
        return report
    where = {}
    for addr in addrs:
        out = subprocess.run([addr2line, "-i", "-e", str(exe), addr],
                             capture_output=True, text=True).stdout.split()
        where[addr] = " inlined into ".join(out)
    return _FRAME.sub(
        lambda m: f"({m.group(1)}+{m.group(2)}) {where.get(m.group(2), '')}",
        report)


def sanitizer_env(extra=None):
    """Environment of the emulator: sanitizer reports name the .metal file
    and line of each frame (through addr2line, which binutils installs with
    g++); `extra` variables on top."""
    env = dict(os.environ, **(extra or {}))
    addr2line = shutil.which("addr2line")
    if addr2line:
        for var in ("TSAN_OPTIONS", "ASAN_OPTIONS"):
            opts = env.get(var, "")
            env[var] = f"{opts}:external_symbolizer_path={addr2line}".lstrip(":")
    return env


class EmulatorError(RuntimeError):
    def __init__(self, returncode, stderr):
        super().__init__(f"emulator exited with {returncode}:\n{stderr[-4000:]}")
        self.returncode = returncode
        self.stderr = stderr
