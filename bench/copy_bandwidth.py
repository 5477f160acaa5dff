"""How fast can this machine copy and read memory? The limits an optimizer
step is measured against.

Copy counts read + write bytes (a copy of N bytes moves 2N). Three ways, best
taken as the limit: MLX ``x + 0`` on the default device, ``np.copyto`` on one
thread, and ``np.copyto`` split across all cores. Read is a sum
(``np.add.reduce``) on one thread and split across all cores, best taken: an
Adafactor step reads five times for each write, and on some machines (the
reference one) reads alone run well below the copy figure. Buffers are written before
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


def numpy_read(nbytes, reps, threads):
    src = np.ones(nbytes // 4, dtype=np.float32)
    bounds = [(c[0], c[-1] + 1) for c in np.array_split(np.arange(src.size), threads)
              if c.size]
    sink = [0.0] * len(bounds)

    def read_part(i, lo, hi):
        sink[i] = float(np.add.reduce(src[lo:hi]))

    def run():
        workers = [threading.Thread(target=read_part, args=(i, *b))
                   for i, b in enumerate(bounds)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    t = _median_time(run, reps)
    return nbytes / t / 1e9


def measure(nbytes=DEFAULT_BYTES, reps=5):
    """GB/s by each method: copies (read + write) and reads, and the best
    of each."""
    cores = os.cpu_count() or 1
    detail = {
        "mlx_add_zero": mlx_add_zero(nbytes, reps),
        "numpy_copyto_1_thread": numpy_copyto(nbytes, reps, 1),
        f"numpy_copyto_{cores}_threads": numpy_copyto(nbytes, reps, cores),
    }
    read = {
        "numpy_sum_1_thread": numpy_read(nbytes, reps, 1),
        f"numpy_sum_{cores}_threads": numpy_read(nbytes, reps, cores),
    }
    mx.clear_cache()
    return {"buffer_bytes": nbytes, "gbps": detail, "best_gbps": max(detail.values()),
            "read_gbps": read, "best_read_gbps": max(read.values())}


if __name__ == "__main__":
    result = measure()
    for name, gbps in {**result["gbps"], **result["read_gbps"]}.items():
        print(f"{name:>24}: {gbps:6.1f} GB/s")
    print(f"{'best copy':>24}: {result['best_gbps']:6.1f} GB/s")
    print(f"{'best read':>24}: {result['best_read_gbps']:6.1f} GB/s")
