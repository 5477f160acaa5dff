"""The CPU path under AddressSanitizer and UndefinedBehaviorSanitizer
(issue 11 item 2). The `asan` variant (tests/support/variants.py) runs the
CPU tests of MODULES, whole modules but one, and no sanitizer may report
anything.
The gate is shown to catch what it guards: with an out-of-bounds read
planted back through NOTE: [fault switch] (partials_without_rows: a matrix
without rows folds and reads column partials it does not have, the
zero-size crash of issue 11), the run reports a heap-buffer-overflow."""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import variants

# Together the paths of csrc/cpu and the step around them:
MODULES = [
    # factored tensors with the fold and with pass 2 (3, 16385), flat
    # ones, more row blocks than the cap (1031, 4097), row and element sum
    # chunks, batches, momentum and weight decay, non-contiguous inputs
    # (the staging gather), eager and under mx.compile (the lazy primitive,
    # donated inputs)
    "tests/test_parity.py",
    # every zero-size family, narrow and wide
    "tests/test_zero_size.py",
    # bad input, NaN and Inf in every dtype
    "tests/test_errors.py",
    # the thread pool with 1, 2 and 3 threads (subprocesses inherit the
    # sanitizer environment)
    "tests/test_determinism.py",
    # float32/bfloat16/float16 parameters, mixed gradient dtypes
    "tests/test_lowprec.py",
    # the reference backend
    "tests/test_fallback.py",
    # several lazy primitives per dtype group (NOTE: [lazy chunks])
    "tests/test_primitive.py",
    # dtype groups, aliased and held arrays, eager and compiled steps in
    # turn
    "tests/test_api.py",
    # thousands of eager steps, their buffers returned to MLX's allocator
    "tests/clients/test_soak.py::test_memory_flat_over_thousands_of_steps[eager]",
    # the stochastic rounding of the passes (bfloat16 and float16)
    "tests/test_stochastic_rounding.py",
    # the primitive's derivatives (vjp, jvp, vmap from the reference)
    "tests/test_transforms.py",
    # outputs that take over donated inputs, fresh ones from MLX's
    # allocator, huge-page advice (NOTE: [donation], [output buffers]); the
    # resident-memory comparison is left out, ASan's shadow memory is not
    # the step's
    "tests/test_memory.py::test_step_updates_in_place_when_the_caller_lets_go",
    "tests/test_memory.py::test_arrays_the_caller_holds_keep_their_values",
    "tests/test_memory.py::test_nothing_is_retained_once_the_optimizer_is_gone",
    "tests/test_memory.py::test_cache_limit_bounds_what_is_kept",
]
# What the sanitizers print; with halt_on_error the process also exits.
REPORTS = ("ERROR: AddressSanitizer", "runtime error:")
# A small case the planted fault breaks: a (0, 5) parameter alone, so its
# empty regions end the step's scratch.
CASE = "tests/test_zero_size.py::test_zero_size_parameter_matches_stock[(0, 5)-plain-eager]"


@pytest.fixture(scope="module")
def site():
    return variants.build("asan")


def run_asan(site, args, **extra):
    # --capture=sys: a sanitizer writes its report to file descriptor 2 and
    # ends the process, which would lose what pytest captured there.
    return variants.run_pytest("asan", site, ["--capture=sys", *args], **extra)


def reports(run):
    text = run.proc.stdout + run.proc.stderr
    return [line for line in text.splitlines() if any(r in line for r in REPORTS)]


@pytest.fixture(scope="module")
def runs(site):
    """Each module in its own process, two at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(MODULES, pool.map(lambda m: run_asan(site, [m]), MODULES)))


@pytest.mark.parametrize("module", MODULES)
def test_cpu_tests_are_clean_under_sanitizers(runs, module):
    run = runs[module]
    assert not reports(run), run.output()
    assert run.proc.returncode == 0, run.output()
    assert re.search(r"\d+ passed", run.proc.stdout), run.output()


@pytest.mark.parametrize("fault", variants.OUT_OF_BOUNDS_FAULTS)
def test_sanitizers_report_a_planted_out_of_bounds_read(site, fault):
    fault_id = variants.fault_table()[fault]
    clean = run_asan(site, [CASE])
    assert not reports(clean), clean.output()
    assert clean.proc.returncode == 0 and "1 passed" in clean.proc.stdout, clean.output()

    broken = run_asan(site, [CASE], MLX_FUSED_ADAFACTOR_FAULT=fault_id)
    assert broken.imported["faults"][fault] == fault_id
    assert broken.proc.returncode != 0, broken.output()
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in broken.proc.stderr, (
        broken.output())
    # The report points into the CPU step.
    assert "csrc/cpu/" in broken.proc.stderr, broken.output()
