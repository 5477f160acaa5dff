"""The unchanged kernels/*.metal, run through the launch plan on the CPU
emulation of Metal, against the CPU primitive, stock MLX Adafactor and a
float64 reference."""

import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from emu import build, harness, oracle

# Sizes around the kernels' edges: 1, a simdgroup (32) and one off, the
# small-tensor limit (4096) and past it, rows and columns of one, several
# row blocks (1025 rows), several column blocks (1100 columns), 3-D, 4-D.
SHAPES = [
    (1,), (31,), (32,), (33,), (1023,), (1025,), (4099,), (9000,),
    (1, 33), (33, 1), (33, 31), (1, 4099), (4099, 1), (1025, 33),
    (5, 1100), (3, 40, 70), (2, 3, 5, 7), (2, 2, 33, 65),
]

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
# Largest difference from the CPU primitive, relative to the value plus the
# tensor's RMS (an update is small next to the parameter it changes): both
# compute in float32 and differ in the order of their sums only, so 16-bit
# results may round one unit apart.
REL_TOL = {F32: 4e-6, F16: 2.0**-10, BF16: 2.0**-7}
STATE_REL_TOL = 1e-5

MODES = {
    "default": {},
    "momentum_weight_decay": {"beta_1": 0.9, "weight_decay": 0.01},
    "learning_rate_unscaled": {
        "relative_step": False, "learning_rate": 0.01, "scale_parameter": False,
    },
    "warmup_init_clip": {"warmup_init": True, "clip_threshold": 0.05},
}


def hyper_of(options):
    return harness.hyper(**options)


def make_problem(pdtype, gdtype, options, seed=0, shapes=SHAPES):
    mx.random.seed(seed)
    momentum = options.get("beta_1") is not None
    params = [mx.random.normal(s).astype(pdtype) for s in shapes]
    grads = [
        [(0.1 * mx.random.normal(s)).astype(gdtype) for s in shapes]
        for _ in range(2)
    ]
    states = [oracle.init_state(s, momentum, pdtype) for s in shapes]
    return params, grads, states


def assert_close(got, want, rel, what):
    got = np.array(got.astype(mx.float32), dtype=np.float64)
    want = np.array(want.astype(mx.float32), dtype=np.float64)
    assert got.shape == want.shape, what
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    rms = np.sqrt(np.mean(want * want)) if want.size else 0.0
    tol = rel * (np.abs(want) + rms) + 1e-12
    bad = np.abs(got - want) > tol
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} differ; worst "
        f"{np.max(np.abs(got - want) / tol):.3g} x tolerance"
    )


def run_both(exe, pdtype, gdtype, options):
    """Two steps on the emulator and on the CPU primitive, each on its own
    trajectory; compares after every step."""
    params, grads, states = make_problem(pdtype, gdtype, options)
    hyper = hyper_of(options)
    lr = options.get("learning_rate", 0.0)
    ep, es = params, states
    cp, cs = params, states
    for step in (1, 2):
        ep, es = harness.run_step(exe, step, lr, ep, grads[step - 1], es, hyper)
        cp, cs = oracle.cpu_step(step, lr, cp, grads[step - 1], cs, hyper)
        for k, shape in enumerate(SHAPES):
            what = f"step {step} {shape}"
            assert_close(ep[k], cp[k], REL_TOL[pdtype], what + " param")
            for j, (a, b) in enumerate(zip(es[k], cs[k])):
                rel = STATE_REL_TOL if a.dtype == F32 else REL_TOL[pdtype]
                assert_close(a, b, rel, what + f" state {j}")
    return ep, es


@pytest.mark.parametrize(
    "pdtype,gdtype",
    [(F32, F32), (F16, F16), (BF16, BF16), (BF16, F32)],
    ids=["float32", "float16", "bfloat16", "bfloat16-float32"],
)
def test_matches_cpu_primitive(emu_run, pdtype, gdtype):
    run_both(emu_run, pdtype, gdtype, MODES["momentum_weight_decay"]
             if gdtype != pdtype else MODES["default"])


@pytest.mark.parametrize("mode", [m for m in MODES if m != "default"])
def test_modes_match_cpu_and_stock(emu_run, mode):
    options = MODES[mode]
    ep, es = run_both(emu_run, F32, F32, options)
    # Stock MLX Adafactor on the same float32 problem.
    params, grads, _ = make_problem(F32, F32, options)
    opt = oracle.stock_optimizer(options)
    tree = {f"t{k}": p for k, p in enumerate(params)}
    for step in (0, 1):
        tree = opt.apply_gradients(
            {f"t{k}": g for k, g in enumerate(grads[step])}, tree)
    keys = ["exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"]
    for k, shape in enumerate(SHAPES):
        assert_close(ep[k], tree[f"t{k}"], 2e-5, f"{shape} param vs stock")
        stock_state = [opt.state[f"t{k}"][n] for n in keys
                       if n in opt.state[f"t{k}"]]
        for j, (a, b) in enumerate(zip(es[k], stock_state)):
            assert_close(a, b, 2e-5, f"{shape} state {j} vs stock")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_low_precision_error_within_stock(emu_run, dtype):
    """Against float64, the kernels' error is at most stock MLX Adafactor's
    error in that dtype (plus one unit of the dtype's rounding)."""
    options = MODES["momentum_weight_decay"]
    params, grads, states = make_problem(dtype, dtype, options, seed=1)
    hyper = hyper_of(options)
    ep, es = params, states
    opt = oracle.stock_optimizer(options)
    tree = {f"t{k}": p for k, p in enumerate(params)}
    ref = [np.array(p.astype(F32), np.float64) for p in params]
    ref_state = [[np.zeros(s.shape) for s in st] for st in states]
    for step in (1, 2):
        g = grads[step - 1]
        ep, es = harness.run_step(emu_run, step, 0.0, ep, g, es, hyper)
        tree = opt.apply_gradients({f"t{k}": x for k, x in enumerate(g)}, tree)
        for k in range(len(SHAPES)):
            ref[k], ref_state[k] = oracle.ref64_step(
                step, 0.0, ref[k], np.array(g[k].astype(F32), np.float64),
                ref_state[k], **options)
    for k, shape in enumerate(SHAPES):
        ours = np.abs(np.array(ep[k].astype(F32), np.float64) - ref[k]).max()
        stock = np.abs(
            np.array(tree[f"t{k}"].astype(F32), np.float64) - ref[k]).max()
        # Stock overflows in float16 on long sums (its error is then NaN).
        stock = np.inf if not np.isfinite(stock) else stock
        unit = REL_TOL[dtype] * np.abs(ref[k]).max()
        assert np.isfinite(ours), f"{shape}: non-finite result"
        assert ours <= stock + unit, f"{shape}: {ours:.3g} > stock {stock:.3g}"


def test_donated_buffers_and_determinism(emu_run):
    """Outputs that the plan lets take their input's buffer (as MLX donates
    them) give bitwise the results of separate buffers."""
    options = MODES["momentum_weight_decay"]
    params, grads, states = make_problem(F32, F32, options, seed=2)
    hyper = hyper_of(options)
    a = harness.run_step(emu_run, 3, 0.0, params, grads[0], states, hyper)
    b = harness.run_step(emu_run, 3, 0.0, params, grads[0], states, hyper,
                         alias=True)
    for k in range(len(SHAPES)):
        assert mx.array_equal(a[0][k], b[0][k]).item(), SHAPES[k]
        for x, y in zip(a[1][k], b[1][k]):
            assert mx.array_equal(x, y).item(), SHAPES[k]


def test_bfloat16_conversions_are_the_cpu_paths(tmp_path):
    """NOTE: [bfloat16 storage]: the kernels round to bfloat16 exactly as
    the CPU path (and so MLX's own bfloat16_t) does."""
    exe = tmp_path / "bf16_check"
    subprocess.run(
        [build.cxx(), "-O1", "-std=c++17", f"-I{build.KERNELS}",
         f"-I{build.CSRC}", str(Path(__file__).parent / "cpp" / "bf16_check.cpp"),
         "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and "mismatches: 0" in out.stdout, out.stdout


# NOTE: [stochastic rounding]: on 1-D tensors with a fixed learning rate, no
# parameter scaling and a clip threshold the update never reaches, every
# element's float32 result is elementwise math of its own inputs, the same
# on both paths; the kernels then store bitwise what the CPU path stores.
SR_OPTIONS = {"stochastic_rounding": True, "beta_1": 0.9, "relative_step": False,
              "learning_rate": 1e-3, "scale_parameter": False,
              "clip_threshold": 1e30}
SR_SHAPES = [(1,), (33,), (1025,), (4099,), (9000,), (20000,)]


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_stochastic_rounding_bitwise_the_cpu_paths(emu_run, dtype):
    params, grads, states = make_problem(dtype, dtype, SR_OPTIONS, seed=4,
                                         shapes=SR_SHAPES)
    hyper = hyper_of(SR_OPTIONS)
    ep, es = harness.run_step(emu_run, 3, 1e-3, params, grads[0], states, hyper)
    cp, cs = oracle.cpu_step(3, 1e-3, params, grads[0], states, hyper)
    nearest = oracle.cpu_step(3, 1e-3, params, grads[0], states,
                              hyper_of({**SR_OPTIONS, "stochastic_rounding": False}))
    moved = 0
    for k, shape in enumerate(SR_SHAPES):
        for a, b, what in [(ep[k], cp[k], "param"), (es[k][-1], cs[k][-1], "exp_avg")]:
            assert mx.array_equal(a.view(mx.uint16), b.view(mx.uint16)).item(), (
                f"{shape} {what}")
        moved += int(mx.sum(ep[k] != nearest[0][k]).item())
    # Rounded stochastically, not to nearest.
    assert moved > 0


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_stochastic_rounding_on_every_kernel_matches_cpu(emu_run, dtype):
    """Every shape of SHAPES (every kernel and launch shape): results within
    the tolerances of the other modes (their float32 values differ by the
    order of sums, so a rounding may land one unit apart)."""
    options = {"stochastic_rounding": True, "beta_1": 0.9, "weight_decay": 0.01}
    run_both(emu_run, dtype, dtype, options)
