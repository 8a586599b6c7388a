"""Command line: ``python -m cupybn <command>``.

``compare`` times cupybn's NumPy backend against the textbook NumPy code and
PyTorch (when installed) on one case and checks each against float64.
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from . import _cli_args, _convnet_cli, _demo_cli
from . import _textbook as textbook
from .api import batch_norm, batch_norm_backward, param_dtype_name

DEFAULT_SHAPE = (64, 64, 32, 32)
QUICK_SHAPE = (16, 32, 16, 16)
EPS = 1e-5


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: thread pool and scratch buffers
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rel_err(v, ref) -> float:
    """max over elements of |v - ref| / max(1, |ref|)."""
    v = np.asarray(v, dtype=np.float64)
    return float(np.max(np.abs(v - ref) / np.maximum(1.0, np.abs(ref))))


# Each implementation is a pair of closures over one case:
#   forward() -> (y as a NumPy array in x's layout, state for backward)
#   backward(state) -> dx as a NumPy array
# (torch results are turned into NumPy views, which costs nothing.)
def _cupybn(x, dy, gamma, beta, axis):
    def forward():
        return batch_norm(x, gamma, beta, eps=EPS, axis=axis)

    def backward(saved):
        return batch_norm_backward(dy, saved)[0]

    return forward, backward


def _textbook(x, dy, gamma, beta, axis):
    def forward():
        return textbook.forward_train(x, gamma, beta, eps=EPS, axis=axis)

    def backward(cache):
        return textbook.backward(dy, cache)[0]

    return forward, backward


def _torch(x, dy, gamma, beta, axis):
    import torch  # optional: only this implementation needs it

    # channel axis moved to position 1: a channels-last array stays channels-last in memory
    xt, dyt = torch.from_numpy(x).movedim(axis, 1).requires_grad_(), torch.from_numpy(dy).movedim(axis, 1)
    wt, bt = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()

    def forward():
        y = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=EPS)
        return y.detach().movedim(1, axis).numpy(), y

    def backward(y):
        return torch.autograd.grad(y, (xt, wt, bt), dyt, retain_graph=True)[0].movedim(1, axis).numpy()

    return forward, backward


def _check_compare(args: argparse.Namespace) -> tuple[tuple[int, ...], int]:
    """The shape and repeat count, or an argparse error naming the argument."""
    shape = tuple(args.shape or (QUICK_SHAPE if args.quick else DEFAULT_SHAPE))
    per_channel = math.prod(shape) // shape[1] if len(shape) >= 2 else 0
    if per_channel < 2:  # sizes are >= 1 already (their type)
        args.error(f"argument --shape: expected N C ... with at least 2 sizes and at least 2 values per channel "
                   f"(the product of the sizes other than C), got {' '.join(map(str, shape))}")
    largest = float(np.finfo(args.dtype).max)
    if abs(args.offset) > largest / 2:  # x = offset + N(0, 1) must not overflow to inf
        args.error(f"argument --offset: expected |offset| <= {largest / 2:g} for {args.dtype}, got {args.offset:g}")
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 10)
    return shape, repeat


def _compare(args: argparse.Namespace) -> int:
    shape, repeat = _check_compare(args)
    rng = np.random.default_rng(0)
    x = (args.offset + rng.standard_normal(shape)).astype(args.dtype)
    dy = rng.standard_normal(shape).astype(args.dtype)
    axis = 1
    if args.layout == "nhwc":
        x, dy, axis = np.ascontiguousarray(np.moveaxis(x, 1, -1)), np.ascontiguousarray(np.moveaxis(dy, 1, -1)), -1
    channels = shape[1]
    pdt = param_dtype_name(x.dtype)
    gamma = (1 + 0.1 * rng.standard_normal(channels)).astype(pdt)
    beta = (0.1 * rng.standard_normal(channels)).astype(pdt)

    # reference: the same rounded inputs, computed in float64
    y_ref, cache = textbook.forward_train(x.astype(np.float64), gamma.astype(np.float64),
                                          beta.astype(np.float64), eps=EPS, axis=axis)
    dx_ref = textbook.backward(dy.astype(np.float64), cache)[0]

    impls: list[tuple[str, Callable | None]] = [("cupybn (numpy)", _cupybn), ("textbook numpy", _textbook)]
    try:
        import torch
        impls.append((f"torch {torch.__version__}", _torch))
    except ImportError:
        impls.append(("torch: not installed", None))

    print(f"x {shape} {x.dtype} {args.layout}, offset {args.offset:g}; median of {repeat} runs")
    print(f"{'implementation':<22}{'forward ms':>12}{'backward ms':>13}{'err y':>11}{'err dx':>11}")
    for name, make in impls:
        if make is None:
            print(name)
            continue
        forward, backward = make(x, dy, gamma, beta, axis)
        y, state = forward()
        t_fwd = _median_ms(forward, repeat)
        t_bwd = _median_ms(functools.partial(backward, state), repeat)
        print(f"{name:<22}{t_fwd:>12.3f}{t_bwd:>13.3f}{_rel_err(y, y_ref):>11.1e}"
              f"{_rel_err(backward(state), dx_ref):>11.1e}")
    print("err: max over elements of |v - v64| / max(1, |v64|), v64 computed in float64")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cupybn", description="cupybn command-line tools")
    commands = parser.add_subparsers(dest="command", metavar="command")

    compare = commands.add_parser(
        "compare", help="time and check cupybn against textbook NumPy and torch",
        description="Training-mode forward and backward on one array with cupybn's NumPy backend, textbook "
                    "NumPy and torch: median times, and errors against a float64 computation.")
    compare.add_argument("--shape", type=_cli_args.int_at_least(1), nargs="+", metavar="DIM",
                         help=f"shape in N C ... order: sizes >= 1, at least 2 of them, at least 2 values per "
                              f"channel (default {' '.join(map(str, DEFAULT_SHAPE))})")
    compare.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw",
                         help="memory layout: nhwc stores channels last (axis=-1) (default nchw)")
    compare.add_argument("--dtype", choices=("float32", "float16", "float64"), default="float32",
                         help="dtype of x (default float32)")
    compare.add_argument("--offset", type=_cli_args.finite_float, default=0.0,
                         help="x = offset + N(0, 1); |offset| at most half the dtype's largest value (default 0)")
    compare.add_argument("--repeat", type=_cli_args.int_at_least(1), metavar="N",
                         help="timed runs per measurement, >= 1 (default 10, 3 with --quick)")
    compare.add_argument("--quick", action="store_true",
                         help=f"small default shape {' '.join(map(str, QUICK_SHAPE))} and 3 runs")
    compare.set_defaults(func=_compare, error=compare.error)
    _demo_cli.add_parser(commands)
    _convnet_cli.add_parser(commands)
    # listed for --help only: main() hands gpu-check its arguments before parsing (cupybn/_gpu_check.py)
    commands.add_parser("gpu-check", add_help=False,
                        help="on an NVIDIA GPU: tests, copy roofline and benchmarks in one go (needs CuPy)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu-check"]:
        from ._gpu_check import main as gpu_check  # its own options; imports CuPy only when run
        return gpu_check(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
