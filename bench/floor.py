"""What is the least time the memory traffic of a step can take on this
machine? The floor each optimizer step is reported against.

A step needs the RMS of its update before it can write anything, so it takes
at least two passes over memory: one read of the gradient (the statistics),
then a read of the gradient and the parameter and a write of the parameter.
The floor times exactly that traffic with numpy, on arrays as large as the
step's own parameters and gradients, so that it runs from the same level of
the cache hierarchy as the step: pass 1 sums the gradient's bytes, pass 2
adds the gradient into the parameter in place (integer views, so the values
cost nothing). Each pass runs on one thread and split over all cores; the
faster is taken.
State traffic (a few rows and columns, or the flat second moment) is left
out, so no real step can reach the floor, and none should come out below it.

    python -m bench.floor --values 16777216 --itemsize 4
"""

import os
import threading
import time

import numpy as np

from .common import summarize

TRANSFERS = 4  # read g; read g, read p, write p


def floor_bytes(n_values, itemsize):
    return TRANSFERS * n_values * itemsize


class Floor:
    """The two passes over a gradient and a parameter of ``n_values`` values
    of ``itemsize`` bytes, on one thread or on ``threads``: the calling
    thread and persistent workers, each on its share, meeting at a barrier
    after each pass (numpy releases the GIL inside its loops). The threaded
    way is timed inside the threads, around the numpy calls: a pass takes
    as long as its slowest share, and Python's barrier, which costs more
    than a small pass, is left out (the step's own barrier is a C++ one)."""

    def __init__(self, n_values, itemsize, threads=None):
        threads = threads or os.cpu_count() or 1
        # 8-byte words: whole values for every itemsize the step takes.
        words = max(1, -(-n_values * itemsize // 8))
        self.g = np.ones(words, dtype=np.uint64)
        self.p = np.ones(words, dtype=np.uint64)
        bounds = np.linspace(0, words, threads + 1).astype(int)
        self.parts = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        self._spent = np.zeros((len(self.parts), 2))
        self._barrier = threading.Barrier(len(self.parts))
        self._stop = False
        self._workers = [threading.Thread(target=self._work, args=(i,), daemon=True)
                         for i in range(1, len(self.parts))]
        for w in self._workers:
            w.start()

    def _share(self, i, k):
        lo, hi = self.parts[i]
        t0 = time.perf_counter()
        if k == 0:
            np.add.reduce(self.g[lo:hi])
        else:
            np.add(self.p[lo:hi], self.g[lo:hi], out=self.p[lo:hi])
        self._spent[i, k] = time.perf_counter() - t0

    def _work(self, i):
        while True:
            self._barrier.wait()
            if self._stop:
                return
            self._share(i, 0)
            self._barrier.wait()
            self._share(i, 1)
            self._barrier.wait()

    def one_thread(self):
        """One step's traffic on the calling thread; returns seconds."""
        t0 = time.perf_counter()
        np.add.reduce(self.g)
        np.add(self.p, self.g, out=self.p)
        return time.perf_counter() - t0

    def all_threads(self):
        """One step's traffic on every thread; returns seconds (slowest
        share of pass 1 plus slowest share of pass 2)."""
        self._barrier.wait()
        self._share(0, 0)
        self._barrier.wait()
        self._share(0, 1)
        self._barrier.wait()
        return float(self._spent[:, 0].max() + self._spent[:, 1].max())

    def close(self):
        self._stop = True
        if self._workers:
            self._barrier.wait()
        for w in self._workers:
            w.join()
        self.g = self.p = None


def _timed(fn, budget):
    """``fn`` returns its own time; run it under ``budget`` like
    common.time_steps and return the times."""
    for _ in range(budget.warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < budget.max_reps:
        times.append(fn())
        if len(times) >= budget.min_reps and time.perf_counter() - start >= budget.seconds:
            break
    return times


def measure(n_values, itemsize, budget):
    """The floor of a step over ``n_values`` values of ``itemsize`` bytes:
    median and spread (ms) of the faster way, and both ways' medians."""
    f = Floor(n_values, itemsize)
    try:
        ways = {"one_thread": summarize(_timed(f.one_thread, budget))}
        if len(f.parts) > 1:
            ways[f"{len(f.parts)}_threads"] = summarize(_timed(f.all_threads, budget))
    finally:
        f.close()
    best = min(ways, key=lambda w: ways[w]["median_ms"])
    return {**ways[best], "way": best,
            "ways_median_ms": {w: s["median_ms"] for w, s in ways.items()},
            "bytes": floor_bytes(n_values, itemsize)}


if __name__ == "__main__":
    import argparse

    from .common import DEFAULT_BUDGET

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", type=int, default=1 << 24)
    ap.add_argument("--itemsize", type=int, default=4)
    a = ap.parse_args()
    r = measure(a.values, a.itemsize, DEFAULT_BUDGET)
    print(f"{a.values} values x {a.itemsize} B: {r['median_ms']:.3f} ms "
          f"({r['way']}; {r['bytes'] / r['median_ms'] / 1e6:.1f} GB/s); "
          + ", ".join(f"{w} {ms:.3f} ms" for w, ms in r["ways_median_ms"].items()))
