"""The benchmark runs and reports what it promises. Timings are measured by
the benchmark, never asserted here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ROW_FIELDS = {
    "arm", "set", "dtype", "device", "median_ms", "p20_ms", "p80_ms",
    "speedup_vs_stock", "peak_memory_bytes", "gbps", "floor_ms", "floor_bytes",
    "x_floor", "rss_after_step_bytes", "rss_above_start_bytes",
}
TOP_FIELDS = {
    "machine", "mlx_version", "package_version", "rows", "training",
    "floor_definition",
}
MACHINE_FIELDS = {"cpu_model", "logical_cpus", "mlx_version", "package_version",
                  "date_utc"}
MLX_ARMS = {"mlx-stock", "mlx-stock-compiled", "fused", "fused-compiled"}
LOW_PRECISION_ARMS = {"fused-sr"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--sets", "tiny",
         "--training", "tiny", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_json_has_promised_fields(quick_run):
    out, _ = quick_run
    result = json.loads((out / "results.json").read_text())
    assert TOP_FIELDS <= set(result)
    assert MACHINE_FIELDS <= set(result["machine"])
    rows = result["rows"]
    assert MLX_ARMS | LOW_PRECISION_ARMS <= {r["arm"] for r in rows}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert ROW_FIELDS <= set(r), sorted(ROW_FIELDS - set(r))
        assert r["set"] == "tiny"
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        # The floor: four transfers of the set's values, timed beside the row.
        itemsize = 4 if r["dtype"] == "float32" else 2
        assert r["floor_bytes"] == 4 * r["n_values"] * itemsize
        assert r["floor_ms"] > 0
        assert r["x_floor"] == pytest.approx(r["median_ms"] / r["floor_ms"])
        assert r["gbps"] == pytest.approx(r["floor_bytes"] / r["median_ms"] / 1e6)
        # No step moves less than its floor.
        assert r["x_floor"] > 1, r
        assert r["rss_after_step_bytes"] > 0
        if r["arm"] in MLX_ARMS | LOW_PRECISION_ARMS:
            assert r["peak_memory_bytes"] > 0
        if r["arm"] in LOW_PRECISION_ARMS:
            assert r["dtype"] != "float32"
            assert r["x_fused"] > 0
    stock = [r for r in rows if r["arm"] == "mlx-stock"]
    assert all(r["speedup_vs_stock"] == 1.0 for r in stock)
    (training,) = result["training"]
    assert training["name"] == "tiny"
    arms = {r["arm"]: r for r in training["rows"]}
    assert set(arms) == MLX_ARMS | {"forward-backward"}
    assert all(r["steps_per_second"] > 0 for r in training["rows"])
    for arm in ("mlx-stock", "fused"):
        assert 0 <= arms[arm]["optimizer_share"] < 1


def test_table_written(quick_run):
    out, proc = quick_run
    table = (out / "results.md").read_text()
    assert "| set |" in table and "fused" in table and "x floor" in table
    assert "One optimizer step" in proc.stdout


def test_plot_written(quick_run):
    # matplotlib is in the test extra, so the plot is always expected.
    out, _ = quick_run
    assert (out / "results.png").stat().st_size > 0


@pytest.mark.parametrize("arm", sorted(MLX_ARMS))
def test_arm_step_updates_parameters_and_state(arm):
    import mlx.core as mx
    import numpy as np

    from bench import arms, sets

    params, grads = sets.build(sets.tiny(), mx.float32)
    runner = arms.make(arm)
    runner.prepare(params, grads)
    snapshots = []
    for _ in range(2):
        runner.step()
        snapshots.append((np.array(runner.params["w"]),
                          np.array(runner.opt.state["w"]["exp_avg_sq_row"])))
    assert runner.steps_done() == 2
    assert not np.array_equal(snapshots[0][0], np.array(params["w"]))
    assert not np.array_equal(snapshots[0][0], snapshots[1][0])
    assert not np.array_equal(snapshots[0][1], snapshots[1][1])
