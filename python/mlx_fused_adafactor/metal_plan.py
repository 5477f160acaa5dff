"""Dispatches and bytes of one GPU step, from the Metal launch plan, and the
same counts for stock ``mlx.optimizers.Adafactor`` under ``mx.compile``.

The plan is the one the Metal host encodes (csrc/metal_plan.cpp); it is
computed on any platform, so these numbers need no GPU. Bytes are what the
kernels load from and store to device memory as written (repeated loads of
the same data count each time), not measured DRAM traffic.
"""

from collections import Counter
from typing import Optional

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ._build import ext

_OPTIONS = dict(
    eps=(1e-30, 1e-3),
    clip_threshold=1.0,
    decay_rate=-0.8,
    beta_1=None,
    weight_decay=0.0,
    scale_parameter=True,
    relative_step=True,
    warmup_init=False,
)


def _dtype_token(dtype):
    return str(dtype).split(".")[-1]


def _hyper(options):
    o = dict(_OPTIONS)
    o.update({k: v for k, v in options.items() if k != "learning_rate"})
    flags = 0
    flags |= ext.SCALE_PARAMETER if o["scale_parameter"] else 0
    flags |= ext.RELATIVE_STEP if o["relative_step"] else 0
    flags |= ext.WARMUP_INIT if o["warmup_init"] else 0
    flags |= ext.MOMENTUM if o["beta_1"] is not None else 0
    flags |= ext.WEIGHT_DECAY if o["weight_decay"] != 0 else 0
    b1 = 0.0 if o["beta_1"] is None else float(o["beta_1"])
    return (o["eps"][0], o["eps"][1], o["clip_threshold"], o["decay_rate"],
            b1, 1.0 - b1, o["weight_decay"], flags)


def launch_plans(params_tree, grad_dtype: Optional[mx.Dtype] = None, **options):
    """The launch plan of each primitive of one step: parameters are grouped
    by (parameter dtype, gradient dtype) as the optimizer groups them.
    Leaves need only ``shape`` and ``dtype``. Returns a list of
    (leaf paths, plan dict)."""
    groups = {}
    for path, p in tree_flatten(params_tree):
        gdt = grad_dtype or p.dtype
        groups.setdefault((p.dtype, gdt), []).append((path, p))
    hyper = _hyper(options)
    plans = []
    for (pdt, gdt), leaves in groups.items():
        plan = ext.metal_plan(
            [list(p.shape) for _, p in leaves],
            [_dtype_token(pdt)] * len(leaves),
            [_dtype_token(gdt)] * len(leaves),
            [mx.zeros((), pdt).itemsize] * len(leaves),
            [mx.zeros((), gdt).itemsize] * len(leaves),
            *hyper,
        )
        plans.append(([path for path, _ in leaves], plan))
    return plans


def plan_summary(params_tree, grad_dtype: Optional[mx.Dtype] = None,
                 **options) -> dict:
    """Dispatches and bytes of one GPU step of the fused optimizer.

    Keys: ``dispatches``, ``bytes_read``, ``bytes_written``, ``param_bytes``
    (the parameters' own size), ``bytes_per_param_byte`` ((read + written)
    / param_bytes), ``tensors``, ``factored_tensors``,
    ``max_dispatches_per_tensor`` (by kind: factored, flat, small) and
    ``kernels`` (dispatch count by kernel)."""
    summary = Counter()
    per_tensor = Counter()
    kind_max = {}
    kernels = Counter()
    param_bytes = 0
    tensors = factored = 0
    for paths, plan in launch_plans(params_tree, grad_dtype, **options):
        counts = Counter()
        for d in plan["dispatches"]:
            counts[d["tensor"]] += 1
            name = d["kernel"].rsplit("_", 2)[0]
            kernels[name] += 1
            for b in d["bindings"]:
                summary["bytes_read"] += b["bytes_read"]
                summary["bytes_written"] += b["bytes_written"]
        kinds = {}
        for d in plan["dispatches"]:
            name = d["kernel"]
            kinds[d["tensor"]] = (
                "small" if "_small_" in name
                else "factored" if "_factored_" in name else "flat")
        for t, n in counts.items():
            kind_max[kinds[t]] = max(kind_max.get(kinds[t], 0), n)
        summary["dispatches"] += len(plan["dispatches"])
        per_tensor.update(counts)
        tensors += len(paths)
    flat = dict(tree_flatten(params_tree))
    for p in flat.values():
        n = 1
        for s in p.shape:
            n *= s
        param_bytes += n * mx.zeros((), p.dtype).itemsize
        factored += len(p.shape) >= 2
    moved = summary["bytes_read"] + summary["bytes_written"]
    return {
        "dispatches": summary["dispatches"],
        "bytes_read": summary["bytes_read"],
        "bytes_written": summary["bytes_written"],
        "param_bytes": param_bytes,
        "bytes_per_param_byte": moved / param_bytes if param_bytes else 0.0,
        "tensors": tensors,
        "factored_tensors": factored,
        "max_dispatches_per_tensor": kind_max,
        "kernels": dict(kernels),
    }


def stock_graph_summary(params_tree, grad_dtype: Optional[mx.Dtype] = None,
                        **options) -> dict:
    """The graph of one step of stock ``mlx.optimizers.Adafactor`` under
    ``mx.compile`` for the same tree: its nodes (after compile's
    simplification and fusion on the default device) and the bytes each
    reads and writes (inputs plus outputs; views such as broadcasts and
    reshapes move none). Nothing is evaluated: leaves may be lazy.

    Keys: ``nodes``, ``kernel_nodes`` (nodes that are not views),
    ``bytes_read``, ``bytes_written``, ``param_bytes``,
    ``bytes_per_param_byte``, ``primitives`` (node count by primitive)."""
    params = tree_map(lambda p: p, params_tree)
    grads = tree_map(
        lambda p: mx.zeros(p.shape, grad_dtype or p.dtype), params_tree)
    opt = optim.Adafactor(**options)
    opt.init(params)
    state = opt.state

    def step(params, grads, state):
        opt.state = state
        new = opt.apply_gradients(grads, params)
        return new, opt.state

    inputs = [a for _, a in tree_flatten((params, grads, state))]
    outputs = [a for _, a in tree_flatten(mx.compile(step)(params, grads, state))]
    nodes = ext.graph_nodes(outputs, inputs)
    read = sum(r for _, r, _ in nodes)
    written = sum(w for _, _, w in nodes)
    param_bytes = sum(p.nbytes for _, p in tree_flatten(params_tree))
    views = sum(1 for _, r, w in nodes if r == 0 and w == 0)
    return {
        "nodes": len(nodes),
        "kernel_nodes": len(nodes) - views,
        "bytes_read": read,
        "bytes_written": written,
        "param_bytes": param_bytes,
        "bytes_per_param_byte": (read + written) / param_bytes
        if param_bytes else 0.0,
        "primitives": dict(Counter(name for name, _, _ in nodes)),
    }
