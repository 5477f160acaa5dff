"""The launch plan (csrc/metal/plan.cpp) on its own, as the emulator
computes it with the package's code: geometry, bindings against the kernels'
declarations, their access, the scratch layout, and the dispatch and byte
counts of plan_summary.py against stock MLX Adafactor."""

import subprocess

import mlx.core as mx
import pytest

from emu import harness
from plan_summary import gpt2_small, plan_summary, stock_graph_summary

SHAPES = [
    (), (1,), (33,), (4096,), (4097,), (100000,), (1, 1), (1, 4097),
    (4097, 1), (64, 64), (65, 65), (1025, 33), (50257, 768), (768, 50257),
    (100000, 8), (3, 40, 70), (2, 2, 33, 65), (0, 5), (5, 0),
]
DTYPES = ["float32", "float16", "bfloat16"]
THREADS_PER_GROUP = 256
SMALL_LIMIT = 4096


def plan(exe, shapes, pt="float32", gt="float32", **options):
    return harness.plan(exe, harness.hyper(**options), shapes, pt, gt)


@pytest.fixture(scope="module")
def declared(emu_run):
    """Buffer indices each kernel of the emulator build declares."""
    out = subprocess.run([str(emu_run), "--list"], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[0]: set(map(int, line.split()[1:]))
            for line in out.splitlines()}


@pytest.mark.parametrize("momentum", [False, True])
def test_bindings_match_declared_buffers(emu_run, declared, momentum):
    beta_1 = 0.9 if momentum else None
    for pt in DTYPES:
        for gt in DTYPES:
            for d in plan(emu_run, SHAPES, pt, gt, beta_1=beta_1)["dispatches"]:
                assert d["kernel"] in declared, d["kernel"]
                got = [b["index"] for b in d["bindings"]]
                assert len(got) == len(set(got)), d["kernel"]
                assert set(got) == declared[d["kernel"]], d["kernel"]


def test_access_agrees_with_traffic(emu_run):
    """A binding the kernel writes through is bound for writing, and one it
    only reads is not: what the host registers with MLX's encoder (which
    orders the dispatches) matches what the kernels do. By-value arguments
    and inputs of the primitive are only read."""
    for d in plan(emu_run, SHAPES, beta_1=0.9)["dispatches"]:
        for b in d["bindings"]:
            what = f"{d['kernel']} buffer {b['index']}"
            writes = b["access"] in ("write", "read_write")
            if b["source"] in ("input", "bytes"):
                assert not writes and b["bytes_written"] == 0, what
            elif b["bytes_written"] > 0:
                assert writes, what
            elif b["bytes_read"] > 0:
                assert b["access"] == "read", what


def test_grids_cover_every_element_once(emu_run):
    p = plan(emu_run, SHAPES)
    by_tensor = {}
    for d in p["dispatches"]:
        assert d["group"] == [THREADS_PER_GROUP, 1, 1]
        by_tensor.setdefault(d["tensor"], []).append(d)
    for t, shape in enumerate(SHAPES):
        n = 1
        for s in shape:
            n *= s
        ds = by_tensor[t]
        kinds = [d["kernel"].rsplit("_", 2)[0] for d in ds]
        if n <= SMALL_LIMIT:
            assert kinds == ["adafactor_small_" + (
                "factored" if len(shape) >= 2 else "flat")]
            assert ds[0]["grid"] == [1, 1, 1]
            continue
        args = bytes.fromhex(
            next(b["bytes"] for b in ds[0]["bindings"] if b["index"] == 3))
        (n_, batch, rows, cols, row_block, nrb, ncb, groups) = [
            int.from_bytes(args[4 * k:4 * k + 4], "little", signed=True)
            for k in range(8)]
        assert n_ == n
        if len(shape) >= 2:
            assert kinds == ["adafactor_factored_sums", "adafactor_factored_norm",
                             "adafactor_factored_apply"]
            assert (rows, cols) == shape[-2:] and batch * rows * cols == n
            assert all(d["grid"] == [ncb, nrb, batch] for d in ds)
            assert groups == ncb * nrb * batch
            # Tiles cover the matrix exactly: no tile is empty.
            assert (nrb - 1) * row_block < rows <= nrb * row_block
            assert (ncb - 1) * 1024 < cols <= ncb * 1024
            assert row_block <= 2048 and nrb <= max(64, -(-rows // 2048))
        else:
            assert kinds == ["adafactor_flat_sums", "adafactor_flat_apply"]
            assert all(d["grid"] == [groups, 1, 1] for d in ds)
            assert (groups - 1) * 8192 < n <= groups * 8192


def test_scratch_regions_are_disjoint_and_in_bounds(emu_run):
    """Each tensor that needs scratch has a buffer of its own (NOTE:
    [encoding order]); its regions are aligned, disjoint and inside it."""
    p = plan(emu_run, SHAPES, beta_1=0.9)
    assert sum(p["scratch"]) == p["scratch_bytes"]
    regions, owner = {}, {}
    for d in p["dispatches"]:
        for b in d["bindings"]:
            if b["source"] == "scratch":
                buf = b["array"]
                assert owner.setdefault(buf, d["tensor"]) == d["tensor"]
                assert b["offset"] % 256 == 0
                assert b["offset"] + b["size"] <= p["scratch"][buf]
                regions.setdefault(buf, set()).add((b["offset"], b["size"]))
    assert sorted(regions) == list(range(len(p["scratch"])))
    for spans in regions.values():
        spans = sorted(spans)
        for (o1, s1), (o2, _) in zip(spans, spans[1:]):
            assert o1 + s1 <= o2


@pytest.mark.parametrize("momentum", [False, True])
def test_mlx_puts_one_barrier_between_phases(emu_run, momentum):
    """NOTE: [encoding order]: dispatches are encoded by phase, and MLX's
    encoder (as the emulator models it from the bindings encode_plan
    makes) separates the phases by one barrier each and nothing else."""
    p = plan(emu_run, SHAPES, beta_1=0.9 if momentum else None)
    phase, seen = [], {}
    for d in p["dispatches"]:
        seen[d["tensor"]] = seen.get(d["tensor"], -1) + 1
        phase.append(seen[d["tensor"]])
    assert phase == sorted(phase), "dispatches are not encoded by phase"
    barriers = [d["barrier"] for d in p["dispatches"]]
    starts = [k > 0 and phase[k] != phase[k - 1] for k in range(len(phase))]
    assert barriers == starts
    assert sum(barriers) == 2


def test_large_factored_tensor_moves_about_six_times_its_bytes(emu_run):
    # Three passes (NOTE: [three passes]): p and g, then g, then p and g in
    # and p out; everything else is the row/column statistics.
    shape = (4096, 4096)
    p = plan(emu_run, [shape])
    n = shape[0] * shape[1]
    io = {}
    for d in p["dispatches"]:
        for b in d["bindings"]:
            if b["source"] in ("input", "output") and b["array"] in (2, 3, 0):
                key = (b["source"], b["array"])
                io[key] = io.get(key, 0) + b["bytes_read"] + b["bytes_written"]
    assert io[("input", 2)] == 2 * 4 * n  # param read twice
    assert io[("input", 3)] == 3 * 4 * n  # gradient read three times
    assert io[("output", 0)] == 4 * n  # param written once
    total = sum(b["bytes_read"] + b["bytes_written"]
                for d in p["dispatches"] for b in d["bindings"])
    assert 6 * 4 * n <= total <= 6.2 * 4 * n


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16],
                         ids=["float32", "bfloat16"])
def test_gpt2_small_dispatches_and_bytes_against_stock(emu_run, dtype):
    tree = gpt2_small(dtype)
    ours = plan_summary(emu_run, tree)
    stock = stock_graph_summary(tree)
    for s in (ours, stock):
        assert s["param_bytes"] == 124439808 * mx.zeros((), dtype).itemsize
    assert ours["tensors"] == 148 and ours["factored_tensors"] == 50
    assert ours["max_dispatches_per_tensor"]["factored"] <= 3
    assert ours["dispatches"] <= 3 * ours["factored_tensors"] + 2 * (
        ours["tensors"] - ours["factored_tensors"])
    assert ours["bytes_per_param_byte"] <= 6.5
    # Stock's graph: more ops than our dispatches and more bytes.
    assert stock["kernel_nodes"] > 4 * ours["dispatches"]
    assert stock["bytes_per_param_byte"] > 2 * ours["bytes_per_param_byte"]


def test_momentum_adds_the_first_moment_traffic(emu_run):
    tree = {"w": mx.zeros((1024, 1024))}
    a = plan_summary(emu_run, tree)
    b = plan_summary(emu_run, tree, beta_1=0.9)
    assert b["dispatches"] == a["dispatches"]
    moved = lambda s: s["bytes_read"] + s["bytes_written"]  # noqa: E731
    assert moved(b) - moved(a) == 2 * 4 * 1024 * 1024
