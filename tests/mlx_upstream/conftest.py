"""MLX's own optimizer tests (python/tests/test_optimizers.py and its helper
mlx_tests.py, copied unchanged from MLX's repository; MIT, see LICENSE),
run with `mlx.optimizers.Adafactor` replaced by this package's class: the
drop-in promise, checked by MLX's tests rather than ours.

Deselected (not skipped): test_adamw_matches_pytorch needs PyTorch, which
this project does not depend on, and does not touch Adafactor.
"""

import sys
from pathlib import Path

import mlx.optimizers
import pytest

import mlx_fused_adafactor

sys.path.insert(0, str(Path(__file__).resolve().parent))

DESELECT = {"test_adamw_matches_pytorch"}


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    keep, drop = [], []
    for item in items:
        inside = Path(str(item.fspath)).resolve().parent == here
        (drop if inside and item.name in DESELECT else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def fused_adafactor():
    with mlx_fused_adafactor.patch_mlx():
        assert mlx.optimizers.Adafactor is mlx_fused_adafactor.Adafactor
        yield
