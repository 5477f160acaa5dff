"""The kernels under ThreadSanitizer (a missing barrier is a race report)
and AddressSanitizer (an access past a device buffer is a report), and
broken copies of them that these gates must catch."""

import mlx.core as mx
import pytest

from emu import build, harness, oracle
from mutate import mutated

# Every kernel, small enough for the sanitizers' slowdown: small factored
# and 1-D, several row blocks (40 rows), two column blocks (1100 columns),
# a batch of matrices, two 1-D groups (9001: not a multiple of the
# AF_N_READS elements a thread reads at once).
SHAPES = [(100,), (9001,), (33, 31), (40, 130), (5, 1100), (2, 3, 1000)]


# The shapes that run the kernels of each file, for the broken copies (an
# emulator built from one file has only its kernels).
FILE_SHAPES = {
    "adafactor_factored.metal": [(40, 130), (5, 1100), (2, 3, 1000)],
    "adafactor_flat.metal": [(9001,)],
    "adafactor_small.metal": [(100,), (33, 31)],
}


def problem(shapes=SHAPES):
    mx.random.seed(3)
    params = [mx.random.normal(s) for s in shapes]
    grads = [0.1 * mx.random.normal(s) for s in shapes]
    states = [oracle.init_state(s, True, mx.float32) for s in shapes]
    return params, grads, states, harness.hyper(beta_1=0.9)


def run(exe, shapes=SHAPES):
    params, grads, states, hyper = problem(shapes)
    return harness.run_step(exe, 2, 0.0, params, grads, states, hyper)


def test_file_shapes_cover_every_file():
    assert sorted(FILE_SHAPES) == [f.name for f in build.kernel_files()]


def test_kernels_clean_under_tsan(emu_tsan):
    run(emu_tsan)


def test_kernels_clean_under_asan(emu_asan):
    run(emu_asan)


def test_donated_buffers_clean_under_tsan(emu_tsan):
    params, grads, states, hyper = problem()
    harness.run_step(emu_tsan, 2, 0.0, params, grads, states, hyper, alias=True)


BARRIERS = {
    # Row factors go through threadgroup memory to every thread of the tile.
    "factored_norm": (
        "adafactor_factored.metal",
        "  threadgroup_barrier(mem_flags::mem_threadgroup);\n\n"
        "  // Sum u^2 of the tile",
        "\n\n  // Sum u^2 of the tile",
    ),
    # Row means written by one thread per matrix, read by one per row.
    "small_factored": (
        "adafactor_small.metal",
        "  threadgroup_barrier(mem_flags::mem_device);\n\n"
        "  // Row factors",
        "\n\n  // Row factors",
    ),
}


@pytest.mark.parametrize("case", sorted(BARRIERS))
def test_tsan_reports_a_removed_barrier(tmp_path, case):
    name, old, new = BARRIERS[case]
    src = mutated(tmp_path, name, old, new)
    exe = build.build("tsan", [src])
    run(build.build("tsan", [build.KERNELS / name]), FILE_SHAPES[name])
    with pytest.raises(harness.EmulatorError) as err:
        run(exe, FILE_SHAPES[name])
    assert "ThreadSanitizer: data race" in err.value.stderr
    assert f"{name}:" in err.value.stderr


OFF_BY_ONE = {
    # The last block of a 1-D tensor reads one element past its end.
    "flat_sums": ("adafactor_flat.metal", "if (e < hi) {", "if (e <= hi) {"),
    # The last column of each row reads into the next row, and past the
    # end of the gradient on the last row.
    "factored_sums": ("adafactor_factored.metal", "if (c < C) {",
                      "if (c <= C) {"),
}


@pytest.mark.parametrize("case", sorted(OFF_BY_ONE))
def test_asan_reports_an_off_by_one_bound(tmp_path, case):
    name, old, new = OFF_BY_ONE[case]
    src = mutated(tmp_path, name, old, new)
    exe = build.build("asan", [src])
    run(build.build("asan", [build.KERNELS / name]), FILE_SHAPES[name])
    with pytest.raises(harness.EmulatorError) as err:
        run(exe, FILE_SHAPES[name])
    assert "AddressSanitizer: heap-buffer-overflow" in err.value.stderr
    assert f"{name}:" in err.value.stderr
