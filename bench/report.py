"""Write what the benchmark measured: a markdown table, a JSON file and a
PNG plot."""

import json

from .arms import ALL_ARMS, TORCH_SETTINGS

ARM_LABELS = {
    "mlx-stock": "stock",
    "mlx-stock-compiled": "stock compiled",
    "fused": "fused",
    "fused-compiled": "fused compiled",
    "fused-sr": "fused + stochastic rounding",
    "torch-loop": "torch loop",
    "torch-foreach": "torch foreach",
    "forward-backward": "forward and backward only",
}

FLOOR_NOTE = (
    "Floor: the least memory traffic a two-pass step must do, timed in the "
    "same run at each row's size (bench/floor.py): one read of the gradient, "
    "then a read of the gradient and the parameter and a write of the "
    "parameter, by numpy on one thread or on all cores, whichever is faster. "
    "State traffic is not counted, so no step can reach 1.0x. GB/s is those "
    "four transfers over a row's median."
)

MEMORY_NOTE = (
    "Peak MB is MLX's allocator peak (mx.get_peak_memory) during one arm: the "
    "live parameters, gradients and state plus the step's temporaries; not "
    "measured for PyTorch. RSS MB is the process's resident memory after the "
    "arm's last step, with its parameters and state alive (the arm started "
    "after MLX's cache was cleared and freed heap memory returned)."
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


def _times(f):
    return "-" if f is None else f"{f:.2f}x"


def _cost(f):
    return "-" if f is None else f"{100 * (f - 1):+.0f}%"


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


def _by(by_arm, arm, key, fmt):
    r = by_arm.get(arm)
    return fmt(r[key]) if r and r.get(key) is not None else "-"


def summary_table(result):
    """Median ms per arm for each set and dtype, the fused step's ratios,
    the floor and memory."""
    arms = [a for a in ALL_ARMS if any(r["arm"] == a for r in result["rows"])]
    devices = {r["device"] for r in result["rows"]}
    header = (["set", "dtype"] + (["device"] if len(devices) > 1 else [])
              + [ARM_LABELS[a] + " ms" for a in arms]
              + ["fused vs stock", "vs stock compiled", "vs best torch",
                 "floor ms", "fused x floor", "fused compiled x floor",
                 "stochastic rounding cost",
                 "peak MB stock / fused", "RSS MB stock / fused"])
    body = []
    for (device, _, dtype), by_arm in _groups(result["rows"]).items():
        any_row = next(iter(by_arm.values()))
        fused = by_arm.get("fused")
        line = [any_row["set_label"], dtype] + ([device] if len(devices) > 1 else [])
        line += [_ms(by_arm[a]["median_ms"]) if a in by_arm else "-" for a in arms]
        line += [_by(by_arm, "fused", "speedup_vs_stock", _x),
                 _by(by_arm, "fused", "speedup_vs_stock_compiled", _x),
                 _by(by_arm, "fused", "speedup_vs_best_torch", _x),
                 _ms(any_row["floor_ms"]),
                 _by(by_arm, "fused", "x_floor", _times),
                 _by(by_arm, "fused-compiled", "x_floor", _times),
                 _by(by_arm, "fused-sr", "x_fused", _cost),
                 f"{_by(by_arm, 'mlx-stock', 'peak_memory_bytes', _mb)} / "
                 f"{_by(by_arm, 'fused', 'peak_memory_bytes', _mb)}",
                 f"{_by(by_arm, 'mlx-stock', 'rss_after_step_bytes', _mb)} / "
                 f"{_by(by_arm, 'fused', 'rss_after_step_bytes', _mb)}"]
        if fused is None:
            line[-9:-6] = ["-"] * 3
        body.append(line)
    return _table(header, body)


def full_table(result):
    header = ["set", "dtype", "device", "arm", "median ms", "p20-p80 ms",
              "vs stock", "vs stock compiled", "x floor", "GB/s", "peak MB",
              "RSS MB", "RSS above start MB"]
    body = [[r["set"], r["dtype"], r["device"], ARM_LABELS[r["arm"]], _ms(r["median_ms"]),
             f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}", _x(r["speedup_vs_stock"]),
             _x(r["speedup_vs_stock_compiled"]), _times(r["x_floor"]),
             f"{r['gbps']:.2f}", _mb(r["peak_memory_bytes"]),
             _mb(r["rss_after_step_bytes"]), _mb(r["rss_above_start_bytes"])]
            for r in result["rows"]]
    return _table(header, body)


def floor_table(result):
    """The floor of each group, and both ways of timing it."""
    header = ["set", "dtype", "device", "floor ms", "p20-p80 ms", "way", "GB/s"]
    body = []
    for (device, set_key, dtype), by_arm in _groups(result["rows"]).items():
        r = next(iter(by_arm.values()))
        body.append([set_key, dtype, device, _ms(r["floor_ms"]),
                     f"{_ms(r['floor_p20_ms'])}-{_ms(r['floor_p80_ms'])}",
                     r["floor_way"].replace("_", " "),
                     f"{r['floor_bytes'] / (r['floor_ms'] * 1e-3) / 1e9:.1f}"])
    return _table(header, body)


def training_table(training):
    header = ["arm", "steps/s", "ms/step", "p20-p80 ms", "vs stock",
              "vs stock compiled", "optimizer's share of the step"]
    body = [[ARM_LABELS[r["arm"]], f"{r['steps_per_second']:.2f}", _ms(r["median_ms"]),
             f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}", _x(r["speedup_vs_stock"]),
             _x(r["speedup_vs_stock_compiled"]), _pct(r.get("optimizer_share"))]
            for r in training["rows"]]
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
    parts = [
        "# Adafactor step benchmark",
        "",
        f"Machine: {machine_line(result)}.",
        "",
        f"Timing: {result['budget']['warmup']} warm-up steps, then at least "
        f"{result['budget']['min_reps']} timed steps (more while under "
        f"{result['budget']['seconds']} s); median and 20th/80th percentile; "
        "`mx.eval(params, opt.state)` after every MLX step. Speedups are ratios "
        "of medians measured in the same run. Each row is also a multiple of "
        "its floor, the least memory traffic a step of its size must do, "
        "timed in the same run (below).",
        "",
        "## One optimizer step (median ms)",
        "",
        summary_table(result),
        "",
    ]
    if plot_name:
        parts += [f"![time per step and multiple of the floor]({plot_name})", ""]
    for t in result.get("training") or []:
        c = t["config"]
        parts += [
            f"## End to end: training loop ({t['name']})",
            "",
            f"Causal transformer: layers {c['layers']}, width {c['dims']}, "
            f"heads {c['heads']}, vocabulary {c['vocab']}, batch {c['batch']} x "
            f"{c['seq']} tokens, {t['n_params'] / 1e6:.2f}M float32 parameters; "
            "forward, backward and optimizer step per step, round-robin. The "
            "optimizer's share of an eager step is 1 - (forward and backward "
            "only) / step.",
            "",
            training_table(t),
            "",
        ]
    parts += ["## Floors", "", floor_table(result), "", FLOOR_NOTE, "",
              "## All measurements", "", full_table(result), "", MEMORY_NOTE, ""]
    if result.get("torch_version"):
        parts += [TORCH_NOTE, ""]
    parts += [f"Notes: {' '.join(result['notes'])}", ""] if result["notes"] else []
    return "\n".join(parts)


def plot(result, path):
    """Time per step and multiple of the floor against tensor size, one line
    per arm, one column per dtype. Uses the matrix sweep when it was run,
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
            floor = sorted({(r["n_values"], r["floor_ms"]) for r in rows
                            if r["dtype"] == dtype and r["device"] == device})
            if floor:
                ax_t.plot([p[0] for p in floor], [p[1] for p in floor], color="black",
                          linestyle=":", marker=".",
                          label="floor" + (f" ({device})" if len(devices) > 1 else ""))
            for arm in ALL_ARMS:
                pts = sorted((r["n_values"], r["median_ms"], r["x_floor"])
                             for r in rows
                             if r["arm"] == arm and r["dtype"] == dtype and r["device"] == device)
                if not pts:
                    continue
                label = ARM_LABELS[arm] + (f" ({device})" if len(devices) > 1 else "")
                x = [p[0] for p in pts]
                kw = dict(marker="o", color=colors[arm], linestyle=styles[device], label=label)
                ax_t.plot(x, [p[1] for p in pts], **kw)
                ax_f.plot(x, [p[2] for p in pts], **kw)
        ax_f.axhline(1, color="black", linewidth=0.8, linestyle=":")
        ax_t.set(xscale="log", yscale="log", ylabel="ms per step (median)",
                 title=f"{dtype}: time per step")
        ax_f.set(xscale="log", yscale="log", ylabel="multiple of the floor",
                 xlabel="matrix size" if sweep else "values in the set",
                 title=f"{dtype}: time / floor (1 = the least traffic's time)")
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
