"""``python -m cupybn demo``: the paper's Figure 1 experiment, with its outputs.

Every argument is checked before any training: the output folder must be
writable, the backend usable and the numbers in range (argparse errors, exit
status 2).
"""
from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from . import _cli_args, _distributed_demo
from ._cuda_probe import cupy_with_gpu, one_line
from .backends import NUMPY, NumpyBackend
from .experiments import data as experiment_data
from .experiments import figure1 as experiment

DEFAULT_STEPS = 10_000
OUTPUTS = ("curves.csv", "curves.json", "figure.png")
# (colour, line style) of the 15th, 50th and 85th percentile lines
PERCENTILE_STYLES = (("tab:orange", "--"), ("tab:blue", "-"), ("tab:purple", ":"))


def add_parser(commands) -> None:
    demo = commands.add_parser(
        "demo", help="reproduce the paper's MNIST experiment (Figure 1)",
        description="Train a 3x100 sigmoid network with and without Batch Normalization from the same "
                    "weights on the same batches; write the held-out accuracy and sigmoid-input curves "
                    "as CSV, JSON and a PNG figure. Progress goes to stderr: one line redrawn on a "
                    "terminal, about ten lines in a log or a pipe.")
    add_experiment_arguments(demo, steps=DEFAULT_STEPS, batch_size=60, out="cupybn-demo", outputs=OUTPUTS,
                             batch_note=", as in the paper")
    demo.add_argument("--lr", type=_cli_args.positive_float, default=0.5,
                      help="SGD learning rate, a finite number > 0 (default 0.5)")
    demo.add_argument("--distributed", action="store_true",
                      help="train data-parallel over MPI (start it with mpiexec -n N): each rank takes its "
                           "shard of every batch, BN is synchronised and the gradients summed over the ranks; "
                           "rank 0 then runs the single-process training on the same batches and prints how "
                           "far apart the curves are (needs mpi4py and an MPI: pip install mpi4py mpich)")
    demo.set_defaults(func=run_demo, error=demo.error)


def add_experiment_arguments(parser, *, steps: int, batch_size: int, out: str, outputs, batch_note: str = "",
                             steps_note: str = "") -> None:
    """The options every experiment command takes: --data, --steps, --batch-size, --seed, --backend, --out."""
    parser.add_argument("--data", metavar="PATH",
                        help="MNIST: a folder with the four IDX files (.gz or not) or an .npz with "
                             "x_train, y_train, x_test, y_test (default: scikit-learn's 8x8 digits)")
    parser.add_argument("--steps", type=_cli_args.int_at_least(1), default=steps, metavar="N",
                        help=f"SGD steps{steps_note}, >= 1 (default {steps})")
    parser.add_argument("--batch-size", type=_cli_args.int_at_least(2), default=batch_size, metavar="N",
                        help=f"minibatch size, from 2 to the number of training images (default {batch_size}"
                             f"{batch_note})")
    parser.add_argument("--seed", type=_cli_args.int_at_least(0), default=0, metavar="N",
                        help="seed (>= 0) of the held-out split, the initial weights and the batches (default 0)")
    parser.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                        help="cupy: the CuPy backend on an NVIDIA GPU (needs CuPy; an error at once if it cannot "
                             "run); numpy: the NumPy backend; auto (default): cupy where it can run, else numpy")
    parser.add_argument("--out", default=out, metavar="FOLDER",
                        help=f"output folder, made if missing (default ./{out}): {', '.join(outputs)}")


class Progress:
    """Training progress on ``stream`` (stderr by default): on a terminal one
    line redrawn in place; elsewhere (a CI log, a pipe) ``lines`` lines over
    the whole run, so that a log shows the run advancing without filling up."""

    def __init__(self, total: int, stream=None, lines: int = 10):
        self.total, self.lines = total, lines
        self.stream = sys.stderr if stream is None else stream
        self.terminal = self.stream.isatty()
        self.last = -1 if self.terminal else 0  # terminal: the percentage drawn last; log: lines written
        self.start = time.perf_counter()

    def __call__(self, step: int) -> None:
        percent = 100 * step // self.total
        if self.terminal:
            if percent == self.last:
                return
            self.last = percent
            bar = "#" * (percent // 4)
            self.stream.write(f"\r  training [{bar:<25}] {percent:3d}%  step {step}/{self.total}")
            if step == self.total:
                self.stream.write("\n")
        else:
            due = step * self.lines // self.total
            if due <= self.last:
                return
            self.last = due
            elapsed = time.perf_counter() - self.start
            left = f"about {elapsed * (self.total - step) / step:.0f} s left" if step < self.total else "done"
            self.stream.write(f"  training: step {step}/{self.total} ({percent}%), {elapsed:.1f} s, {left}\n")
        self.stream.flush()


# ---- checks made before any work -----------------------------------------------------

class BackendUnavailable(Exception):
    """The CuPy backend cannot run here; the message says why."""


def gpu_backend():
    """The CuPy backend, after one small call of it has run on the GPU (which
    compiles its kernels); BackendUnavailable saying why when it cannot run."""
    cupy, why = cupy_with_gpu()
    if cupy is None:
        raise BackendUnavailable(why)
    from .api import batch_norm  # noqa: PLC0415
    from .backends.cupy_backend import default_cupy_backend  # noqa: PLC0415 - only with CuPy

    try:
        backend = default_cupy_backend()
        batch_norm(cupy.arange(8, dtype=cupy.float32).reshape(4, 2), backend=backend)
        cupy.cuda.Device().synchronize()
    except Exception as exc:  # compiler, driver or launch failures
        raise BackendUnavailable(f"the CuPy backend cannot run on this GPU ({type(exc).__name__}: "
                                 f"{one_line(exc)})") from exc
    return backend


def choose_backend(choice: str):
    """The backend for ``--backend choice``; BackendUnavailable for ``cupy`` where it cannot run."""
    if choice == "numpy":
        return NUMPY
    try:
        return gpu_backend()
    except BackendUnavailable:
        if choice == "cupy":
            raise
        return NUMPY


def describe_backend(backend) -> str:
    if isinstance(backend, NumpyBackend):
        return "NumPy backend"
    name = getattr(backend, "name", "")
    return "CuPy backend" if name == "cupy" else f"CuPy backend ({name})"


def folder_problem(folder, outputs=OUTPUTS) -> str | None:
    """Why the files ``outputs`` cannot be written into ``folder`` (made when missing), or None."""
    folder = Path(os.path.abspath(folder))
    existing = folder
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        kind = "a file, not a folder" if existing.is_file() else "not a folder"
        return f"{folder} is {kind}" if existing == folder else f"{existing} is {kind}, so {folder} cannot be made"
    if existing == folder:
        for name in outputs:
            target = folder / name
            if os.path.lexists(target) and not target.is_file():
                return f"{target} is in the way (not a file)"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot write in {existing} ({exc.strerror or one_line(exc)})"
    return None


# ---- outputs --------------------------------------------------------------------------

def make_figure(curves: experiment.Curves, title: str):
    """The three panels as a matplotlib Figure (no pyplot: no window, no global state)."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional

    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    axes[0].plot(curves.steps, curves.accuracy["plain"], label="Without BN", color="tab:gray")
    axes[0].plot(curves.steps, curves.accuracy["bn"], label="With BN", color="tab:blue")
    axes[0].set(title="(a) held-out accuracy", xlabel="training step", ylim=(0, 1))
    axes[0].legend(loc="lower right")
    for ax, name, label in ((axes[1], "plain", "(b) without BN"), (axes[2], "bn", "(c) with BN")):
        for i, (p, (color, style)) in enumerate(zip(experiment.PERCENTILES, PERCENTILE_STYLES, strict=True)):
            ax.plot(curves.steps, [v[i] for v in curves.percentiles[name]], color=color, linestyle=style,
                    label=f"{p}th percentile")
        ax.set(title=f"{label}: input to a last-layer sigmoid", xlabel="training step")
    axes[1].legend(loc="best", fontsize=8)  # one legend: (c) draws the same lines
    axes[2].sharey(axes[1])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


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
    written = [out / name for name in OUTPUTS[:2]]
    with open(written[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(written[1], "w") as f:
        json.dump({"title": title, "percentiles": list(experiment.PERCENTILES), "rows": rows}, f, indent=1)
    return save_figure(lambda: make_figure(curves, title), out / OUTPUTS[2], written)


def save_figure(make, path: Path, written: list[Path]) -> list[Path]:
    """``written`` and ``path``, where ``make()``'s figure is saved; ``written`` alone
    (and a line saying why) when matplotlib is not installed."""
    try:
        fig = make()
    except ImportError:
        print("matplotlib is not installed: no figure (pip install 'cupybn[demo]')", file=sys.stderr)
        return written
    fig.savefig(path, dpi=110)
    return [*written, path]


def prepare(args, outputs):
    """The checks every experiment command makes before any training: the output
    folder, the backend, the data and the batch size against it.  Returns
    ``(backend, data)``; argparse errors exit (status 2), and so does bad data."""
    problem = folder_problem(args.out, outputs)
    if problem:
        args.error(f"argument --out: {problem}")
    try:
        backend = choose_backend(args.backend)
    except BackendUnavailable as exc:
        args.error(f"argument --backend: cupy: {exc}")
    try:
        data = experiment_data.load_mnist(args.data) if args.data else experiment_data.load_digits(args.seed)
    except experiment_data.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    if args.batch_size > len(data.x_train):
        args.error(f"argument --batch-size: expected an integer from 2 to {len(data.x_train)} (the number of "
                   f"training images), got {args.batch_size}")
    return backend, data


def run_demo(args) -> int:
    backend, data = prepare(args, OUTPUTS)
    comm = _distributed_demo.communicator(args) if args.distributed else None
    if comm is not None and args.batch_size < comm.size:  # the same on every rank: all exit
        args.error(f"argument --batch-size: {args.batch_size} rows cannot be shared by {comm.size} ranks; "
                   f"give at least one per rank")
    lead = comm is None or comm.rank == 0  # the rank that reports and writes
    settings = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, backend=backend)
    if lead:
        print(f"data: {data.name}: {len(data.x_train)} training and {len(data.x_test)} held-out images; "
              f"{args.steps} steps of {args.batch_size}, lr {args.lr}, seed {args.seed}, {describe_backend(backend)}"
              + ("" if comm is None else f"; data-parallel over {comm.size} MPI ranks"))
    start = time.perf_counter()
    with _distributed_demo.one_blas_thread(comm):
        curves = experiment.run(data, **settings, progress=Progress(args.steps) if lead else None, comm=comm)
    elapsed = time.perf_counter() - start
    if not lead:
        return 0
    print(f"{'network':<12}{'final held-out accuracy':>25}{'steps to 95% of it':>21}{'median drift':>15}")
    for name, label in (("plain", "without BN"), ("bn", "with BN")):
        medians = [p[1] for p in curves.percentiles[name]]
        # drift: how far the sigmoid input's median moves after the first tenth of training
        tail = medians[len(medians) // 10:]
        print(f"{label:<12}{curves.accuracy[name][-1]:>25.4f}{experiment.steps_to_reach(curves, name):>21d}"
              f"{max(tail) - min(tail):>15.3f}")
    title = f"{data.name}, {args.steps} steps, seed {args.seed}"
    if comm is not None:
        print(f"{elapsed:.1f} s over {comm.size} ranks; now the single-process run of the same batches")
        single = experiment.run(data, **settings, progress=Progress(args.steps))
        print(_distributed_demo.compare(curves, single, len(data.x_test)))
        title += f", data-parallel over {comm.size} ranks"
    written = write_outputs(curves, Path(args.out), title)
    print(f"{elapsed:.1f} s; wrote {', '.join(str(p) for p in written)}")
    return 0
