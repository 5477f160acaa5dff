"""The CPU tests catch a broken kernel (STYLE.md: a guard is shown to catch
what it guards). The `faults` variant (tests/support/variants.py) plants
the faults of csrc/cpu/faults.h behind NOTE: [fault switch]; the CPU tests
of SUBSET run in it once unbroken, where they must pass, and once per fault,
where at least one must fail. The faults that read out of bounds are shown
caught by tests/test_sanitizers_cpu.py instead."""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import variants

# Every fault fails at least one of these: parity (float32, every shape
# family and option), low precision (update_rounded_early shows only there),
# the reference backend, and the determinism test across thread counts (its
# subprocesses run with 1, 2 and 3 threads; combine_order_by_threads shows
# only there). Last, so that the faults the others catch stop early.
SUBSET = [
    "tests/test_parity.py",
    "tests/test_lowprec.py",
    "tests/test_fallback.py",
    "tests/test_determinism.py::test_thread_count_does_not_change_results",
]
# Faults of the step around the kernels, each with the test that guards it.
TARGETED = {
    # apply_leaves keeps the GIL while the step evaluates its inputs.
    "step_holds_gil": ["tests/test_gil.py"],
    # Outputs never take over an input's buffer (NOTE: [donation]).
    "no_donation": [
        "tests/test_memory.py::test_step_updates_in_place_when_the_caller_lets_go"],
    # An input gives its buffer while the caller still holds it.
    "donate_held": [
        "tests/test_memory.py::test_arrays_the_caller_holds_keep_their_values"],
}
FAULTS = {name: fault for name, fault in variants.fault_table().items()
          if name not in variants.OUT_OF_BOUNDS_FAULTS}


@pytest.fixture(scope="module")
def runs():
    """The unbroken run (all of SUBSET) and one per fault (up to its first
    failure), two at a time."""
    site = variants.build("faults")
    jobs = {"unbroken": 0, **FAULTS}

    def run(name):
        if jobs[name] == 0:
            args = SUBSET + [t for tests in TARGETED.values() for t in tests]
        else:
            args = ["-x", *TARGETED.get(name, SUBSET)]
        # The self-check would catch most faults and fall back to the
        # reference; these tests must see the faulty kernels themselves.
        return variants.run_pytest("faults", site, args,
                                   MLX_FUSED_ADAFACTOR_FAULT=jobs[name],
                                   MLX_FUSED_ADAFACTOR_SELF_CHECK="off")

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(jobs, pool.map(run, jobs)))


def test_the_variant_plants_every_fault_of_the_enum(runs):
    table = variants.fault_table()
    assert runs["unbroken"].imported["faults"] == table
    assert set(variants.OUT_OF_BOUNDS_FAULTS) <= set(table)


def test_unbroken_variant_passes(runs):
    run = runs["unbroken"]
    assert run.proc.returncode == 0, run.output()
    assert re.search(r"\d+ passed", run.proc.stdout), run.output()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_fails_a_cpu_test(runs, fault):
    # A test failed (exit code 1), not the process (a crash, a collection
    # error).
    run = runs[fault]
    assert run.proc.returncode == 1, run.output()
    assert re.search(r"\b1 failed", run.proc.stdout), run.output()
