"""The GPU's schedule, not a friendlier one.

MLX encodes on a concurrent compute encoder: the dispatches between two of
its barriers run in any order and at the same time. The emulator encodes
the plan with the package's encode_plan on a model of that encoder
(emu/encoder.h), which places MLX's barriers from the buffers bound as
inputs and outputs, and runs each segment between two barriers reversed,
shuffled and concurrently; the results must be those of encoding order, bit
for bit. A plan that leaves out a dependency is caught; so are a dispatch
over Metal's limits, a kernel that never finishes, and a barrier or
simdgroup function that only part of the threads reach (faulty.metal)."""

import time
from pathlib import Path

import mlx.core as mx
import pytest

from emu import build, harness, oracle

HERE = Path(__file__).resolve().parent

# Every kernel and launch shape (as the self-check, csrc/op/self_check.cpp):
# one threadgroup (0-D, 1-D, 2-D, 3-D), two 1-D threadgroups, a factored
# tile of one block, two row and two column blocks, a batch of matrices.
SHAPES = [(), (33,), (31, 33), (2, 3, 5), (9000,), (8, 1000), (36, 1030),
          (3, 20, 70)]
ORDERS = ["reverse", ("shuffle", 1), ("shuffle", 2), "concurrent"]


def problem(shapes, seed=5, momentum=True):
    mx.random.seed(seed)
    params = [mx.random.normal(s) for s in shapes]
    grads = [0.1 * mx.random.normal(s) for s in shapes]
    states = [oracle.init_state(s, momentum, mx.float32) for s in shapes]
    options = {"beta_1": 0.9, "weight_decay": 0.01} if momentum else {}
    return params, grads, states, harness.hyper(**options)


def run(exe, shapes, step=3, **kw):
    params, grads, states, hyper = problem(shapes)
    return harness.run_step(exe, step, 0.0, params, grads, states, hyper, **kw)


def assert_bitwise(a, b, what):
    for k, (pa, pb) in enumerate(zip(a[0], b[0])):
        assert mx.array_equal(pa, pb, equal_nan=True).item(), f"{what}: param {k}"
        for j, (sa, sb) in enumerate(zip(a[1][k], b[1][k])):
            assert mx.array_equal(sa, sb, equal_nan=True).item(), (
                f"{what}: tensor {k} state {j}")


@pytest.mark.parametrize("alias", [False, True], ids=["separate", "donated"])
def test_every_order_gives_the_encoding_order_results(emu_run, alias):
    want = run(emu_run, SHAPES, alias=alias)
    for order in ORDERS:
        assert_bitwise(run(emu_run, SHAPES, alias=alias, order=order), want,
                       f"order {order}")


def test_concurrent_segments_clean_under_tsan(emu_tsan):
    """Dispatches of one segment at the same time: no two of them touch a
    buffer one of them writes (ThreadSanitizer reports any race)."""
    shapes = [(33,), (31, 33), (9000,), (36, 1030), (3, 20, 70)]
    run(emu_tsan, shapes, alias=True, order="concurrent")


# The 1-D sums dispatch registers what it writes (the new second moment and
# its partial sums) as inputs: MLX would then put no barrier before the
# apply dispatch that reads them.
UNREGISTERED = [("unregister", "adafactor_flat_sums", harness.buffer_index(i))
                for i in ("S0_OUT", "GROUP_PART")]


def test_a_missing_dependency_is_caught(emu_run):
    shapes = [(9000,)]
    hyper = problem(shapes)[3]
    good = harness.plan(emu_run, hyper, shapes)["dispatches"]
    bad = harness.plan(emu_run, hyper, shapes, faults=UNREGISTERED)["dispatches"]
    assert [d["barrier"] for d in good] == [False, True]
    assert [d["barrier"] for d in bad] == [False, False]
    want = run(emu_run, shapes)
    # In encoding order the missing barrier goes unnoticed...
    assert_bitwise(run(emu_run, shapes, faults=UNREGISTERED), want, "plan order")
    # ...run the other way round, the apply dispatch reads unset memory.
    with pytest.raises(AssertionError):
        assert_bitwise(
            run(emu_run, shapes, faults=UNREGISTERED, order="reverse"), want,
            "reversed")


@pytest.mark.parametrize("fault,message", [
    (("group", 2048), "2048 threads per threadgroup"),
    (("bytes", harness.buffer_index("ARGS"), 5000), "set_bytes of 5000 bytes"),
    (("index", harness.buffer_index("U2_PART"), 31), "buffer index 31"),
], ids=["threads", "set_bytes", "buffer_index"])
def test_limits_are_checked_on_every_dispatch(emu_run, fault, message):
    with pytest.raises(harness.EmulatorError) as err:
        run(emu_run, [(36, 1030)], faults=[fault])
    assert message in err.value.stderr
    assert "adafactor_factored_" in err.value.stderr


@pytest.fixture(scope="module")
def emu_faulty():
    return build.build("run", [HERE / "faulty.metal"])


def test_faulty_kernels_run_when_no_fault_is_chosen(emu_faulty):
    params, grads, states, hyper = problem([(33,)], momentum=False)
    new, _ = harness.run_step(emu_faulty, 4, 0.0, params, grads, states, hyper)
    assert mx.array_equal(new[0], params[0]).item()


def test_threadgroup_memory_limit(emu_faulty):
    with pytest.raises(harness.EmulatorError) as err:
        run(emu_faulty, [(31, 33)])
    assert ("adafactor_small_factored_float32_float32: 36864 bytes of "
            "threadgroup memory" in err.value.stderr)


def test_watchdog_names_a_kernel_that_never_finishes(emu_faulty):
    start = time.monotonic()
    with pytest.raises(harness.EmulatorError) as err:
        run(emu_faulty, [(33,)], step=1, env={"EMU_WATCHDOG_SECONDS": "2"},
            timeout=120)
    assert time.monotonic() - start < 60
    assert ("watchdog: adafactor_small_flat_float32_float32 did not finish "
            "within 2 s" in err.value.stderr)


@pytest.mark.parametrize("step,unit,sites", [
    (2, "lane", ["simd_sum at", "threadgroup_barrier at"]),
    (3, "thread", ["threadgroup_barrier at", "the end of the kernel"]),
], ids=["simd_sum", "threadgroup_barrier"])
def test_partial_participation_is_reported(emu_faulty, step, unit, sites):
    with pytest.raises(harness.EmulatorError) as err:
        run(emu_faulty, [(33,)], step=step, timeout=120)
    report = err.value.stderr
    assert "adafactor_small_flat_float32_float32 threadgroup (0, 0, 0)" in report
    assert f"not every {unit} reached the same point" in report
    for s in sites:
        assert s in report
    assert "faulty.metal:" in report
