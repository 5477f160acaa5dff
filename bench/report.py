"""Write what the benchmark measured: a markdown table, a JSON file and a
PNG plot."""

import json

from .arms import ALL_ARMS, TORCH_SETTINGS

ARM_LABELS = {
    "mlx-stock": "stock",
    "mlx-stock-compiled": "stock compiled",
    "fused": "fused",
    "fused-compiled": "fused compiled",
    "torch-loop": "torch loop",
    "torch-foreach": "torch foreach",
}

MIN_BYTES_NOTE = (
    "Minimal bytes per step = values x element size x 6 (three reads of the "
    "gradient, two of the parameter, one write of the parameter; 2-byte "
    "elements for bfloat16). Optimizer state traffic is not counted, so the "
    "fraction of copy bandwidth is an upper bound on how close a step is to "
    "the limit. The fraction of read bandwidth counts only the five minimal "
    "reads, at the read bandwidth measured in the same run: a step that "
    "reached 100% would be reading all the time, with its write free."
)

MEMORY_NOTE = (
    "Peak MB is MLX's allocator peak (mx.get_peak_memory) during one arm: the "
    "live parameters, gradients and state plus the step's temporaries; not "
    "measured for PyTorch."
)

TORCH_NOTE = (
    "PyTorch: torch.optim.Adafactor(lr={lr}, beta2_decay={beta2_decay}, "
    "eps={eps}, d={d}, weight_decay={weight_decay}), the settings closest to "
    "MLX's defaults (relative step min(1e-2, 1/sqrt(t)), decay_rate -0.8, "
    "clip_threshold 1, parameter scaling). Differences: PyTorch clamps the "
    "variance at eps[0]^2 (machine epsilon of the dtype) where MLX adds "
    "1e-30 to g^2, and keeps its state in the parameter dtype."
).format(**TORCH_SETTINGS)


def _ms(x):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.3f}"


def _x(r):
    return "-" if r is None else f"x{r:.2f}"


def _pct(f):
    return "-" if f is None else f"{100 * f:.0f}%"


def _mb(b):
    if b is None:
        return "-"
    mb = b / 2**20
    return f"{mb:.0f}" if mb >= 10 else f"{mb:.2f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _groups(rows):
    """Rows grouped by (device, set, dtype), in measuring order."""
    out = {}
    for r in rows:
        out.setdefault((r["device"], r["set"], r["dtype"]), {})[r["arm"]] = r
    return out


def summary_table(result):
    """Median ms per arm for each set and dtype, and the fused step's ratios."""
    arms = [a for a in ALL_ARMS if any(r["arm"] == a for r in result["rows"])]
    devices = {r["device"] for r in result["rows"]}
    header = (["set", "dtype"] + (["device"] if len(devices) > 1 else [])
              + [ARM_LABELS[a] + " ms" for a in arms]
              + ["fused vs stock", "vs stock compiled", "vs best torch",
                 "fused GB/s", "fused % of copy BW", "fused % of read BW"])
    body = []
    for (device, _, dtype), by_arm in _groups(result["rows"]).items():
        any_row = next(iter(by_arm.values()))
        fused = by_arm.get("fused")
        line = [any_row["set_label"], dtype] + ([device] if len(devices) > 1 else [])
        line += [_ms(by_arm[a]["median_ms"]) if a in by_arm else "-" for a in arms]
        if fused:
            line += [_x(fused["speedup_vs_stock"]), _x(fused["speedup_vs_stock_compiled"]),
                     _x(fused["speedup_vs_best_torch"]), f"{fused['gbps']:.1f}",
                     _pct(fused["fraction_of_copy_bw"]), _pct(fused["fraction_of_read_bw"])]
        else:
            line += ["-"] * 6
        body.append(line)
    return _table(header, body)


def full_table(result):
    header = ["set", "dtype", "device", "arm", "median ms", "p20-p80 ms",
              "vs stock", "vs stock compiled", "peak MB", "GB/s", "% copy BW",
              "% read BW"]
    body = [[r["set"], r["dtype"], r["device"], ARM_LABELS[r["arm"]], _ms(r["median_ms"]),
             f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}", _x(r["speedup_vs_stock"]),
             _x(r["speedup_vs_stock_compiled"]), _mb(r["peak_memory_bytes"]),
             f"{r['gbps']:.2f}", _pct(r["fraction_of_copy_bw"]),
             _pct(r["fraction_of_read_bw"])]
            for r in result["rows"]]
    return _table(header, body)


def training_table(training):
    header = ["arm", "steps/s", "ms/step", "p20-p80 ms", "vs stock", "vs stock compiled"]
    body = [[ARM_LABELS[r["arm"]], f"{r['steps_per_second']:.2f}", _ms(r["median_ms"]),
             f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}", _x(r["speedup_vs_stock"]),
             _x(r["speedup_vs_stock_compiled"])] for r in training["rows"]]
    return _table(header, body)


def machine_line(result):
    m = result["machine"]
    mem = f", {m['memory_bytes'] / 2**30:.0f} GiB RAM" if m.get("memory_bytes") else ""
    torch = f", torch {result['torch_version']}" if result.get("torch_version") else ""
    return (f"{m['cpu_model']}, {m['logical_cpus']} cores ({m['machine']}){mem}; "
            f"MLX {m['mlx_version']} ({m['default_device']}), mlx-fused-adafactor "
            f"{m['package_version']} ({m['package_threads']} threads){torch}; "
            f"{m['date_utc']}, commit {m['git_commit']}")


def markdown(result, plot_name):
    bw = result["copy_bandwidth"]
    methods = ", ".join(f"{k} {v:.1f}" for k, v in bw["gbps"].items())
    reads = ", ".join(f"{k} {v:.1f}" for k, v in bw["read_gbps"].items())
    parts = [
        "# Adafactor step benchmark",
        "",
        f"Machine: {machine_line(result)}.",
        "",
        f"Copy bandwidth (read + write, measured in this run): "
        f"**{result['copy_bandwidth_gbps']:.1f} GB/s** (best of {methods} GB/s; "
        f"{bw['buffer_bytes'] / 2**20:.0f} MiB buffers).",
        "",
        f"Read bandwidth (measured in this run): "
        f"**{result['read_bandwidth_gbps']:.1f} GB/s** (best of {reads} GB/s).",
        "",
        f"Timing: {result['budget']['warmup']} warm-up steps, then at least "
        f"{result['budget']['min_reps']} timed steps (more while under "
        f"{result['budget']['seconds']} s); median and 20th/80th percentile; "
        "`mx.eval(params, opt.state)` after every MLX step. Speedups are ratios "
        "of medians measured in the same run.",
        "",
        "## One optimizer step (median ms)",
        "",
        summary_table(result),
        "",
    ]
    if plot_name:
        parts += [f"![time per step and fraction of copy bandwidth]({plot_name})", ""]
    if result.get("training"):
        t = result["training"]
        c = t["config"]
        parts += [
            "## End to end: training loop",
            "",
            f"Causal transformer: layers {c['layers']}, width {c['dims']}, "
            f"heads {c['heads']}, vocabulary {c['vocab']}, batch {c['batch']} x "
            f"{c['seq']} tokens, {t['n_params'] / 1e6:.2f}M float32 parameters; "
            "forward, backward and optimizer step per step.",
            "",
            training_table(t),
            "",
        ]
    parts += ["## All measurements", "", full_table(result), "", MIN_BYTES_NOTE, "", MEMORY_NOTE, ""]
    if result.get("torch_version"):
        parts += [TORCH_NOTE, ""]
    parts += [f"Notes: {' '.join(result['notes'])}", ""] if result["notes"] else []
    return "\n".join(parts)


def plot(result, path):
    """Time per step and fraction of copy bandwidth against tensor size, one
    line per arm, one column per dtype. Uses the matrix sweep when it was run,
    otherwise every set by its number of values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    rows = result["rows"]
    sweep = [r for r in rows if r["set"].startswith("matrix-")]
    rows = sweep or rows
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: d != "float32")
    devices = sorted({r["device"] for r in rows})
    colors = {arm: f"C{i}" for i, arm in enumerate(ALL_ARMS)}
    styles = {device: style for device, style in zip(devices, ("-", "--"))}
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    fig, axes = plt.subplots(2, len(dtypes), figsize=(6 * len(dtypes), 8), squeeze=False)
    for col, dtype in enumerate(dtypes):
        ax_t, ax_f = axes[0][col], axes[1][col]
        for device in devices:
            for arm in ALL_ARMS:
                pts = sorted((r["n_values"], r["median_ms"], r["fraction_of_copy_bw"])
                             for r in rows
                             if r["arm"] == arm and r["dtype"] == dtype and r["device"] == device)
                if not pts:
                    continue
                label = ARM_LABELS[arm] + (f" ({device})" if len(devices) > 1 else "")
                x = [p[0] for p in pts]
                kw = dict(marker="o", color=colors[arm], linestyle=styles[device], label=label)
                ax_t.plot(x, [p[1] for p in pts], **kw)
                ax_f.plot(x, [100 * p[2] for p in pts], **kw)
        ax_f.axhline(100, color="black", linewidth=0.8, linestyle=":")
        ax_t.set(xscale="log", yscale="log", ylabel="ms per step (median)",
                 title=f"{dtype}: time per step")
        ax_f.set(xscale="log", yscale="log", ylabel="% of copy bandwidth",
                 xlabel="matrix size" if sweep else "values in the set",
                 title=f"{dtype}: minimal bytes / time / copy bandwidth")
        for ax in (ax_t, ax_f):
            ax.grid(True, which="both", alpha=0.3)
            ax.yaxis.set_major_formatter(plain)
            if sweep:
                sizes = sorted({r["n_values"] for r in sweep})
                ax.set_xticks(sizes)
                ax.set_xticklabels([f"{round(n ** 0.5)}²" for n in sizes])
                ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax_t.legend(fontsize=8)
    what = "one n x n matrix" if sweep else "parameter sets"
    fig.suptitle(f"Adafactor step, {what} - {result['machine']['cpu_model']}, "
                 f"{result['machine']['logical_cpus']} cores, MLX "
                 f"{result['machine']['mlx_version']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result, out_dir):
    """Write results.json, results.md and results.png (when matplotlib is
    installed) into ``out_dir``; return the markdown text and the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    try:
        import matplotlib  # noqa: F401

        paths["png"] = out_dir / "results.png"
        plot(result, paths["png"])
    except ImportError:
        result["notes"].append("matplotlib is not installed: no plot.")
    text = markdown(result, "results.png" if "png" in paths else "")
    paths["markdown"].write_text(text)
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    return text, paths
