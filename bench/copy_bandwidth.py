"""How fast can this machine copy memory? The limit an optimizer step is
measured against.

Counts read + write bytes (a copy of N bytes moves 2N). Three ways, best
taken as the limit: MLX ``x + 0`` on the default device, ``np.copyto`` on one
thread, and ``np.copyto`` split across all cores. Buffers are written before
timing so first-touch page faults are not timed. The default 512 MiB source
plus 512 MiB destination exceed the last-level cache of the reference machine
(480 MiB reported by lscpu); steps whose working set fits in that cache can
exceed this "limit".

    python -m bench.copy_bandwidth
"""

import os
import threading
import time

import mlx.core as mx
import numpy as np

DEFAULT_BYTES = 512 * 2**20


def _median_time(fn, reps):
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def mlx_add_zero(nbytes, reps):
    x = mx.full((nbytes // 4,), 1.0)
    mx.eval(x)
    out = {}

    def run():
        out.pop("y", None)
        y = x + 0
        mx.eval(y)
        out["y"] = y

    t = _median_time(run, reps)
    return 2 * nbytes / t / 1e9


def numpy_copyto(nbytes, reps, threads):
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(c[0], c[-1] + 1) for c in chunks if c.size]

    def copy_part(lo, hi):
        np.copyto(dst[lo:hi], src[lo:hi])

    def run():
        if threads == 1:
            np.copyto(dst, src)
            return
        workers = [threading.Thread(target=copy_part, args=b) for b in bounds]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    t = _median_time(run, reps)
    return 2 * nbytes / t / 1e9


def measure(nbytes=DEFAULT_BYTES, reps=5):
    """GB/s (read + write) by each method and the best of them."""
    cores = os.cpu_count() or 1
    detail = {
        "mlx_add_zero": mlx_add_zero(nbytes, reps),
        "numpy_copyto_1_thread": numpy_copyto(nbytes, reps, 1),
        f"numpy_copyto_{cores}_threads": numpy_copyto(nbytes, reps, cores),
    }
    mx.clear_cache()
    return {"buffer_bytes": nbytes, "gbps": detail, "best_gbps": max(detail.values())}


if __name__ == "__main__":
    result = measure()
    for name, gbps in result["gbps"].items():
        print(f"{name:>24}: {gbps:6.1f} GB/s")
    print(f"{'best':>24}: {result['best_gbps']:6.1f} GB/s")
