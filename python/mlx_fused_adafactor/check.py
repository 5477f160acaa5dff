"""Check the fused optimizer on this machine.

    python -m mlx_fused_adafactor.check           # a short report
    python -m mlx_fused_adafactor.check --json    # one JSON object

Reports the platform, the MLX and package versions, the default device, the
path a step takes there (``metal-metallib``: the kernels of the .metallib
the build installed; ``metal-jit``: the embedded kernel source, compiled at
first use; ``cpu``: the fused CPU step; ``reference``: the pure-MLX
implementation), the self-check of the fused kernels against the reference
implementation with its largest error, and the time of one step against
stock ``mlx.optimizers.Adafactor`` on that device. The self-check is the one
the first step of any process runs (NOTE: [self-check] in
csrc/op/self_check.h). Exits with 0 when it passed or did not apply, 1 when
it failed: then the optimizer runs the reference on this device, and the
JSON output is what to attach to a report.
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time

import mlx.core as mx

from . import __version__
from ._build import ext
from .backend import current_backend

# The set of one timed step: a transformer block's matrices and a bias.
TIMING_SHAPES = {"w_in": (1024, 4096), "w_out": (4096, 1024), "b": (4096,)}
TIMING_STEPS = 5


def _device():
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def status():
    """What a step on the default device runs, as a dict (the --json
    output without the timing)."""
    device = _device()
    out = {
        "package_version": __version__,
        "mlx_version": mx.__version__,
        "mlx_build_version": ext.mlx_build_version,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": device,
        "backend_setting": current_backend(),
        "kernel_source_sha256": ext.kernel_source_sha256,
        "metallib": ext.metallib_path(),
        "backend": "reference",
        "self_check": "skipped",
        "max_error": None,
        "max_error_vs_tolerance": None,
        "self_check_cases": 0,
        "self_check_seconds": None,
        "reason": "",
    }
    if out["backend_setting"] == "reference":
        out["reason"] = "MLX_FUSED_ADAFACTOR_BACKEND=reference"
        return out
    st = ext.device_status(device)
    check = st["self_check"]
    if check["cases"]:
        out.update(
            self_check="passed" if check["passed"] else "failed",
            max_error=check["max_error"],
            max_error_vs_tolerance=check["max_error_vs_tolerance"],
            self_check_cases=check["cases"],
            self_check_seconds=check["seconds"],
        )
    if st["ready"]:
        out["backend"] = st["path"]
    else:
        out["reason"] = st["why"]
        if st["failed"]:
            out["self_check"] = "failed"
    return out


def _median_ms(step, params, grads):
    times = []
    for k in range(TIMING_STEPS + 2):
        start = time.perf_counter()
        params = step(grads, params)
        mx.eval(params)
        if k >= 2:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def timing():
    """One step of TIMING_SHAPES in float32 on the default device, fused
    and stock: median milliseconds of TIMING_STEPS after two warm-ups."""
    import mlx.optimizers as optim

    from .optimizer import Adafactor

    keys = mx.random.split(mx.random.key(0), 2 * len(TIMING_SHAPES))
    params = {n: mx.random.normal(s, key=keys[2 * i])
              for i, (n, s) in enumerate(TIMING_SHAPES.items())}
    grads = {n: 0.1 * mx.random.normal(s, key=keys[2 * i + 1])
             for i, (n, s) in enumerate(TIMING_SHAPES.items())}
    mx.eval(params, grads)
    out = {"parameters": sum(p.size for p in params.values())}
    for name, cls in (("fused", Adafactor), ("stock", optim.Adafactor)):
        opt = cls()
        out[f"{name}_ms"] = _median_ms(opt.apply_gradients, params, grads)
    out["speedup"] = out["stock_ms"] / out["fused_ms"]
    return out


def _report(s, t):
    lines = [
        f"mlx-fused-adafactor {s['package_version']} on {s['platform']} "
        f"(Python {s['python']})",
        f"MLX {s['mlx_version']} (extension built for "
        f"{s['mlx_build_version']}), default device: {s['device']}",
    ]
    where = {
        "metal-metallib": f"the kernels of {s['metallib']}",
        "metal-jit": "the embedded kernel source, compiled at run time",
        "cpu": "the fused CPU step",
        "reference": "the pure-MLX implementation of the same float32 math",
    }[s["backend"]]
    lines.append(f"path: {s['backend']} ({where})")
    if s["self_check"] == "skipped":
        lines.append("self-check: skipped" + (
            f" ({s['reason']})" if s["reason"] else ""))
    elif s["self_check"] == "passed":
        lines.append(
            f"self-check: passed ({s['self_check_cases']} steps against the "
            f"reference, largest error {s['max_error']:.2g}, "
            f"{s['max_error_vs_tolerance']:.2f} of its tolerance, "
            f"{s['self_check_seconds']:.2f} s)")
    else:
        lines.append(f"self-check: FAILED: {s['reason']}")
        lines.append(
            "The optimizer runs the pure-MLX implementation on this device. "
            "Please report this with the output of "
            "`python -m mlx_fused_adafactor.check --json`.")
    if t is not None and "error" in t:
        lines.append(f"timing: failed: {t['error']}")
    elif t is not None:
        lines.append(
            f"one step of {t['parameters'] / 1e6:.1f}M float32 parameters "
            f"on the {s['device']}: {t['fused_ms']:.1f} ms ({s['backend']}), "
            f"stock {t['stock_ms']:.1f} ms ({t['speedup']:.1f}x; medians of "
            f"{TIMING_STEPS}, the benchmark measures properly)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m mlx_fused_adafactor.check",
        description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object")
    ap.add_argument("--no-timing", action="store_true",
                    help="leave out the step against stock")
    a = ap.parse_args(argv)
    s = status()
    t = None
    if not a.no_timing:
        try:
            t = timing()
        except Exception as e:  # noqa: BLE001 - the report must still print
            t = {"error": f"{type(e).__name__}: {e}"}
    if a.json:
        # A NaN error is reported as the string "nan": JSON has no NaN.
        out = {k: v if not isinstance(v, float) or math.isfinite(v) else str(v)
               for k, v in dict(s, timing=t).items()}
        print(json.dumps(out, indent=2))
    else:
        print(_report(s, t))
    return 1 if s["self_check"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
