"""Dispatches and bytes of one GPU step of the fused optimizer, from the
launch plan (computed by the emulator with the package's plan code), next to
the same counts for stock ``mlx.optimizers.Adafactor``.

Computed, not timed, so it runs on any platform. Bytes are the loads and
stores the kernels issue as written (repeated loads count each time), not
measured DRAM traffic.

    python tests/metal/plan_summary.py      # GPT-2 small, float32 and bfloat16
"""

import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emu import build, harness  # noqa: E402

# Primitives that make a view of their input: no data moves.
VIEWS = {
    "AsStrided", "Broadcast", "BroadcastAxes", "Depends", "ExpandDims",
    "Flatten", "Reshape", "Squeeze", "StopGradient", "Transpose", "Unflatten",
}


def plan_summary(exe, params_tree, grad_dtype=None, **options):
    """Dispatches and bytes of one GPU step: ``dispatches``, ``bytes_read``,
    ``bytes_written``, ``param_bytes``, ``bytes_per_param_byte``,
    ``tensors``, ``factored_tensors``, ``max_dispatches_per_tensor`` (by
    kind: factored, flat, small) and ``kernels`` (dispatches by kernel).
    Parameters are grouped by dtype pair as the optimizer groups them."""
    hyper = harness.hyper(**options)
    groups = {}
    for _, p in tree_flatten(params_tree):
        groups.setdefault((p.dtype, grad_dtype or p.dtype), []).append(p)
    total = Counter()
    kinds_max, kernels = {}, Counter()
    for (pdt, gdt), leaves in groups.items():
        plan = harness.plan(exe, hyper, [p.shape for p in leaves],
                            harness.dtype_token(pdt), harness.dtype_token(gdt))
        per_tensor, kind = Counter(), {}
        for d in plan["dispatches"]:
            per_tensor[d["tensor"]] += 1
            family = d["kernel"].rsplit("_", 2)[0]
            kernels[family] += 1
            kind[d["tensor"]] = family.split("_")[1]
            for b in d["bindings"]:
                total["bytes_read"] += b["bytes_read"]
                total["bytes_written"] += b["bytes_written"]
        for t, n in per_tensor.items():
            kinds_max[kind[t]] = max(kinds_max.get(kind[t], 0), n)
        total["dispatches"] += len(plan["dispatches"])
    leaves = [p for _, p in tree_flatten(params_tree)]
    param_bytes = sum(p.size * p.itemsize for p in leaves)
    moved = total["bytes_read"] + total["bytes_written"]
    return {
        "dispatches": total["dispatches"],
        "bytes_read": total["bytes_read"],
        "bytes_written": total["bytes_written"],
        "param_bytes": param_bytes,
        "bytes_per_param_byte": moved / param_bytes if param_bytes else 0.0,
        "tensors": len(leaves),
        "factored_tensors": sum(p.ndim >= 2 for p in leaves),
        "max_dispatches_per_tensor": kinds_max,
        "kernels": dict(kernels),
    }


def stock_graph_summary(params_tree, grad_dtype=None, **options):
    """The graph of one step of stock ``mlx.optimizers.Adafactor``, as
    ``mx.export_function`` traces it (after MLX's graph simplification,
    before the fusion of elementwise ops that mx.compile adds): its ``nodes``,
    ``kernel_nodes`` (nodes that are not views) and the bytes each reads and
    writes (views move none). Nothing is evaluated."""
    params = tree_map(lambda p: p, params_tree)
    grads = tree_map(lambda p: mx.zeros(p.shape, grad_dtype or p.dtype), params)
    opt = optim.Adafactor(**options)
    opt.init(params)
    keys = [k for k, _ in tree_flatten((params, grads, opt.state))]
    nodes = []

    def record(entry):
        if entry["type"] == "primitive":
            nodes.append(entry)

    def step(*flat):
        p, g, s = tree_unflatten(list(zip(keys, flat)))
        opt.state = s
        new = opt.apply_gradients(g, p)
        return [a for _, a in tree_flatten((new, opt.state))]

    mx.export_function(record, step, *[a for _, a in tree_flatten(
        (params, grads, opt.state))])

    def nbytes(arrays):
        total = 0
        for _, shape, dtype in arrays:
            n = 1
            for d in shape:
                n *= d
            total += n * mx.zeros((), dtype).itemsize
        return total

    read = sum(nbytes(n["inputs"]) for n in nodes if n["name"] not in VIEWS)
    written = sum(nbytes(n["outputs"]) for n in nodes if n["name"] not in VIEWS)
    param_bytes = sum(p.size * p.itemsize for _, p in tree_flatten(params_tree))
    return {
        "nodes": len(nodes),
        "kernel_nodes": sum(n["name"] not in VIEWS for n in nodes),
        "bytes_read": read,
        "bytes_written": written,
        "param_bytes": param_bytes,
        "bytes_per_param_byte": (read + written) / param_bytes,
        "primitives": dict(Counter(n["name"] for n in nodes)),
    }


def gpt2_small(dtype):
    def z(*s):
        return mx.zeros(s, dtype)

    block = {
        "ln_1": {"weight": z(768), "bias": z(768)},
        "attn": {"c_attn": {"weight": z(768, 2304), "bias": z(2304)},
                 "c_proj": {"weight": z(768, 768), "bias": z(768)}},
        "ln_2": {"weight": z(768), "bias": z(768)},
        "mlp": {"c_fc": {"weight": z(768, 3072), "bias": z(3072)},
                "c_proj": {"weight": z(3072, 768), "bias": z(768)}},
    }
    return {"wte": z(50257, 768), "wpe": z(1024, 768),
            "h": [block] * 12, "ln_f": {"weight": z(768), "bias": z(768)}}


if __name__ == "__main__":
    exe = build.build("run")
    for dtype in (mx.float32, mx.bfloat16):
        ours = plan_summary(exe, gpt2_small(dtype))
        stock = stock_graph_summary(gpt2_small(dtype))
        print(f"GPT-2 small {dtype}: fused {ours['dispatches']} dispatches, "
              f"{ours['bytes_per_param_byte']:.1f}x bytes; stock "
              f"{stock['kernel_nodes']} ops, "
              f"{stock['bytes_per_param_byte']:.1f}x bytes")
