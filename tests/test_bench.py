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
    "speedup_vs_stock", "peak_memory_bytes", "min_bytes", "gbps",
    "fraction_of_copy_bw", "fraction_of_read_bw",
}
TOP_FIELDS = {
    "machine", "copy_bandwidth_gbps", "read_bandwidth_gbps", "mlx_version", "package_version", "rows",
    "training",
}
MACHINE_FIELDS = {"cpu_model", "logical_cpus", "mlx_version", "package_version",
                  "date_utc"}
MLX_ARMS = {"mlx-stock", "mlx-stock-compiled", "fused", "fused-compiled"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--sets", "tiny",
         "--training", "tiny", "--copy-mb", "32", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_json_has_promised_fields(quick_run):
    out, _ = quick_run
    result = json.loads((out / "results.json").read_text())
    assert TOP_FIELDS <= set(result)
    assert MACHINE_FIELDS <= set(result["machine"])
    assert result["copy_bandwidth_gbps"] > 0
    assert result["read_bandwidth_gbps"] > 0
    for r in result["rows"]:
        want = r["gbps"] * 5 / 6 / result["read_bandwidth_gbps"]
        assert r["fraction_of_read_bw"] == pytest.approx(want), r
    rows = result["rows"]
    assert MLX_ARMS <= {r["arm"] for r in rows}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert ROW_FIELDS <= set(r), sorted(ROW_FIELDS - set(r))
        assert r["set"] == "tiny"
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["min_bytes"] == 6 * r["n_values"] * (4 if r["dtype"] == "float32" else 2)
        if r["arm"] in MLX_ARMS:
            assert r["peak_memory_bytes"] > 0
    stock = [r for r in rows if r["arm"] == "mlx-stock"]
    assert all(r["speedup_vs_stock"] == 1.0 for r in stock)
    training = result["training"]
    assert {r["arm"] for r in training["rows"]} == MLX_ARMS
    assert all(r["steps_per_second"] > 0 for r in training["rows"])


def test_table_written(quick_run):
    out, proc = quick_run
    table = (out / "results.md").read_text()
    assert "| set |" in table and "fused" in table
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
