"""Fixtures of the Metal kernel tests: the emulator builds, compiled once per
session (and cached across sessions under build/metal-emu)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emu import build  # noqa: E402


@pytest.fixture(scope="session")
def emu_run():
    return build.build("run")


@pytest.fixture(scope="session")
def emu_tsan():
    return build.build("tsan")


@pytest.fixture(scope="session")
def emu_asan():
    return build.build("asan")
