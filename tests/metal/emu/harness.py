"""Run one fused Adafactor step on the emulator, through the launch plan.

The plan comes from the extension (`metal_plan_for_inputs`: the code that
eval_gpu runs on the primitive's inputs); every array, scratch region and by-value argument becomes its own
exact-size buffer of the emulator, outputs and scratch start as NaN bytes,
and the dispatches run in plan order.
"""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_fused_adafactor._build import ext

_RAW = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}
_NP = {mx.uint32: np.uint32, mx.uint16: np.uint16}


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


def hyper_args(eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
               beta_1=None, weight_decay=0.0, scale_parameter=True,
               relative_step=True, warmup_init=False):
    """Positional hyper-parameters of metal_plan / adafactor_step."""
    flags = 0
    flags |= ext.SCALE_PARAMETER if scale_parameter else 0
    flags |= ext.RELATIVE_STEP if relative_step else 0
    flags |= ext.WARMUP_INIT if warmup_init else 0
    flags |= ext.MOMENTUM if beta_1 is not None else 0
    flags |= ext.WEIGHT_DECAY if weight_decay != 0 else 0
    b1 = 0.0 if beta_1 is None else float(beta_1)
    return (eps[0], eps[1], clip_threshold, decay_rate, b1, 1.0 - b1,
            weight_decay, flags)


def slot_arrays(step, lr, params, grads, states):
    """Inputs of the primitive (NOTE: [slot layout]) and the dtype and shape
    of each output."""
    inputs = [step, lr]
    outputs = []
    for p, g, st in zip(params, grads, states):
        inputs += [p, g, *st]
        outputs.append((p.dtype, p.shape))
        for s in st:
            outputs.append((s.dtype, s.shape))
    return inputs, outputs


def run_step(exe, step, lr, params, grads, states, hyper, alias=False,
             plan=None, timeout=600):
    """New params and states after one step on the emulator `exe`.

    `alias`: outputs the plan lets take their input's buffer share it, as
    on a Metal device when MLX donates the input. Raises EmulatorError with
    the emulator's output when it fails (sanitizer reports included)."""
    step = mx.array(step, mx.float32)
    lr = mx.array(lr, mx.float32)
    inputs, outputs = slot_arrays(step, lr, params, grads, states)
    # The plan eval_gpu would encode for these inputs.
    plan = plan or ext.metal_plan_for_inputs(inputs, *hyper)
    sizes, blobs = [], []

    def add(blob):
        sizes.append(len(blob))
        blobs.append(blob)
        return len(sizes) - 1

    in_ids = [add(to_bytes(a)) for a in inputs]
    donated = dict(plan["donations"]) if alias else {}
    out_ids = []
    for k, (dtype, shape) in enumerate(outputs):
        if k in donated:
            out_ids.append(in_ids[donated[k]])
        else:
            n = int(np.prod(shape)) if shape else 1
            out_ids.append(add(b"\xff" * (n * mx.zeros((), dtype).itemsize)))
    regions = {}
    lines = []
    for d in plan["dispatches"]:
        binds = []
        for b in d["bindings"]:
            src = b["source"]
            if src == "input":
                buf = in_ids[b["array"]]
            elif src == "output":
                buf = out_ids[b["array"]]
            elif src == "scratch":
                key = (b["offset"], b["size"])
                if key not in regions:
                    regions[key] = add(b"\xff" * b["size"])
                buf = regions[key]
            else:
                buf = add(b["bytes"])
            binds.append(f"{b['index']} {buf}")
        lines.append(
            "dispatch {} {} {} {} {} {} {} {} {}".format(
                d["kernel"], *d["grid"], *d["group"], len(binds), " ".join(binds)
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        job = ["buffers %d" % len(sizes)] + [str(s) for s in sizes] + lines
        (tmp / "job").write_text("\n".join(job) + "\n")
        (tmp / "in").write_bytes(b"".join(blobs))
        proc = subprocess.run(
            [str(exe), str(tmp / "job"), str(tmp / "in"), str(tmp / "out")],
            capture_output=True, text=True, timeout=timeout,
            env=sanitizer_env(),
        )
        if proc.returncode != 0 or "WARNING: ThreadSanitizer" in proc.stderr:
            raise EmulatorError(proc.returncode, symbolize(proc.stderr, exe))
        data = (tmp / "out").read_bytes()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    result = []
    for k, (dtype, shape) in enumerate(outputs):
        i = out_ids[k]
        result.append(from_bytes(data[offsets[i]:offsets[i + 1]], dtype, shape))
    new_params, new_states, k = [], [], 0
    for st in states:
        new_params.append(result[k])
        new_states.append(result[k + 1:k + 1 + len(st)])
        k += 1 + len(st)
    return new_params, new_states


_FRAME = re.compile(r"\((\S*emu_runner)\+(0x[0-9a-f]+)\)")


def symbolize(report, exe):
    """Name file:line in the frames a sanitizer left unresolved (the
    kernels' frames, whose line tables point at the .metal sources)."""
    addrs = sorted(set(m.group(2) for m in _FRAME.finditer(report)))
    addr2line = shutil.which("addr2line")
    if not addrs or not addr2line:
        return report
    out = subprocess.run([addr2line, "-e", str(exe), *addrs],
                         capture_output=True, text=True).stdout.split("\n")
    where = dict(zip(addrs, out))
    return _FRAME.sub(
        lambda m: f"({m.group(1)}+{m.group(2)}) {where.get(m.group(2), '')}",
        report)


def sanitizer_env():
    """Environment of the emulator: sanitizer reports name the .metal file
    and line of each frame (through addr2line, which binutils installs with
    g++)."""
    env = dict(os.environ)
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
