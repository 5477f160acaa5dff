"""How long does one optimizer step take, per parameter set, dtype, device
and arm, how far is it from the least time its memory traffic can take, and
how much memory does it hold?

Each (set, dtype) group first times its floor (bench/floor.py: one read of
the gradient, then a read of the gradient and the parameter and a write of
the parameter, with numpy at the set's own size), then every arm. A row's
``x_floor`` is its median over the floor's median; ``gbps`` is the floor's
bytes over the row's median.

Memory per arm: ``peak_memory_bytes`` is ``mx.get_peak_memory()`` over the
arm's setup and steps (the live parameters, gradients and state plus the
step's temporaries; ``peak_memory_above_inputs_bytes`` leaves out what was
allocated before the arm started); ``rss_after_step_bytes`` is the
process's resident memory after the last timed step, with the parameters
and state alive (``rss_above_start_bytes``: above the resident memory just
before the arm, after MLX's cache was cleared and freed heap memory
returned). PyTorch allocates outside MLX, so its arms report no MLX peak.

    python -m bench.optimizer_step --sets matrix-1024 --quick
"""

import mlx.core as mx

from . import arms as arms_mod
from . import floor as floor_mod
from . import sets as sets_mod
from .common import (dtype_name, device_name, release_memory, resident_bytes,
                     summarize, time_steps)

def _time_arm(arm, params, grads, budget):
    release_memory()
    mx.reset_peak_memory()
    active_before = mx.get_active_memory()
    rss_before = resident_bytes()
    arm.prepare(params, grads)
    times = time_steps(arm.step, budget)
    rss_after = resident_bytes()
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
    row["rss_after_step_bytes"] = rss_after
    row["rss_above_start_bytes"] = (
        rss_after - rss_before if rss_after is not None else None)
    if isinstance(arm, arms_mod.MlxArm):
        row["peak_memory_bytes"] = int(peak)
        row["peak_memory_above_inputs_bytes"] = int(peak - active_before)
    else:
        row["peak_memory_bytes"] = None
        row["peak_memory_above_inputs_bytes"] = None
    return row


def _add_ratios(rows, floor):
    """Speedups of every row over the baselines measured beside it, and its
    multiple of the floor."""
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
        r["floor_ms"] = floor["median_ms"]
        r["floor_p20_ms"] = floor["p20_ms"]
        r["floor_p80_ms"] = floor["p80_ms"]
        r["floor_way"] = floor["way"]
        r["floor_bytes"] = floor["bytes"]
        r["x_floor"] = ms / floor["median_ms"]
        r["gbps"] = floor["bytes"] / (ms * 1e-3) / 1e9
    fused = by_arm.get("fused")
    for r in rows:
        r["x_fused"] = r["median_ms"] / fused if fused else None


def cells(set_list, dtypes, devices, arm_names):
    """The (device, set, dtype, arm) runs, in the order they are timed."""
    out = []
    for device in devices:
        for key, _, _ in set_list:
            for dtype in dtypes:
                for arm in arm_names:
                    if arm in arms_mod.TORCH_ARMS and device != mx.cpu:
                        continue
                    if arm in arms_mod.LOW_PRECISION_ARMS and dtype == mx.float32:
                        continue
                    out.append((device, key, dtype, arm))
    return out


def run(set_list, dtypes, devices, arm_names, budget, progress, on_group=None):
    """Time every cell and each group's floor; return the rows.
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
                    progress.label(f"{key} {dtype_name(dtype)} floor")
                    floor = floor_mod.measure(n_values, dtype.size, budget)
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
                        }
                        row.update(_time_arm(arms_mod.make(name), params, grads, budget))
                        group.append(row)
                        progress.advance()
                    _add_ratios(group, floor)
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
              f"{r['x_floor']:6.2f} x floor{vs_stock}")
