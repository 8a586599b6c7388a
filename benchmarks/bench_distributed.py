"""Synchronised against local Batch Normalization, per rank, over MPI on the CPU.

Run (each run adds its world size's entry to the results file):

    mpiexec -n 2 python benchmarks/bench_distributed.py --save benchmarks/results/NAME.json
    mpiexec -n 4 python benchmarks/bench_distributed.py --save benchmarks/results/NAME.json

The batch is cases.NCHW, float32, split evenly over the ranks by its first axis.
Each rank times, on its own shard, the local call (``batch_norm`` and
``batch_norm_backward`` without ``comm``: each rank its own statistics) and the
synchronised one (``comm=MPI()``).  A round starts at a barrier and ends when the
slowest rank is done: its time is the round's (the wall-clock time of a training
step's BN).  Medians over the rounds.  It also records the collectives and the
bytes each rank sent per call, read from the communicator's counters.  Each rank
uses ``cores // ranks`` threads (at least one): the ranks share the machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import cupybn
from cupybn.distributed import MPI

sys.path.insert(0, str(Path(__file__).parent))
import cases  # noqa: E402 - the benchmark cases live there


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed_round(mpi, fn) -> float:
    """Seconds from a barrier until the slowest rank has run ``fn``."""
    mpi.Barrier()
    start = time.perf_counter()
    fn()
    return mpi.allreduce(time.perf_counter() - start, op=_max())


def _max():
    from mpi4py import MPI as _mpi  # noqa: PLC0415

    return _mpi.MAX


def measure(comm, backend, x, dy, gamma, beta, *, synchronised: bool, rounds: int) -> dict:
    mpi = comm.comm
    rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    kwargs = dict(running_mean=rm, running_var=rv, backend=backend, comm=comm if synchronised else None)
    state = {}

    def forward():
        state["saved"] = cupybn.batch_norm(x, gamma, beta, **kwargs)[1]

    def backward():
        cupybn.batch_norm_backward(dy, state["saved"])

    for _ in range(2):  # warm-up: thread pool, scratch buffers, recycled outputs
        forward()
        backward()
    before = (comm.collectives, comm.bytes_sent)
    fwd = [timed_round(mpi, forward) for _ in range(rounds)]
    after_forward = (comm.collectives, comm.bytes_sent)
    bwd = [timed_round(mpi, backward) for _ in range(rounds)]
    after = (comm.collectives, comm.bytes_sent)
    return {
        "forward_ms": statistics.median(fwd) * 1e3,
        "backward_ms": statistics.median(bwd) * 1e3,
        "collectives_per_forward": (after_forward[0] - before[0]) / rounds,
        "collectives_per_backward": (after[0] - after_forward[0]) / rounds,
        "bytes_sent_per_forward": (after_forward[1] - before[1]) / rounds,
        "bytes_sent_per_backward": (after[1] - after_forward[1]) / rounds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("CUPYBN_BENCH_ROUNDS", 15)))
    parser.add_argument("--save", metavar="JSON", help="add this world size's results to this file (rank 0)")
    args = parser.parse_args()
    comm = MPI()
    shape = cases.NCHW
    if shape[0] % comm.size:
        raise SystemExit(f"{comm.size} ranks do not split a batch of {shape[0]} evenly")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    backend = cupybn.NumpyBackend(threads=max(1, cores // comm.size))
    rows = shape[0] // comm.size
    rng = np.random.default_rng(comm.rank)
    x = (3 + rng.standard_normal((rows, *shape[1:]))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma, beta = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)
    results = {mode: measure(comm, backend, x, dy, gamma, beta, synchronised=mode == "synchronised",
                             rounds=args.rounds)
               for mode in ("local", "synchronised")}
    if comm.rank != 0:
        return 0
    entry = {"ranks": comm.size, "shape": list(shape), "shard": [rows, *shape[1:]], "dtype": "float32",
             "threads_per_rank": backend.threads, "rounds": args.rounds, **results}
    for op in ("forward", "backward"):
        entry[f"{op}_ratio_synchronised_to_local"] = (results["synchronised"][f"{op}_ms"]
                                                     / results["local"][f"{op}_ms"])
    print(json.dumps(entry, indent=1))
    if args.save:
        path = Path(args.save)
        saved = json.loads(path.read_text()) if path.exists() else {
            "machine": f"{cpu_model()}, {cores} cores available, {platform.platform()}",
            "date": datetime.date.today().isoformat(), "numpy": np.__version__, "cupybn": cupybn.__version__,
            "command": "mpiexec -n N python benchmarks/bench_distributed.py --save FILE", "runs": []}
        saved["runs"] = [r for r in saved["runs"] if r["ranks"] != comm.size] + [entry]
        path.write_text(json.dumps(saved, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
