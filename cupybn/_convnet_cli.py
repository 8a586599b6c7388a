"""``python -m cupybn convnet``: the paper's second result (Figures 2-3, Table 2) on a
small convolutional network, with its outputs.

Arguments are checked before any training, as for ``demo`` (whose checks,
backend choice and progress lines this reuses).
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from . import _cli_args
from ._demo_cli import Progress, add_experiment_arguments, describe_backend, prepare, save_figure
from .experiments import convnet

DEFAULT_STEPS = 1500
DEFAULT_BATCH = 32
OUTPUTS = ("curves.csv", "results.json", "figure.png")
# one colour and line style per variant, in VARIANTS order (BN: solid, without BN: dashed)
STYLES = (("black", "--"), ("tab:blue", "-"), ("tab:green", "-"), ("tab:red", "-"), ("tab:gray", "--"),
          ("tab:olive", ":"), ("tab:purple", "-."))


def add_parser(commands) -> None:
    sweep = ", ".join(str(r) for r in convnet.SWEEP)
    cmd = commands.add_parser(
        "convnet", help="the paper's Figure 3 / Table 2: higher learning rates and sigmoids with BN, on a conv net",
        description="Train a stack of 3x3 convolutions without BN (after a sweep of base learning rates: "
                    f"{sweep}) and with BN at 1, 5 and 30 times the base rate, without BN at 5 times, and "
                    "with sigmoids without BN and with BN at 5 times, from the same weights on the same "
                    "batches; print the paper's Table 2 and write the accuracy curves as CSV, JSON and a PNG "
                    "figure. Progress goes to stderr, as for demo.")
    add_experiment_arguments(cmd, steps=DEFAULT_STEPS, batch_size=DEFAULT_BATCH, out="cupybn-convnet",
                             outputs=OUTPUTS, steps_note=" per run")
    cmd.add_argument("--lr", type=_cli_args.positive_float, default=None,
                     help=f"the base learning rate, a finite number > 0 (default: the best of {sweep} for the "
                          "network without BN)")
    cmd.set_defaults(func=run_convnet, error=cmd.error)


def table_lines(results: convnet.Results) -> list[str]:
    goal = results.runs[0].best
    lines = [f"{'variant':<18}{'lr':>9}{f'steps to {goal:.4f}':>18}{'best accuracy':>15}"]
    for row in results.table():
        steps = row["steps_to_baseline_best"]
        reached = f"{steps:d}" if steps is not None else "never"
        note = f"  (diverged at step {row['diverged_at']})" if row["diverged_at"] is not None else ""
        lines.append(f"{row['variant']:<18}{row['lr']:>9.4g}{reached:>18}{row['best_accuracy']:>15.4f}{note}")
    return lines


def make_figure(results: convnet.Results, title: str):
    """Held-out accuracy against steps, one line per variant (a matplotlib Figure)."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for run, (color, style) in zip(results.runs, STYLES, strict=True):
        ax.plot(run.steps, run.accuracy, color=color, linestyle=style, label=f"{run.variant.name} (lr {run.lr:.3g})")
    ax.axhline(results.runs[0].best, color="black", linewidth=0.6, alpha=0.5)  # the plain network's best
    ax.set(xlabel="training step", ylabel="held-out accuracy", ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def write_outputs(results: convnet.Results, out: Path, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    curves = convnet.curves_of(results)
    written = [out / name for name in OUTPUTS[:2]]
    names = list(curves)
    steps = curves[names[0]]["steps"]
    with open(written[0], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *names])
        for k, step in enumerate(steps):
            writer.writerow([step, *(curves[n]["accuracy"][k] for n in names)])
    doc = {"title": title, "settings": results.settings,
           "sweep": [{"lr": lr, "best_accuracy": acc} for lr, acc in results.sweep.items()],
           "base_lr": results.base_lr, "table": results.table(), "curves": curves}
    with open(written[1], "w") as f:
        json.dump(doc, f, indent=1)
    return save_figure(lambda: make_figure(results, title), out / OUTPUTS[2], written)


def run_convnet(args) -> int:
    backend, data = prepare(args, OUTPUTS)
    rates = f"base lr {args.lr}" if args.lr is not None else f"base lr: best of {list(convnet.SWEEP)}"
    print(f"data: {data.name}: {len(data.x_train)} training and {len(data.x_test)} held-out images; "
          f"{args.steps} steps of {args.batch_size} per run, {rates}, seed {args.seed}, {describe_backend(backend)}")
    runs = len(convnet.VARIANTS) - 1 + (1 if args.lr is not None else len(convnet.SWEEP))
    progress = Progress(runs * args.steps)
    start = time.perf_counter()
    results = convnet.run_all(data, steps=args.steps, batch_size=args.batch_size, seed=args.seed, base_lr=args.lr,
                              backend=backend, progress=lambda done, total: progress(done))
    elapsed = time.perf_counter() - start
    if args.lr is None:
        print("sweep (network without BN): " + ", ".join(
            f"lr {lr:g}: {acc:.4f}" for lr, acc in results.sweep.items()) + f"; base lr {results.base_lr:g}")
    for line in table_lines(results):
        print(line)
    written = write_outputs(results, Path(args.out), f"{data.name}, {args.steps} steps per run, seed {args.seed}")
    print(f"{elapsed:.1f} s; wrote {', '.join(str(p) for p in written)}")
    return 0
