"""The launch plan (csrc/metal_plan.cpp) on its own: geometry, bindings
against the kernels' declarations, scratch layout, and the dispatch and
byte counts of python/mlx_fused_adafactor/metal_plan.py against stock MLX
Adafactor under mx.compile."""

import subprocess

import mlx.core as mx
import pytest

from emu import harness, oracle
from mlx_fused_adafactor._build import ext
from mlx_fused_adafactor.metal_plan import plan_summary, stock_graph_summary

SHAPES = [
    (), (1,), (33,), (4096,), (4097,), (100000,), (1, 1), (1, 4097),
    (4097, 1), (64, 64), (65, 65), (1025, 33), (50257, 768), (768, 50257),
    (100000, 8), (3, 40, 70), (2, 2, 33, 65), (0, 5), (5, 0),
]
DTYPES = ["float32", "float16", "bfloat16"]
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def plan(shapes, pt="float32", gt="float32", **options):
    return ext.metal_plan(
        [list(s) for s in shapes], [pt] * len(shapes), [gt] * len(shapes),
        [ITEMSIZE[pt]] * len(shapes), [ITEMSIZE[gt]] * len(shapes),
        *harness.hyper_args(**options))


@pytest.fixture(scope="module")
def declared(emu_run):
    """Buffer indices each kernel of the emulator build declares."""
    out = subprocess.run([str(emu_run), "--list"], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[0]: set(map(int, line.split()[1:]))
            for line in out.splitlines()}


@pytest.mark.parametrize("momentum", [False, True])
def test_bindings_match_declared_buffers(declared, momentum):
    beta_1 = 0.9 if momentum else None
    for pt in DTYPES:
        for gt in DTYPES:
            for d in plan(SHAPES, pt, gt, beta_1=beta_1)["dispatches"]:
                assert d["kernel"] in declared, d["kernel"]
                got = [b["index"] for b in d["bindings"]]
                assert len(got) == len(set(got)), d["kernel"]
                assert set(got) == declared[d["kernel"]], d["kernel"]


def test_host_plan_equals_the_plan_from_shapes():
    """eval_gpu describes the primitive's inputs itself (describe_inputs);
    its plan is the one of the shapes and dtypes."""
    shapes = [(33,), (5000,), (40, 130), (2, 3, 1000)]
    hyper = harness.hyper_args(beta_1=0.9)
    params = [mx.zeros(s, mx.bfloat16) for s in shapes]
    grads = [mx.zeros(s, mx.float32) for s in shapes]
    states = [oracle.init_state(s, True, mx.bfloat16) for s in shapes]
    inputs, _ = harness.slot_arrays(
        mx.array(1.0), mx.array(0.0), params, grads, states)
    assert ext.metal_plan_for_inputs(inputs, *hyper) == plan(
        shapes, "bfloat16", "float32", beta_1=0.9)


def test_grids_cover_every_element_once():
    tg = ext.THREADS_PER_GROUP
    p = plan(SHAPES)
    by_tensor = {}
    for d in p["dispatches"]:
        assert d["group"] == (tg, 1, 1)
        by_tensor.setdefault(d["tensor"], []).append(d)
    for t, shape in enumerate(SHAPES):
        n = 1
        for s in shape:
            n *= s
        ds = by_tensor[t]
        kinds = [d["kernel"].rsplit("_", 2)[0] for d in ds]
        if n <= ext.SMALL_LIMIT:
            assert kinds == ["adafactor_small_" + (
                "factored" if len(shape) >= 2 else "flat")]
            assert ds[0]["grid"] == (1, 1, 1)
            continue
        args = next(b["bytes"] for b in ds[0]["bindings"] if b["index"] == 3)
        (n_, batch, rows, cols, row_block, nrb, ncb, groups) = [
            int.from_bytes(args[4 * k:4 * k + 4], "little", signed=True)
            for k in range(8)]
        assert n_ == n
        if len(shape) >= 2:
            assert kinds == ["adafactor_factored_sums", "adafactor_factored_norm",
                             "adafactor_factored_apply"]
            assert (rows, cols) == shape[-2:] and batch * rows * cols == n
            assert all(d["grid"] == (ncb, nrb, batch) for d in ds)
            assert groups == ncb * nrb * batch
            # Tiles cover the matrix exactly: no tile is empty.
            assert (nrb - 1) * row_block < rows <= nrb * row_block
            assert (ncb - 1) * 1024 < cols <= ncb * 1024
            assert row_block <= 2048 and nrb <= max(64, -(-rows // 2048))
        else:
            assert kinds == ["adafactor_flat_sums", "adafactor_flat_apply"]
            assert all(d["grid"] == (groups, 1, 1) for d in ds)
            assert (groups - 1) * 8192 < n <= groups * 8192


def test_scratch_regions_are_disjoint_and_in_bounds():
    p = plan(SHAPES, beta_1=0.9)
    regions = set()
    for d in p["dispatches"]:
        for b in d["bindings"]:
            if b["source"] == "scratch":
                assert b["offset"] % 256 == 0
                assert b["offset"] + b["size"] <= p["scratch_bytes"]
                regions.add((b["offset"], b["size"]))
    spans = sorted(regions)
    for (o1, s1), (o2, _) in zip(spans, spans[1:]):
        assert o1 + s1 <= o2


def test_large_factored_tensor_moves_about_six_times_its_bytes():
    # Three passes (NOTE: [three passes]): p and g, then g, then p and g in
    # and p out; everything else is the row/column statistics.
    shape = (4096, 4096)
    p = plan([shape])
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


def gpt2_small(dtype):
    def z(*s):
        return mx.zeros(s, dtype)

    block = {
        "ln_1": {"weight": z(768), "bias": z(768)},
        "attn": {"c_attn": {"weight": z(768, 2304), "bias": z(2304)},
                 "c_proj": {"weight": z(768, 768), "bias": z(768)}},
        "ln_2": {"weight": z(768), "bias": z(768)},
        "mlp": {"c_fc": {"weight": z(768, 3072), "bias": z(3072)},
                "c_proj": {"weight": z(3072, 768), "bias": z(768)}},
    }
    return {"wte": z(50257, 768), "wpe": z(1024, 768),
            "h": [block] * 12, "ln_f": {"weight": z(768), "bias": z(768)}}


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16],
                         ids=["float32", "bfloat16"])
def test_gpt2_small_dispatches_and_bytes_against_stock(dtype):
    tree = gpt2_small(dtype)
    ours = plan_summary(tree)
    stock = stock_graph_summary(tree)
    for s in (ours, stock):
        assert s["param_bytes"] == 124439808 * mx.zeros((), dtype).itemsize
    assert ours["tensors"] == 148 and ours["factored_tensors"] == 50
    assert ours["max_dispatches_per_tensor"]["factored"] <= 3
    assert ours["dispatches"] <= 3 * ours["factored_tensors"] + 2 * (
        ours["tensors"] - ours["factored_tensors"])
    assert ours["bytes_per_param_byte"] <= 6.5
    # Stock's compiled graph: more nodes than our dispatches and more bytes.
    assert stock["kernel_nodes"] > 4 * ours["dispatches"]
    assert stock["bytes_per_param_byte"] > 2 * ours["bytes_per_param_byte"]


def test_momentum_adds_the_first_moment_traffic():
    tree = {"w": mx.zeros((1024, 1024))}
    a = plan_summary(tree)
    b = plan_summary(tree, beta_1=0.9)
    assert b["dispatches"] == a["dispatches"]
    moved = lambda s: s["bytes_read"] + s["bytes_written"]  # noqa: E731
    assert moved(b) - moved(a) == 2 * 4 * 1024 * 1024
