"""Run under ``mpiexec -n N python tests/mpi_ranks.py``: synchronised BN over real MPI
processes (tests/test_distributed_mpi.py starts it).

Every rank builds the same batches from fixed seeds and takes its shard of each
fixed split for N ranks (uneven, empty and one-value shards among them).  Rank 0
gathers the shards' results and checks them against a float64 Batch Normalization
of the whole batch at the exactness bar; every rank checks that all ranks hold
identical statistics and running statistics, bit for bit, and that a second run
gives the same bits; then each bad input is tried, and every rank must raise.
The last line of each rank is ``RANK r OK <checks>`` or the script exits 1.
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np

import cupybn
from cupybn.distributed import MPI
from cupybn.testing import (
    batch_norm_errors,
    exceeded,
    probe_dy,
    reference_backward,
    reference_forward,
    running_stats_update,
    tolerance,
)

# rows per rank, by world size; every split covers 12 rows
SPLITS = {
    1: [(12,)],
    2: [(5, 7), (0, 12), (11, 1)],
    3: [(1, 0, 11), (4, 4, 4), (0, 12, 0)],
    4: [(3, 3, 3, 3), (0, 1, 0, 11), (6, 0, 6, 0), (1, 1, 1, 9)],
}
# (shape, axis, dtype); the batch axis is 0 and holds 12 rows
CASES = [((12, 5), 1, np.float32), ((12, 3, 4, 4), 1, np.float32), ((12, 4, 4, 3), 3, np.float32),
         ((12, 6), 1, np.float64), ((12, 2, 3, 3), 1, np.float16)]
OFFSET_STD = 1e6


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def run_case(comm, shape, axis, dtype, sizes, seed):
    rng = np.random.default_rng(seed)
    offset = OFFSET_STD if dtype != np.float16 else 100.0
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    pdt = np.float64 if dtype == np.float64 else np.float32
    gamma = rng.normal(1, 0.5, shape[axis]).astype(pdt)
    beta = rng.normal(0, 1, shape[axis]).astype(pdt)
    ref = reference_forward(x, gamma, beta, axis=axis)
    dy = probe_dy(ref, axis, dtype, rng)
    lo = sum(sizes[:comm.rank])
    part = slice(lo, lo + sizes[comm.rank])
    rm, rv = np.zeros(shape[axis], pdt), np.ones(shape[axis], pdt)
    y, saved = cupybn.batch_norm(x[part], gamma, beta, running_mean=rm, running_var=rv, axis=axis, comm=comm)
    dx, dgamma, dbeta = cupybn.batch_norm_backward(dy[part], saved)
    return dict(x=x, dy=dy, ref=ref, gamma=gamma, y=y, dx=dx, dgamma=dgamma, dbeta=dbeta, rm=rm, rv=rv,
                stats=digest(saved.mean, saved.mean_lo, saved.var, saved.inv_std, rm, rv))


def check_case(mpi, comm, shape, axis, dtype, sizes, seed) -> None:
    first = run_case(comm, shape, axis, dtype, sizes, seed)
    again = run_case(comm, shape, axis, dtype, sizes, seed)
    label = f"{shape} axis={axis} {np.dtype(dtype).name} split={sizes}"
    mine = digest(first["y"], first["dx"], first["dgamma"], first["dbeta"], first["stats"].encode())
    if mine != digest(again["y"], again["dx"], again["dgamma"], again["dbeta"], again["stats"].encode()):
        raise AssertionError(f"{label}: a second run gave other bits on rank {comm.rank}")
    stats = mpi.allgather(first["stats"])
    if len(set(stats)) != 1:
        raise AssertionError(f"{label}: the ranks hold different statistics: {stats}")
    parts = mpi.gather((first["y"], first["dx"], first["dgamma"], first["dbeta"]), root=0)
    if comm.rank != 0:
        return
    y = np.concatenate([p[0] for p in parts])
    dx = np.concatenate([p[1] for p in parts])
    dgamma = np.sum([p[2].astype(np.float64) for p in parts], axis=0)  # data-parallel gradient sum
    dbeta = np.sum([p[3].astype(np.float64) for p in parts], axis=0)
    ref = first["ref"]
    ref_grads = reference_backward(first["dy"], ref, first["gamma"], axis=axis)
    # the var reported is that of the statistics every rank holds (float32 for float32 data)
    errors = batch_norm_errors(y, None, (dx, dgamma, dbeta), ref, ref_grads)
    want_mean, want_var = running_stats_update(np.zeros(1), np.ones(1), ref, 0.1)
    errors["var"] = float(np.max(np.abs(first["rv"] - want_var) / want_var))
    errors["y"] = max(errors["y"], float(np.max(np.abs(first["rm"] - want_mean) / np.maximum(1, abs(want_mean)))))
    over = exceeded(errors, tolerance(dtype))
    if over:
        raise AssertionError(f"{label}: errors {over} above {tolerance(dtype)}")


BAD = {  # what differs on the last rank, and what every rank's error must say
    "channels": (lambda x: x[:, :2], "disagree on channels"),
    "dtype": (lambda x: x.astype(np.float64), "disagree on dtype"),
    "bad argument": (lambda x: x.tolist(), "x must be a NumPy or CuPy array"),
}


def check_bad_inputs(comm) -> int:
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    checks = 0
    for name, (change, message) in BAD.items():
        mine = change(x) if comm.rank == comm.size - 1 and comm.size > 1 else x
        rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
        try:
            stats = dict(running_mean=rm, running_var=rv) if mine is x else {}  # the others' are checked
            cupybn.batch_norm(mine, comm=comm, **stats)
        except (TypeError, ValueError) as error:
            if comm.size > 1 and message not in str(error):
                raise AssertionError(f"{name}: rank {comm.rank} raised {error!r}") from error
            if rm.any() or not (rv == 1).all():
                raise AssertionError(f"{name}: rank {comm.rank} changed its running statistics") from error
            checks += 1
            continue
        if comm.size > 1:
            raise AssertionError(f"{name}: rank {comm.rank} did not raise")
    # a whole batch of one value per channel: every rank raises, whatever the world size
    try:
        cupybn.batch_norm(x[:1] if comm.rank == 0 else x[:0], comm=comm)
    except ValueError as error:
        if "at least 2 values per channel over all ranks" not in str(error):
            raise
        checks += 1
    else:
        raise AssertionError(f"a batch of one value: rank {comm.rank} did not raise")
    # backward with a bad dy on rank 0
    _, saved = cupybn.batch_norm(x, comm=comm)
    try:
        cupybn.batch_norm_backward(x[:1] if comm.rank == 0 else x, saved)
    except ValueError as error:
        if "dy must have the shape of x" not in str(error):
            raise
        checks += 1
    else:
        raise AssertionError(f"a bad dy on rank 0: rank {comm.rank} did not raise")
    return checks


def main() -> int:
    comm = MPI()
    mpi = comm.comm
    splits = SPLITS[comm.size]
    checks = 0
    for c, (shape, axis, dtype) in enumerate(CASES):
        for s, sizes in enumerate(splits):
            check_case(mpi, comm, shape, axis, dtype, sizes, seed=100 * c + s)
            checks += 1
    checks += check_bad_inputs(comm)
    mpi.Barrier()
    print(f"RANK {comm.rank} OK {checks} collectives={comm.collectives} bytes={comm.bytes_sent}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
