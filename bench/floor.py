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
faster is taken, so small working sets are not charged for starting threads.
State traffic (a few rows and columns, or the flat second moment) is left
out, so no real step can reach the floor, and none should come out below it.

    python -m bench.floor --values 16777216 --itemsize 4
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .common import summarize, time_steps

TRANSFERS = 4  # read g; read g, read p, write p


def floor_bytes(n_values, itemsize):
    return TRANSFERS * n_values * itemsize


class Floor:
    """The two passes over a gradient and a parameter of ``n_values`` values
    of ``itemsize`` bytes, on one thread or ``threads``."""

    def __init__(self, n_values, itemsize, threads=None):
        self.threads = threads or os.cpu_count() or 1
        # 8-byte words: whole values for every itemsize the step takes.
        words = max(1, -(-n_values * itemsize // 8))
        self.g = np.ones(words, dtype=np.uint64)
        self.p = np.ones(words, dtype=np.uint64)
        bounds = np.linspace(0, words, self.threads + 1).astype(int)
        self.parts = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        self.pool = ThreadPoolExecutor(max_workers=len(self.parts))

    def _passes(self, lo, hi):
        np.add.reduce(self.g[lo:hi])
        np.add(self.p[lo:hi], self.g[lo:hi], out=self.p[lo:hi])

    def one_thread(self):
        self._passes(0, self.g.size)

    def all_threads(self):
        # Pass 1 everywhere, then pass 2: the step's barrier between them.
        list(self.pool.map(lambda b: np.add.reduce(self.g[b[0]:b[1]]), self.parts))
        list(self.pool.map(
            lambda b: np.add(self.p[b[0]:b[1]], self.g[b[0]:b[1]],
                             out=self.p[b[0]:b[1]]), self.parts))

    def close(self):
        self.pool.shutdown()
        self.g = self.p = None


def measure(n_values, itemsize, budget):
    """The floor of a step over ``n_values`` values of ``itemsize`` bytes:
    median and spread (ms) of the faster way, and both ways' medians."""
    f = Floor(n_values, itemsize)
    try:
        ways = {"one_thread": summarize(time_steps(f.one_thread, budget))}
        if len(f.parts) > 1:
            ways[f"{len(f.parts)}_threads"] = summarize(time_steps(f.all_threads, budget))
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
