"""``python -m cupybn demo``: the paper's Figure 1 experiment, with its outputs."""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from . import experiment

DEFAULT_STEPS = 10_000


def add_parser(commands) -> None:
    demo = commands.add_parser(
        "demo", help="reproduce the paper's MNIST experiment (Figure 1)",
        description="Train a 3x100 sigmoid network with and without Batch Normalization from the same "
                    "weights on the same batches; write the held-out accuracy and sigmoid-input curves "
                    "as CSV, JSON and a PNG figure.")
    demo.add_argument("--data", help="MNIST: a folder with the four IDX files (.gz or not) or an .npz with "
                                     "x_train, y_train, x_test, y_test (default: scikit-learn's 8x8 digits)")
    demo.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"SGD steps (default {DEFAULT_STEPS})")
    demo.add_argument("--batch-size", type=int, default=60, help="minibatch size (default 60, as in the paper)")
    demo.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default 0.5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                      help="auto: the NumPy backend (the CuPy backend is not written yet)")
    demo.add_argument("--out", default="cupybn-demo", help="output folder (default ./cupybn-demo)")
    demo.set_defaults(func=run_demo, error=demo.error)


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.active = stream.isatty()
        self.last = -1

    def __call__(self, step: int) -> None:
        percent = 100 * step // self.total
        if self.active and percent != self.last:
            self.last = percent
            bar = "#" * (percent // 4)
            self.stream.write(f"\r  training [{bar:<25}] {percent:3d}%  step {step}/{self.total}")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()


def _check_args(args) -> None:
    if args.steps < 1:
        args.error(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 2:
        args.error(f"--batch-size must be at least 2 (Batch Normalization needs 2 values), got {args.batch_size}")
    if not args.lr > 0:
        args.error(f"--lr must be positive, got {args.lr}")
    if args.backend == "cupy":
        args.error("--backend cupy: the CuPy backend is not implemented yet; use numpy")


def write_outputs(curves: experiment.Curves, out: Path, title: str) -> list[Path]:
    """CSV, JSON and (when matplotlib is installed) the three-panel PNG."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, step in enumerate(curves.steps):
        row = {"step": step}
        for name in ("plain", "bn"):
            row[f"{name}_accuracy"] = curves.accuracy[name][k]
            for p, v in zip(experiment.PERCENTILES, curves.percentiles[name][k], strict=True):
                row[f"{name}_p{p}"] = v
        rows.append(row)
    written = [out / "curves.csv", out / "curves.json"]
    with open(written[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(written[1], "w") as f:
        json.dump({"title": title, "percentiles": list(experiment.PERCENTILES), "rows": rows}, f, indent=1)
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed: no figure (pip install 'cupybn[demo]')", file=sys.stderr)
        return written
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(curves.steps, curves.accuracy["plain"], label="Without BN", color="tab:gray")
    axes[0].plot(curves.steps, curves.accuracy["bn"], label="With BN", color="tab:blue")
    axes[0].set(title="(a) held-out accuracy", xlabel="training step", ylim=(0, 1))
    axes[0].legend(loc="lower right")
    for ax, name, label in ((axes[1], "plain", "(b) without BN"), (axes[2], "bn", "(c) with BN")):
        for i, p in enumerate(experiment.PERCENTILES):
            ax.plot(curves.steps, [v[i] for v in curves.percentiles[name]], color="tab:blue" if p == 50 else "tab:gray",
                    label=f"{p}th percentile")
        ax.set(title=f"{label}: input to a last-layer sigmoid", xlabel="training step")
    axes[2].sharey(axes[1])
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    written.append(out / "figure.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def run_demo(args) -> int:
    _check_args(args)
    try:
        data = experiment.load_mnist(args.data) if args.data else experiment.load_digits(args.seed)
    except experiment.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"data: {data.name}: {len(data.x_train)} training and {len(data.x_test)} held-out images; "
          f"{args.steps} steps of {args.batch_size}, lr {args.lr}, seed {args.seed}, NumPy backend")
    start = time.perf_counter()
    curves = experiment.run(data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            progress=_Progress(args.steps))
    elapsed = time.perf_counter() - start
    print(f"{'network':<12}{'final held-out accuracy':>25}{'steps to 95% of it':>21}{'median drift':>15}")
    for name, label in (("plain", "without BN"), ("bn", "with BN")):
        medians = [p[1] for p in curves.percentiles[name]]
        # drift: how far the sigmoid input's median moves after the first tenth of training
        tail = medians[len(medians) // 10:]
        print(f"{label:<12}{curves.accuracy[name][-1]:>25.4f}{experiment.steps_to_reach(curves, name):>21d}"
              f"{max(tail) - min(tail):>15.3f}")
    written = write_outputs(curves, Path(args.out), f"{data.name}, {args.steps} steps, seed {args.seed}")
    print(f"{elapsed:.1f} s; wrote {', '.join(str(p) for p in written)}")
    return 0
