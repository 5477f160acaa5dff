"""The safety net (NOTE: [self-check], NOTE: [backend]): the first fused
step of a process on a device checks the fused kernels against the
reference implementation; when they fail, one warning says what failed and
how to report it, and every step on that device runs the reference, with
the parameters it gives; with `fused` forced, the step raises and changes
nothing. `python -m mlx_fused_adafactor.check` reports the same.

There is no GPU here: the kernels under test are the CPU path's, broken by
the planted faults of a test build (NOTE: [fault switch],
tests/support/variants.py). The self-check is the same C++ function on a
Mac's GPU."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_fused_adafactor._build import ext
from support import variants

HERE = Path(__file__).resolve().parent
DEVICE = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"

# The planted faults the self-check must catch. The others change results
# by a rounding (update_rounded_early, combine_order_by_threads), below any
# tolerance a check against a differently rounded reference can use; the
# CPU tests catch them with data made for them.
CAUGHT = ["drop_last_column", "row_mean_over_columns", "flat_without_eps1",
          "no_clipping", "fold_weights_by_cf"]


def test_self_check_passes_here():
    st = ext.device_status(DEVICE)
    assert st["ready"] and st["path"] in ("cpu", "metal-metallib", "metal-jit")
    check = st["self_check"]
    assert check["passed"], check["failure"]
    # Every (parameter, gradient) dtype pair with momentum, the three equal
    # pairs without it, and stochastic rounding in float16 and bfloat16.
    assert check["cases"] == 14 and check["outputs"] > 300
    assert 0 < check["max_error_vs_tolerance"] <= 1
    # Asked again, the first answer: the check ran once.
    assert ext.device_status(DEVICE)["self_check"] == check


def test_tolerances_are_those_of_the_kernel_tests():
    sys.path.insert(0, str(HERE / "metal"))
    import test_metal_kernels as kernels

    tol = ext.self_check_tolerances()
    for dtype, value in kernels.REL_TOL.items():
        assert tol[str(dtype).split(".")[-1]] == value
    assert tol["state"] == kernels.STATE_REL_TOL


# One process of the fault build: two threads take their first steps at
# the same time (the check runs once), then the results are compared with
# the reference backend's, bit for bit.
SCRIPT = r"""
import json, sys, threading, warnings
import mlx.core as mx
import mlx_fused_adafactor as m
from afhelpers import flat, grad_seq, max_abs, max_err, rand
from mlx_fused_adafactor import Adafactor

params = {"w": rand((40, 70), 1), "b": rand((70,), 2), "s": rand((), 3)}
grads = [{k: grad_seq(v.shape, 1, 10 * i + j)[0] for j, (k, v) in
          enumerate(params.items())} for i in range(3)]
mx.eval(params, grads)

def train(opt, out, key):
    # MLX's streams belong to the thread that made them.
    with mx.stream(mx.new_stream(mx.default_device())):
        p = params
        for g in grads:
            p = opt.apply_gradients(g, p)
            mx.eval(p, opt.state)
    out[key] = (p, opt.state)

out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    threads = [threading.Thread(target=train, args=(Adafactor(beta_1=0.9), out, k))
               for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
with m.backend("reference"):
    train(Adafactor(beta_1=0.9), out, "reference")
ref = flat(out["reference"])
# Largest error relative to the largest value, over every array.
errors = [max(max_err(flat(out[k])[n], ref[n]) / max(max_abs(ref[n]), 1e-30)
              for n in ref) for k in range(2)]
print(json.dumps({
    "warnings": [str(w.message) for w in caught
                 if "[adafactor]" in str(w.message)],
    "errors": errors,
    "status": m._ext.device_status(sys.argv[1]),
}))
"""


@pytest.fixture(scope="module")
def faults_site():
    return variants.build("faults")


def fault_env(site, fault, **extra):
    """The environment of a process of the fault build with `fault` (a
    name of _ext.faults, or None for none) planted."""
    faults = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, mlx_fused_adafactor as m; "
         "print(json.dumps(m._ext.faults))"],
        env=variants.env("faults", site), capture_output=True, text=True,
        check=True).stdout)
    return variants.env("faults", site,
                        MLX_FUSED_ADAFACTOR_FAULT=faults[fault] if fault else 0,
                        **extra)


def run_fault(site, fault):
    return subprocess.run([sys.executable, "-c", SCRIPT, DEVICE],
                          env=fault_env(site, fault), capture_output=True,
                          text=True)


@pytest.mark.parametrize("fault", CAUGHT)
def test_a_failing_kernel_gives_one_warning_and_the_reference(
        faults_site, fault):
    proc = run_fault(faults_site, fault)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert len(out["warnings"]) == 1, out["warnings"]
    warning = out["warnings"][0]
    assert f"the fused kernels on the {DEVICE} failed their self-check" in warning
    assert "for the rest of the process" in warning
    assert "python -m mlx_fused_adafactor.check --json" in warning
    # Both racing threads got the reference's parameters and state.
    assert out["errors"] == [0.0, 0.0]
    st = out["status"]
    assert not st["ready"] and st["failed"]
    assert not st["self_check"]["passed"] and st["self_check"]["failure"]


def test_the_unbroken_fault_build_passes(faults_site):
    proc = run_fault(faults_site, None)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["warnings"] == []
    assert out["status"]["ready"] and out["status"]["self_check"]["passed"]
    # The fused step, not the reference: close to it, not equal.
    assert all(0 < e < 1e-6 for e in out["errors"]), out["errors"]


FORCED = r"""
import mlx.core as mx
from afhelpers import assert_unchanged, rand, snapshot
from mlx_fused_adafactor import Adafactor

params = {"w": rand((40, 70), 1), "b": rand((70,), 2)}
opt = Adafactor(beta_1=0.9)
opt.init(params)
snap = snapshot(params, opt)
try:
    opt.apply_gradients({k: 0.1 * v for k, v in params.items()}, params)
except RuntimeError as e:
    assert_unchanged(snap, params, opt)
    print(e)
else:
    raise SystemExit("no error")
"""


def test_with_fused_forced_a_failing_kernel_raises_and_changes_nothing(
        faults_site):
    env = fault_env(faults_site, "row_mean_over_columns",
                    MLX_FUSED_ADAFACTOR_BACKEND="fused")
    proc = subprocess.run([sys.executable, "-c", FORCED], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "[adafactor] MLX_FUSED_ADAFACTOR_BACKEND=fused, but the fused " \
        "kernels" in proc.stdout
    assert "failed their self-check" in proc.stdout


@pytest.mark.parametrize("fault", [None, "no_clipping"])
def test_check_reports_and_exits(faults_site, fault):
    env = fault_env(faults_site, fault)
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_fused_adafactor.check", "--json",
         "--no-timing"], env=env, capture_output=True, text=True)
    out = json.loads(proc.stdout)
    for key in ("backend", "mlx_version", "device", "self_check", "max_error"):
        assert key in out
    assert out["device"] == DEVICE and out["mlx_version"] == mx.__version__
    if fault:
        assert proc.returncode == 1
        assert out["self_check"] == "failed" and out["backend"] == "reference"
        assert "failed their self-check" in out["reason"]
    else:
        assert proc.returncode == 0
        assert out["self_check"] == "passed"
        assert out["backend"] == ext.device_status(DEVICE)["path"]
        assert 0 < out["max_error"] < 0.01


def test_check_text_report_with_timing():
    proc = subprocess.run([sys.executable, "-m", "mlx_fused_adafactor.check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = ext.device_status(DEVICE)["path"]
    assert f"default device: {DEVICE}" in proc.stdout
    assert f"path: {path} (" in proc.stdout
    assert "self-check: passed (14 steps against the reference" in proc.stdout
    assert f"float32 parameters on the {DEVICE}:" in proc.stdout
    assert "timing: failed" not in proc.stdout
