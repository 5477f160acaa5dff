"""clang -fsyntax-only on the kernels with Metal's address spaces as
distinct clang address spaces: what Apple's compiler rejects for mixing
them (or for double, virtual, exceptions) is an error here too, and errors
name the .metal line."""

import pytest

from emu import build
from mutate import line_of, mutated


def test_the_kernel_source_that_ships_passes_the_lint():
    proc = build.lint_text(build.kernel_source())
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("source", build.kernel_files(), ids=lambda p: p.name)
def test_each_kernel_file_passes_the_lint_alone(source):
    proc = build.lint(source)
    assert proc.returncode == 0, proc.stderr


BROKEN = {
    # A device pointer where threadgroup memory is expected.
    "device_as_threadgroup": (
        "adafactor_flat.metal",
        "p2 = block_sum(p2, tmp, simd_lane, simd_gid);",
        "p2 = block_sum(p2, group_part, simd_lane, simd_gid);",
        "address space",
    ),
    # A device pointer taken as a thread (generic) pointer.
    "device_as_thread": (
        "adafactor_small.metal",
        "const int n = args.n;",
        "const int n = args.n; const float* q = row_old; (void)q;",
        "with an lvalue of type 'device float const *'",
    ),
    "double": (
        "adafactor_flat.metal",
        "float p2 = 0.0f;",
        "double p2 = 0.0f;",
        "__metal_has_no_double",
    ),
    "virtual": (
        "adafactor_small.metal",
        "// A 1-D (or 0-D) tensor.",
        "struct Base { virtual float f(); };",
        "__metal_has_no_virtual_functions",
    ),
    "exceptions": (
        "adafactor_small.metal",
        "const int n = args.n;",
        "const int n = args.n; if (n < 0) throw 1;",
        "exceptions",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_lint_rejects(tmp_path, case):
    name, old, new, message = BROKEN[case]
    src = mutated(tmp_path, name, old, new)
    proc = build.lint(src, include_dirs=[build.KERNELS])
    assert proc.returncode != 0, f"the lint accepted {case}"
    assert message in proc.stderr
    # The error is reported at the changed line of the .metal copy.
    assert f"{src}:{line_of(name, old)}:" in proc.stderr, proc.stderr


def test_run_mode_errors_name_the_metal_line(tmp_path):
    name = "adafactor_flat.metal"
    old = "const int hi = min(args.n, lo + AF_FLAT_BLOCK);"
    src = mutated(tmp_path, name, old, old + " undeclared_name += 1;")
    with pytest.raises(RuntimeError) as err:
        build.build("run", [src])
    assert f"{src}:{line_of(name, old)}:" in str(err.value)
