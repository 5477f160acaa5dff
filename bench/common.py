"""Timing, memory and machine facts shared by the benchmark scripts."""

import datetime
import gc
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Budget:
    """How long to time one arm: ``warmup`` untimed steps, then timed steps
    until both ``min_reps`` steps and ``seconds`` have passed, at most
    ``max_reps`` steps."""

    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 30
    seconds: float = 2.0


DEFAULT_BUDGET = Budget(warmup=2, min_reps=5, max_reps=30, seconds=1.5)
QUICK_BUDGET = Budget(warmup=2, min_reps=3, max_reps=10, seconds=0.3)


def time_steps(step, budget):
    """Run ``step`` (which must return only once its work is done) under
    ``budget``; return the timed durations in seconds."""
    for _ in range(budget.warmup):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < budget.max_reps:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if len(times) >= budget.min_reps and t0 - start >= budget.seconds:
            break
    return times


def time_interleaved(steps, budget):
    """Time several step functions round-robin, one step of each per round,
    so that load from other processes falls on all of them alike; return
    ``{name: durations}``."""
    for _ in range(budget.warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    start = time.perf_counter()
    for n in range(1, budget.max_reps + 1):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        if n >= budget.min_reps and time.perf_counter() - start >= budget.seconds:
            break
    return times


def summarize(times):
    """Median and 20th/80th percentile, in milliseconds."""
    p20, p50, p80 = np.percentile(np.asarray(times) * 1e3, [20, 50, 80])
    return {"median_ms": float(p50), "p20_ms": float(p20), "p80_ms": float(p80),
            "n_steps": len(times)}


def release_memory():
    """Drop garbage and MLX's cached buffers, and give freed heap memory back
    to the system, so the next arm's peak and resident memory start from its
    own inputs."""
    gc.collect()
    mx.clear_cache()
    _malloc_trim()


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes():
    """The process's resident memory (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_commit():
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info():
    """The facts a reader needs to judge the numbers."""
    import mlx_fused_adafactor

    info = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "memory_bytes": _mem_total_bytes(),
        "python": sys.version.split()[0],
        "mlx_version": mx.__version__,
        "default_device": device_name(mx.default_device()),
        "package_version": mlx_fused_adafactor.__version__,
        "package_threads": mlx_fused_adafactor._build.ext.num_threads(),
        "git_commit": _git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def device_name(device):
    return "gpu" if device.type == mx.gpu else "cpu"


def dtype_name(dtype):
    return str(dtype).rsplit(".", 1)[-1]


class Progress:
    """A tqdm bar when tqdm is installed, one line per item otherwise."""

    def __init__(self, total, desc):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self._total, self._done, self._desc = total, 0, desc

    def label(self, text):
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        else:
            print(f"[{self._desc} {self._done + 1}/{self._total}] {text}",
                  file=sys.stderr, flush=True)

    def advance(self):
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)

    def write(self, text):
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
