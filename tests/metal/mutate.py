"""Broken copies of the kernels, to show the gates catch what they guard."""

from pathlib import Path

from emu.build import KERNELS


def mutated(tmp_path, name, old, new, count=1):
    """A copy of kernels/`name` in `tmp_path` with the first `count`
    occurrences of `old` replaced by `new` (which must occur)."""
    text = (KERNELS / name).read_text()
    assert text.count(old) >= count, f"{old!r} not in {name}: update the test"
    out = Path(tmp_path) / name
    out.write_text(text.replace(old, new, count))
    return out


def line_of(name, needle):
    """1-based line of the first line of kernels/`name` containing `needle`."""
    for k, line in enumerate((KERNELS / name).read_text().splitlines(), 1):
        if needle in line:
            return k
    raise AssertionError(f"{needle!r} not in {name}")
