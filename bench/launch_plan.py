"""What would one GPU step launch? The Metal launch plan's dispatch and byte
counts for each parameter set, next to the node and byte counts of stock
MLX Adafactor's graph.

Computed, not timed, so it runs on any platform; it needs
``mlx_fused_adafactor.metal_plan`` and reports "not available" without it.
Parameter trees are built from unevaluated ``mx.zeros`` (shape and dtype
only), so no memory is allocated.

    python -m bench.launch_plan --sets gpt2
"""

import mlx.core as mx

from . import sets as sets_mod
from .optimizer_step import min_bytes
from .common import dtype_name


# Tracing stock's step takes ~40 s for 10 000 tensors on the reference machine.
STOCK_TRACE_MAX_TENSORS = 2000


def _call(fn, tree):
    """``fn(tree)`` as a dict, or ``{"error": ...}`` when this build of the
    package cannot compute it."""
    try:
        return dict(fn(tree))
    except Exception as e:  # noqa: BLE001 - report any failure of the plan code
        return {"error": f"{type(e).__name__}: {e}"}


def run(set_list, dtypes):
    """One row per (set, dtype), or ``None`` when the plan is not available."""
    try:
        from mlx_fused_adafactor import metal_plan
    except ImportError:
        return None
    rows = []
    for key, _, shapes in set_list:
        for dtype in dtypes:
            tree = {name: mx.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
            plan = _call(metal_plan.plan_summary, tree)
            if dtype == dtypes[0] or len(shapes) <= STOCK_TRACE_MAX_TENSORS:
                stock = _call(metal_plan.stock_graph_summary, tree)
            else:
                stock = {"error": f"stock graph traced in {dtype_name(dtypes[0])} "
                         f"only for sets of more than {STOCK_TRACE_MAX_TENSORS} "
                         "tensors (the trace takes about a minute)"}
            rows.append({
                "set": key,
                "dtype": dtype_name(dtype),
                "fused_dispatches": plan.get("dispatches"),
                "fused_bytes_read": plan.get("bytes_read"),
                "fused_bytes_written": plan.get("bytes_written"),
                "stock_nodes": stock.get("nodes"),
                "stock_kernel_nodes": stock.get("kernel_nodes"),
                "stock_bytes_read": stock.get("bytes_read"),
                "stock_bytes_written": stock.get("bytes_written"),
                "param_bytes": plan.get("param_bytes", stock.get("param_bytes")),
                "min_bytes": min_bytes(sets_mod.num_values(shapes), dtype),
                "fused_error": plan.get("error"),
                "stock_error": stock.get("error"),
            })
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="gpt2")
    a = ap.parse_args()
    result = run(sets_mod.resolve(a.sets.split(","), sets_mod.SWEEP_SIZES),
                 [mx.float32, mx.bfloat16])
    if result is None:
        print("Metal launch plan: not available (mlx_fused_adafactor.metal_plan is missing)")
    else:
        for r in result:
            print(r)
