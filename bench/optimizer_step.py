"""How long does one optimizer step take, per parameter set, dtype, device
and arm, and how close is it to the memory-bandwidth limit?

A step is memory-bound. The least a step can move is three reads of the
gradient, two of the parameter and one write of the parameter, 6 bytes per
value per byte of element size (2-byte elements for bfloat16); optimizer
state traffic is not counted, so this floor is below what any real
implementation moves. ``gbps`` is that floor divided by the median step
time, and ``fraction_of_copy_bw`` (filled in by the caller) divides it by the
copy bandwidth measured in the same run.

Peak memory is ``mx.get_peak_memory()`` over one arm's setup and steps: the
parameters, gradients and state that are live plus the step's temporaries
(``peak_memory_above_inputs_bytes`` leaves out what was allocated before the
arm started). PyTorch allocates outside MLX, so its arms report none.

    python -m bench.optimizer_step --sets matrix-1024 --quick
"""

import mlx.core as mx

from . import arms as arms_mod
from . import sets as sets_mod
from .common import dtype_name, device_name, release_memory, summarize, time_steps

MIN_READS_GRAD, MIN_READS_PARAM, MIN_WRITES_PARAM = 3, 2, 1
MIN_READS = MIN_READS_GRAD + MIN_READS_PARAM


def min_bytes(n_values, dtype):
    per_value = MIN_READS + MIN_WRITES_PARAM
    return per_value * n_values * dtype.size


def _time_arm(arm, params, grads, budget):
    release_memory()
    mx.reset_peak_memory()
    active_before = mx.get_active_memory()
    arm.prepare(params, grads)
    times = time_steps(arm.step, budget)
    done = arm.steps_done()
    if done != budget.warmup + len(times):
        raise RuntimeError(
            f"bench: arm {arm.name} counted {done} steps after "
            f"{budget.warmup + len(times)} calls; its step does not update "
            "the optimizer state."
        )
    peak = mx.get_peak_memory()
    arm.close()
    release_memory()
    row = summarize(times)
    if isinstance(arm, arms_mod.MlxArm):
        row["peak_memory_bytes"] = int(peak)
        row["peak_memory_above_inputs_bytes"] = int(peak - active_before)
    else:
        row["peak_memory_bytes"] = None
        row["peak_memory_above_inputs_bytes"] = None
    return row


def _add_ratios(rows):
    """Speedups of every row over the baselines measured beside it."""
    by_arm = {r["arm"]: r["median_ms"] for r in rows}
    torch_ms = [by_arm[a] for a in arms_mod.TORCH_ARMS if a in by_arm]
    for r in rows:
        ms = r["median_ms"]
        for key, base in (
            ("speedup_vs_stock", by_arm.get("mlx-stock")),
            ("speedup_vs_stock_compiled", by_arm.get("mlx-stock-compiled")),
            ("speedup_vs_best_torch", min(torch_ms) if torch_ms else None),
        ):
            r[key] = base / ms if base is not None else None


def cells(set_list, dtypes, devices, arm_names):
    """The (device, set, dtype, arm) runs, in the order they are timed."""
    out = []
    for device in devices:
        for key, _, _ in set_list:
            for dtype in dtypes:
                for arm in arm_names:
                    if arm in arms_mod.TORCH_ARMS and device != mx.cpu:
                        continue
                    out.append((device, key, dtype, arm))
    return out


def run(set_list, dtypes, devices, arm_names, budget, progress, on_group=None):
    """Time every cell; return the rows (without bandwidth fractions).
    ``on_group(rows)`` is called with the rows so far after each (device,
    set, dtype) group."""
    rows = []
    default = mx.default_device()
    todo = cells(set_list, dtypes, devices, arm_names)
    try:
        for device in devices:
            mx.set_default_device(device)
            for key, label, shapes in set_list:
                n_values = sets_mod.num_values(shapes)
                for dtype in dtypes:
                    names = [c[3] for c in todo if c[:3] == (device, key, dtype)]
                    if not names:
                        continue
                    params, grads = sets_mod.build(shapes, dtype)
                    group = []
                    for name in names:
                        progress.label(f"{key} {dtype_name(dtype)} "
                                       f"{device_name(device)} {name}")
                        row = {
                            "arm": name,
                            "set": key,
                            "set_label": label,
                            "dtype": dtype_name(dtype),
                            "device": device_name(device),
                            "device_is_default": device == default,
                            "n_tensors": len(shapes),
                            "n_values": n_values,
                            "min_bytes": min_bytes(n_values, dtype),
                        }
                        row.update(_time_arm(arms_mod.make(name), params, grads, budget))
                        row["gbps"] = row["min_bytes"] / (row["median_ms"] * 1e-3) / 1e9
                        group.append(row)
                        progress.advance()
                    _add_ratios(group)
                    rows.extend(group)
                    if on_group is not None:
                        on_group(rows)
                    del params, grads
                    release_memory()
    finally:
        mx.set_default_device(default)
    return rows


if __name__ == "__main__":
    import argparse

    from .common import DEFAULT_BUDGET, QUICK_BUDGET, Progress

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="matrix-1024")
    ap.add_argument("--arms", default=",".join(arms_mod.MLX_ARMS))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    set_list = sets_mod.resolve(a.sets.split(","), sets_mod.SWEEP_SIZES)
    arm_names = a.arms.split(",")
    devices = [mx.default_device()]
    progress = Progress(len(cells(set_list, [mx.float32], devices, arm_names)), "step")
    rows = run(set_list, [mx.float32], devices, arm_names,
               QUICK_BUDGET if a.quick else DEFAULT_BUDGET, progress)
    progress.close()
    for r in rows:
        ratio = r["speedup_vs_stock"]
        vs_stock = f"  x{ratio:.2f} vs stock" if ratio is not None else ""
        print(f"{r['set']:>12} {r['arm']:>20} {r['median_ms']:9.3f} ms "
              f"{r['gbps']:6.2f} GB/s{vs_stock}")
