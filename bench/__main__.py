"""Benchmark the fused Adafactor step against stock MLX and PyTorch.

    python -m bench             the full suite (about 15 minutes on 2 cores)
    python -m bench --quick     a smaller suite in about a minute

Writes results.json, results.md and results.png to --out (default
bench/results/local/) and prints the tables; while it runs,
results.partial.json holds the rows measured so far.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import mlx.core as mx

from . import arms as arms_mod
from . import optimizer_step, report, training
from . import sets as sets_mod
from .common import DEFAULT_BUDGET, QUICK_BUDGET, Progress, machine_info

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time one Adafactor step: stock MLX (eager and compiled), "
        "this package (eager and compiled) and torch.optim.Adafactor.",
    )
    ap.add_argument("--quick", action="store_true",
                    help="fewer sets, sizes and steps: about a minute")
    ap.add_argument("--sets", type=_csv, default=None,
                    help="comma-separated: gpt2, llama, sweep, matrix-N, many-1k, "
                    "many-256, tiny (default: gpt2,many-1k,sweep,many-256,llama; "
                    "--quick: sweep,many-1k)")
    ap.add_argument("--sweep-sizes", type=_csv, default=None,
                    help="matrix sizes n of the sweep (default 256..8192; "
                    "--quick: 256..2048)")
    ap.add_argument("--dtypes", type=_csv, default=["float32", "bfloat16"],
                    help="comma-separated: float32, bfloat16, float16")
    ap.add_argument("--arms", type=_csv, default=list(arms_mod.ALL_ARMS),
                    help="comma-separated: " + ", ".join(arms_mod.ALL_ARMS)
                    + " (torch arms only when torch is installed)")
    ap.add_argument("--devices", type=_csv, default=["default", "cpu"],
                    help="'default' (MLX's default device) and/or 'cpu' "
                    "(run once when they are the same)")
    ap.add_argument("--training", type=_csv, default=["small", "wide"],
                    help="comma-separated training-loop models: small, wide, "
                    "tiny (tests), or off (default: small,wide; --quick: wide)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "local",
                    help="output directory (default bench/results/local/)")
    return ap.parse_args(argv)


def _devices(names):
    out = []
    for name in names:
        if name == "default":
            device = mx.default_device()
        elif name == "cpu":
            device = mx.cpu
        else:
            raise SystemExit(f"bench: unknown device '{name}' (choose default or cpu)")
        if device not in out:
            out.append(device)
    return out


def main(argv=None):
    args = parse_args(argv)
    budget = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    sweep = ([int(n) for n in args.sweep_sizes] if args.sweep_sizes
             else sets_mod.QUICK_SWEEP_SIZES if args.quick else sets_mod.SWEEP_SIZES)
    set_names = args.sets or list(sets_mod.QUICK_SETS if args.quick else sets_mod.DEFAULT_SETS)
    set_list = sets_mod.resolve(set_names, sweep)
    try:
        dtypes = [DTYPES[d] for d in args.dtypes]
    except KeyError as e:
        raise SystemExit(f"bench: unknown dtype {e} (choose from {', '.join(DTYPES)})")
    for name in args.arms:
        arms_mod.make(name)
    training_names = [] if args.training == ["off"] else args.training
    if args.quick and args.training == ["small", "wide"]:
        training_names = ["wide"]
    for name in training_names:
        if name not in training.CONFIGS:
            raise SystemExit(f"bench: unknown training model '{name}' "
                             f"(choose from {', '.join(training.CONFIGS)}, off)")
    devices = _devices(args.devices)
    notes = []

    arm_names = list(args.arms)
    torch_version = None
    if arms_mod.torch_available():
        import torch

        torch_version = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    elif any(a in arms_mod.TORCH_ARMS for a in arm_names):
        arm_names = [a for a in arm_names if a not in arms_mod.TORCH_ARMS]
        hint = ("PyTorch is not installed, so the torch.optim.Adafactor arms "
                f"are skipped; `{sys.executable} -m pip install torch` adds them.")
        print(f"bench: {hint}", file=sys.stderr)
        notes.append(hint)
    if len(args.devices) > len(devices):
        notes.append(f"MLX's default device is the {devices[0].type.name.upper()}, "
                     "so the default-device and CPU-stream runs are the same and "
                     "are measured once.")

    result = {
        "schema_version": 1,
        "machine": machine_info(),
        "mlx_version": mx.__version__,
        "torch_version": torch_version,
        "quick": args.quick,
        "budget": vars(budget),
        "sets": {key: {"label": label, "n_tensors": len(shapes),
                       "n_values": sets_mod.num_values(shapes)}
                 for key, label, shapes in set_list},
        "torch_settings": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in arms_mod.TORCH_SETTINGS.items()},
        "floor_definition": report.FLOOR_NOTE,
    }
    result["package_version"] = result["machine"]["package_version"]
    print(f"bench: {report.machine_line(result)}", file=sys.stderr)

    cells = optimizer_step.cells(set_list, dtypes, devices, arm_names)
    n_training = len(training.ARMS) * len(training_names)
    progress = Progress(len(cells) + n_training, "bench")
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "results.partial.json"

    def checkpoint(rows_so_far):
        partial.write_text(json.dumps({**result, "rows": rows_so_far}, indent=1) + "\n")

    rows = optimizer_step.run(set_list, dtypes, devices, arm_names, budget, progress,
                              on_group=checkpoint)
    below = sorted({(r["set"], r["dtype"], r["arm"]) for r in rows if r["x_floor"] < 1})
    if below:
        notes.append("Faster than the floor (the floor is wrong for these rows): "
                     + ", ".join(" ".join(b) for b in below) + ".")
    result["rows"] = rows
    result["training"] = [
        training.run(name,
                     training.QUICK_TRAINING_BUDGET if args.quick
                     else training.TRAINING_BUDGETS.get(name, training.QUICK_TRAINING_BUDGET),
                     progress)
        for name in training_names
    ]
    progress.close()

    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["notes"] = notes

    text, paths = report.write(result, args.out)
    partial.unlink(missing_ok=True)
    print(text)
    for kind, path in paths.items():
        print(f"bench: wrote {kind}: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
