"""Synchronised Batch Normalization (``comm=``), with ranks as threads (ThreadWorld):
any split of a batch over ranks, empty and one-value shards included, gives what one
process gives on the whole batch, to the exactness bar; every rank holds identical
bits, from run to run; bad input on any rank makes every rank raise, changes nothing
and leaves no rank waiting; one exchange per forward and one per backward."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cupybn
from cupybn.distributed import ThreadWorld
from cupybn.testing import (
    batch_norm_errors,
    exceeded,
    probe_dy,
    reference_backward,
    reference_forward,
    running_stats_update,
    tolerance,
)
from cupybn.testing.strategies import batch_norm_inputs

# A rank that is not there within this many seconds breaks the exchange (a failed test, not a hung one).
TIMEOUT = 60


@st.composite
def splits(draw, total: int):
    """Cut points of ``total`` rows over 1-4 ranks; empty shards allowed."""
    ranks = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=ranks - 1, max_size=ranks - 1)))
    return [0, *cuts, total]


def shards(a, cuts, split_axis):
    index = [slice(None)] * a.ndim
    out = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        index[split_axis] = slice(lo, hi)
        out.append(a[tuple(index)])
    return out


def run_ranks(cuts, fn, timeout=TIMEOUT):
    """``fn(comm, rank)`` on every rank of a ThreadWorld of ``len(cuts) - 1`` ranks."""
    return ThreadWorld(len(cuts) - 1, timeout=timeout).run(lambda comm: fn(comm, comm.rank))


def same_bits(arrays) -> bool:
    return all(np.asarray(a).tobytes() == np.asarray(arrays[0]).tobytes() for a in arrays)


def synchronised_step(inputs, dy, cuts, split_axis, backend, momentum=0.1):
    """Forward and backward on every rank's shard; per rank: y, dx, dgamma, dbeta,
    saved and the running statistics (which start at 0 and 1 on every rank)."""
    x, gamma, beta, axis = inputs.x, inputs.gamma, inputs.beta, inputs.axis
    channels = x.shape[axis]
    pdt = np.float64 if x.dtype == np.float64 else np.float32

    def rank(comm, r):
        rm, rv = np.zeros(channels, pdt), np.ones(channels, pdt)
        xs, dys = shards(x, cuts, split_axis)[r], shards(dy, cuts, split_axis)[r]
        y, saved = cupybn.batch_norm(xs, gamma, beta, running_mean=rm, running_var=rv, momentum=momentum,
                                     eps=inputs.eps, axis=axis, backend=backend, comm=comm)
        dx, dgamma, dbeta = cupybn.batch_norm_backward(dys, saved)
        return dict(y=y, dx=dx, dgamma=dgamma, dbeta=dbeta, saved=saved, rm=rm, rv=rv)

    return run_ranks(cuts, rank)


def param_sum(results, name):
    parts = [r[name] for r in results]
    return None if parts[0] is None else np.sum([np.asarray(p, np.float64) for p in parts], axis=0)


@given(inputs=batch_norm_inputs(dtype_names=("float32", "float16", "float64"), max_rank=4,
                                params=("both", "gamma", "none"), min_count=16), data=st.data())
def test_any_split_gives_the_whole_batchs_results_to_the_exactness_bar(backend, inputs, data):
    x, axis = inputs.x, inputs.axis
    split_axis = 0 if axis % x.ndim != 0 else 1
    cuts = data.draw(splits(x.shape[split_axis]), label="cuts")
    ref = reference_forward(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps)
    dy = probe_dy(ref, axis, x.dtype, np.random.default_rng(inputs.seed))
    ranks = synchronised_step(inputs, dy, cuts, split_axis, backend)

    y = np.concatenate([r["y"] for r in ranks], axis=split_axis)
    dx = np.concatenate([r["dx"] for r in ranks], axis=split_axis)
    grads = (dx, param_sum(ranks, "dgamma"), param_sum(ranks, "dbeta"))
    ref_grads = reference_backward(dy, ref, inputs.gamma, axis=axis)
    errors = batch_norm_errors(y, ranks[0]["saved"].var, grads, ref, ref_grads)
    tol = tolerance(x.dtype)
    over = exceeded(errors, tol)
    assert not over, f"cuts {cuts}: errors {over} above {tol}"
    want_mean, want_var = running_stats_update(np.zeros(1), np.ones(1), ref, 0.1)
    assert np.max(np.abs(ranks[0]["rm"] - want_mean) / np.maximum(1, np.abs(want_mean))) <= tol.y
    assert np.max(np.abs(ranks[0]["rv"] - want_var) / want_var) <= tol.var
    # every rank holds the same statistics, bit for bit
    for name in ("mean", "mean_lo", "var", "inv_std"):
        assert same_bits([getattr(r["saved"], name) for r in ranks]), name
    assert same_bits([r["rm"] for r in ranks]) and same_bits([r["rv"] for r in ranks])
    assert all(r["saved"].total_count == ref.m for r in ranks)


@pytest.mark.parametrize("sizes", [(4, 0, 1, 7), (0, 12), (1, 1), (12,)])
def test_the_same_split_gives_the_same_bits_on_every_run(backend, sizes):
    rng = np.random.default_rng(7)
    x = (1e4 + rng.standard_normal((sum(sizes), 3, 5))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    inputs = type("Inputs", (), dict(x=x, gamma=np.full(3, 2, np.float32), beta=np.ones(3, np.float32), axis=1,
                                     eps=1e-5))
    cuts = [0, *np.cumsum(sizes)]
    first, again = (synchronised_step(inputs, dy, cuts, 0, backend) for _ in range(2))
    for a, b in zip(first, again, strict=True):
        for name in ("y", "dx", "dgamma", "dbeta", "rm", "rv"):
            assert a[name].tobytes() == b[name].tobytes(), name


def test_each_call_is_one_exchange_of_a_few_values_per_channel():
    x = np.random.default_rng(0).standard_normal((8, 5, 3)).astype(np.float32)

    def rank(comm, r):
        y, saved = cupybn.batch_norm(x[4 * r:4 * r + 4], comm=comm)
        after_forward = (comm.collectives, comm.bytes_sent)
        cupybn.batch_norm_backward(np.ones_like(y), saved)
        return after_forward, (comm.collectives, comm.bytes_sent)

    for forward, both in run_ranks([0, 4, 8], rank):
        assert forward == (1, 8 * (12 + 3 * 5))  # a header of 12 values, then mean hi/lo and m2
        assert both == (2, forward[1] + 8 * (12 + 2 * 5))  # the header, then the two gradient sums


def test_dgamma_and_dbeta_are_each_ranks_own_sums():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 2)).astype(np.float64)
    dy = rng.standard_normal(x.shape)
    gamma, beta = np.ones(2), np.zeros(2)
    y, saved = cupybn.batch_norm(x, gamma, beta)

    def rank(comm, r):
        part = slice(0, 3) if r == 0 else slice(3, 10)
        _, s = cupybn.batch_norm(x[part], gamma, beta, comm=comm)
        return cupybn.batch_norm_backward(dy[part], s)

    ranks = run_ranks([0, 3, 10], rank)
    x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(ranks[0][1], (dy[:3] * x_hat[:3]).sum(0), rtol=1e-12)
    np.testing.assert_allclose(ranks[1][2], dy[3:].sum(0), rtol=1e-12)


def test_inference_exchanges_only_to_check_that_the_ranks_agree():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    want, _ = cupybn.batch_norm(x, running_mean=rm, running_var=rv, training=False)

    def rank(comm, r):
        y, _ = cupybn.batch_norm(x[3 * r:3 * r + 3], running_mean=rm, running_var=rv, training=False, comm=comm)
        return y, comm.bytes_sent

    ranks = run_ranks([0, 3, 6], rank)
    assert np.concatenate([y for y, _ in ranks]).tobytes() == want.tobytes()
    assert all(sent == 8 * 12 for _, sent in ranks)  # a header, no statistics


# ---- bad input: every rank raises, within the time-out, and nothing changes ------------------
def every_rank_raises(make_args, match, backward_dy=None):
    """Run a forward (and, with ``backward_dy``, a backward) on 3 ranks whose arguments
    come from ``make_args(rank)``; every rank must raise ValueError or TypeError matching
    ``match`` (its own error, or the report of another rank's), with its running
    statistics unchanged."""
    def rank(comm, r):
        args, kwargs = make_args(r)
        rm, rv = kwargs.get("running_mean", np.zeros(0)), kwargs.get("running_var", np.zeros(0))
        before = (rm.copy(), rv.copy())
        try:
            if backward_dy is None:
                cupybn.batch_norm(*args, comm=comm, **kwargs)
            else:
                _, saved = cupybn.batch_norm(*args, comm=comm, **kwargs)
                cupybn.batch_norm_backward(backward_dy(r, saved), saved)
        except Exception as error:
            changed = backward_dy is None and not (np.array_equal(rm, before[0]) and np.array_equal(rv, before[1]))
            return str(error), changed
        return None, False

    outcomes = run_ranks([0, 1, 2, 3], rank, timeout=20)
    for r, (message, changed) in enumerate(outcomes):
        assert message is not None, f"rank {r} did not raise"
        expected = match(r) if callable(match) else match
        assert expected in message, f"rank {r}: {message}"
        assert not changed, f"rank {r} changed its running statistics"
    return [m for m, _ in outcomes]


def stats(channels=3):
    return dict(running_mean=np.zeros(channels, np.float32), running_var=np.ones(channels, np.float32))


X = np.arange(24, dtype=np.float32).reshape(4, 3, 2)

# rank -> (positional arguments, keyword arguments) of its forward call, and what every rank's error says
MISMATCHES = {
    "channels": (lambda r: ((X[:, :2] if r == 0 else X,), stats(2 if r == 0 else 3)),
                 "disagree on channels (rank 0: 2, rank 1: 3, rank 2: 3)"),
    "dtype": (lambda r: ((X.astype(np.float64) if r == 2 else X,), stats()),
              "disagree on dtype (rank 0: float32, rank 1: float32, rank 2: float64)"),
    "axis": (lambda r: ((X.transpose(0, 2, 1) if r == 0 else X,), {**stats(), "axis": 2 if r == 0 else 1}),
             "disagree on axis (rank 0: 2, rank 1: 1, rank 2: 1)"),
    "mode": (lambda r: ((X,), {**stats(), "training": r != 1}),
             "disagree on training (rank 0: True, rank 1: False, rank 2: True)"),
    "one value in all": (lambda r: ((X[:1, :, :1] if r == 0 else X[:0],), stats()),
                         "at least 2 values per channel over all ranks to estimate a variance; the whole batch has 1"),
    "eps": (lambda r: ((X,), {**stats(), "eps": 1e-3 if r == 1 else 1e-5}),
            "disagree on eps (rank 0: 1e-05, rank 1: 0.001, rank 2: 1e-05)"),
    "momentum": (lambda r: ((X,), {**stats(), "momentum": 0.5 if r == 2 else 0.1}), "disagree on momentum"),
    "gamma on some ranks": (lambda r: ((X, np.ones(3, np.float32) if r else None), stats()),
                            "disagree on gamma (rank 0: None, rank 1: given, rank 2: given)"),
    "running statistics on some ranks": (lambda r: ((X,), stats() if r else {}), "disagree on running"),
    "bad argument on one rank": (lambda r: ((X, np.ones(4 if r == 1 else 3, np.float32)), stats()),
                                 "rank 1: ValueError: gamma must have shape (3,)"),
    "not a backend on one rank": (lambda r: ((X,), {**stats(), "backend": "numpy" if r == 0 else None}),
                                  "rank 0: TypeError: backend must be a cupybn backend"),
    "backend failing on one rank": (lambda r: ((X,), {**stats(), "backend": FailingBackend() if r == 1 else None}),
                                    "rank 1: MemoryError: no memory left on this rank"),
    "not an array on one rank": (lambda r: ((X.tolist() if r == 2 else X,), stats()),
                                 "rank 2: TypeError: x must be a NumPy or CuPy array"),
}


class FailingBackend(cupybn.NumpyBackend):
    """Fails in its own work before the exchange, as a rank out of memory would."""

    def shard_moments(self, x3):
        raise MemoryError("no memory left on this rank")


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_mismatch_on_any_rank_makes_every_rank_raise_the_same_error(case):
    make_args, match = MISMATCHES[case]
    if case.endswith("on one rank"):  # that rank raises its own error; the others report it
        failing, own = int(match.split()[1].rstrip(":")), match.split(": ", 2)[2]
        every_rank_raises(make_args, lambda r: own if r == failing else match)
    else:
        assert len(set(every_rank_raises(make_args, match))) == 1


def test_a_bad_dy_on_one_rank_makes_every_rank_raise_in_backward():
    def dy(r, saved):
        return np.ones((1, 1), np.float32) if r == 1 else np.ones(saved.shape, np.float32)

    every_rank_raises(lambda r: ((X[r:r + 2],), stats()),
                      lambda r: "dy must have the shape of x" if r == 1 else "rank 1: ValueError: dy must have", dy)


def test_a_dy_that_is_not_an_array_on_one_rank_makes_every_rank_raise_in_backward():
    def dy(r, saved):
        return None if r == 2 else np.ones(saved.shape, np.float32)

    every_rank_raises(lambda r: ((X[r:r + 2],), stats()),
                      lambda r: "dy must be a NumPy or CuPy array" if r == 2 else "rank 2: TypeError: dy must be", dy)


def test_a_layer_given_something_else_than_an_array_on_one_rank_makes_every_rank_raise():
    def rank(comm, r):
        layer = cupybn.BatchNorm(3, comm=comm)
        with pytest.raises(TypeError if r == 1 else ValueError, match="x must be a NumPy or CuPy array"):
            layer(X.tolist() if r == 1 else X)
        return layer.running_mean.tolist(), layer.num_batches_tracked

    assert run_ranks([0, 1, 2, 3], rank, timeout=20) == [([0.0, 0.0, 0.0], 0)] * 3


def test_an_empty_shard_of_an_inference_call_gives_empty_gradients():
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)

    def rank(comm, r):
        y, saved = cupybn.batch_norm(X[:0] if r == 0 else X, gamma, beta, running_mean=rm, running_var=rv,
                                     training=False, comm=comm)
        return cupybn.batch_norm_backward(np.ones_like(y), saved)

    (dx0, dg0, db0), (dx1, dg1, db1) = run_ranks([0, 1, 2], rank)
    assert dx0.shape == (0, 3, 2) and dg0.tolist() == db0.tolist() == [0.0] * 3 and dg0.dtype == np.float32
    assert dx1.shape == X.shape and db1.tolist() == [8.0] * 3


def test_x_changed_on_one_rank_makes_every_rank_raise_in_backward():
    def dy(r, saved):
        if r == 0:
            saved.x[...] += 1
        return np.ones(saved.shape, np.float32)

    every_rank_raises(lambda r: ((X[r:r + 2].copy(),), stats()), "x was changed in place", dy)


def test_a_rank_that_never_arrives_breaks_the_exchange_instead_of_hanging():
    import threading

    def rank(comm, r):
        if r == 1:
            return None  # never calls
        with pytest.raises(threading.BrokenBarrierError):
            cupybn.batch_norm(X, comm=comm)
        return "raised"

    assert ThreadWorld(2, timeout=0.5).run(lambda comm: rank(comm, comm.rank)) == ["raised", None]


def test_comm_must_be_a_communicator():
    with pytest.raises(TypeError, match="comm must be a cupybn.distributed communicator"):
        cupybn.batch_norm(X, comm=object())


def test_without_comm_an_empty_x_is_still_refused():
    with pytest.raises(ValueError, match="only a synchronised call, with comm, takes an empty shard"):
        cupybn.batch_norm(X[:0])


# ---- the layer ------------------------------------------------------------------------------
def test_a_synchronised_layer_trains_like_one_layer_on_the_whole_batch():
    rng = np.random.default_rng(3)
    batches = [(5 + 3 * rng.standard_normal((12, 4, 3))).astype(np.float32) for _ in range(3)]
    whole = cupybn.BatchNorm(4)
    for x in batches:
        whole(x)
        whole.backward(x - 5)
    whole_stats = (whole.running_mean.copy(), whole.running_var.copy())

    def rank(comm, r):
        layer = cupybn.BatchNorm(4, comm=comm)
        parts = slice(0, 5) if r == 0 else slice(5, 12)
        for x in batches:
            layer(x[parts])
            layer.backward(x[parts] - 5)
        return layer

    layers = run_ranks([0, 5, 12], rank)
    for layer in layers:
        np.testing.assert_allclose(layer.running_mean, whole_stats[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(layer.running_var, whole_stats[1], rtol=1e-6)
        assert layer.num_batches_tracked == 3
    assert same_bits([layer.running_mean for layer in layers])
    np.testing.assert_allclose(layers[0].grad_beta + layers[1].grad_beta, whole.grad_beta, rtol=1e-5)


# ---- the Figure 1 networks, data-parallel -----------------------------------------------------
def test_data_parallel_training_follows_the_single_process_curves():
    from cupybn.experiments import data as experiment_data
    from cupybn.experiments import figure1

    data = experiment_data.load_digits(0)
    settings = dict(steps=60, batch_size=30, eval_every=20)
    single = figure1.run(data, **settings)
    ranks = ThreadWorld(3).run(lambda comm: figure1.run(data, **settings, comm=comm))
    for curves in ranks:  # every rank has the same curves, bit for bit
        assert curves.accuracy == ranks[0].accuracy and curves.percentiles == ranks[0].percentiles
    for name in ("plain", "bn"):
        assert ranks[0].accuracy[name] == single.accuracy[name]
        np.testing.assert_allclose(ranks[0].percentiles[name], single.percentiles[name], atol=1e-4)


@pytest.mark.parametrize("batch_size, ranks", [(60, 4), (7, 3), (2, 2)])
def test_the_shards_of_a_batch_cover_it_once(batch_size, ranks):
    from cupybn.experiments.common import shard_of

    comms = [type("Comm", (), {"rank": r, "size": ranks}) for r in range(ranks)]
    rows = [list(range(batch_size))[shard_of(batch_size, c)] for c in comms]
    assert sum(rows, []) == list(range(batch_size))
    assert max(map(len, rows)) - min(map(len, rows)) <= 1
