"""Synchronised BN's statistics exchange (cupybn/distributed/_merge.py): any split of a
batch over ranks, empty and one-value shards included, merges to the statistics of
the whole batch; the merge is a fixed function of the gathered data (identical bits
on every rank); ranks that disagree make every rank raise the same error."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cupybn.distributed import _merge


def shard_moments(x):
    """What a rank contributes for its (n, C) shard: count, the mean as a float32 hi/lo
    pair (as the float32 backends return it) and the sum of squared deviations."""
    n = x.shape[0]
    if n == 0:
        zeros = np.zeros(x.shape[1])
        return 0, zeros, zeros, zeros
    mean = x.mean(axis=0)
    hi = mean.astype(np.float32)
    lo = (mean - hi).astype(np.float32)
    return n, hi, lo, ((x - mean) ** 2).sum(axis=0)


def packed(shards, **header):
    settings = {"dtype": "float32", "axis": 1, "training": True, **header}
    vectors = []
    for s in shards:
        count, hi, lo, m2 = shard_moments(s)
        body = (hi, lo, m2) if settings["training"] else ()
        vectors.append(_merge.pack(_merge.STATISTICS, count, body, channels=s.shape[1], **settings))
    return vectors


splits = st.lists(st.integers(0, 6), min_size=1, max_size=6).filter(lambda sizes: sum(sizes) >= 2)


@given(sizes=splits, channels=st.integers(1, 4), offset=st.sampled_from([0.0, 1e3, 1e6]),
       seed=st.integers(0, 2**16))
def test_any_split_merges_to_the_whole_batchs_statistics(sizes, channels, offset, seed):
    rng = np.random.default_rng(seed)
    x = offset + rng.standard_normal((sum(sizes), channels))
    shards = np.split(x, np.cumsum(sizes)[:-1])
    merged = _merge.merge(packed(shards))
    assert merged.count == x.shape[0]
    std = x.std(axis=0) + 1e-300
    # the float32 hi/lo pair carries the mean to ~2**-48 of the offset: 4e-9 std at 1e6
    assert np.all(np.abs(merged.mean - x.mean(axis=0)) <= 1e-8 * np.maximum(std, 1.0))
    assert np.allclose(merged.var, x.var(axis=0), rtol=1e-7, atol=1e-12)


@given(sizes=splits, seed=st.integers(0, 2**16))
def test_empty_shards_change_no_bit_and_the_same_gathered_data_give_the_same_bits(sizes, seed):
    rng = np.random.default_rng(seed)
    x = 10.0 + rng.standard_normal((sum(sizes), 3))
    shards = np.split(x, np.cumsum(sizes)[:-1])
    with_empties = [x[:0], *[s for shard in shards for s in (shard, x[:0])]]
    a, b = _merge.merge(packed(shards)), _merge.merge(packed(with_empties))
    assert a.count == b.count and a.mean.tobytes() == b.mean.tobytes() and a.m2.tobytes() == b.m2.tobytes()
    again = _merge.merge(packed(shards))
    assert a.mean.tobytes() == again.mean.tobytes() and a.m2.tobytes() == again.m2.tobytes()


@pytest.mark.parametrize("field, other, message", [
    ("dtype", {"dtype": "float64"}, "disagree on dtype (rank 0: float32, rank 1: float64)"),
    ("axis", {"axis": 3}, "disagree on axis (rank 0: 1, rank 1: 3)"),
    ("training", {"training": False}, "disagree on training (rank 0: True, rank 1: False)"),
])
def test_ranks_that_disagree_raise_the_same_error_naming_what_differs(field, other, message):
    x = np.random.default_rng(0).standard_normal((6, 2))
    gathered = [packed([x[:3]])[0], packed([x[3:]], **other)[0]]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _merge.merge(gathered)


def test_ranks_with_other_channel_counts_raise():
    gathered = packed([np.ones((3, 2))]) + packed([np.ones((3, 4))])
    with pytest.raises(ValueError, match=r"disagree on channels \(rank 0: 2, rank 1: 4\)"):
        _merge.merge(gathered)


@pytest.mark.parametrize("sizes", [(0, 0), (1, 0), (0, 1, 0)])
def test_a_whole_batch_of_fewer_than_two_values_raises_on_every_rank(sizes):
    x = np.ones((sum(sizes), 2))
    with pytest.raises(ValueError, match="at least 2 values per channel over all ranks"):
        _merge.merge(packed(np.split(x, np.cumsum(sizes)[:-1])))


def test_a_rank_that_failed_makes_every_rank_raise_with_its_message():
    gathered = packed([np.ones((3, 2))]) + [_merge.pack_failure(_merge.STATISTICS, TypeError("gamma is bad"))]
    with pytest.raises(ValueError, match=r"1 of 2 ranks could not take part in the forward \(statistics\) exchange"
                                         r".*rank 1: TypeError: gamma is bad"):
        _merge.merge(gathered)


def test_ranks_at_different_calls_raise_instead_of_mixing_forward_and_backward_data():
    sums = _merge.pack(_merge.GRADIENTS, 3, (np.ones(2), np.ones(2)), channels=2, dtype="float32", axis=1,
                       training=True)
    with pytest.raises(ValueError, match=r"disagree on phase \(rank 0: forward \(statistics\), rank 1: backward"):
        _merge.merge(packed([np.ones((3, 2))]) + [sums])


@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_gradient_sums_are_added_in_rank_order(sizes, seed):
    rng = np.random.default_rng(seed)
    parts = [(rng.standard_normal(3) * 1e8 ** rng.random(), rng.standard_normal(3)) for _ in sizes]
    gathered = [_merge.pack(_merge.GRADIENTS, n, p, channels=3, dtype="float32", axis=1, training=True)
                for n, p in zip(sizes, parts, strict=True)]
    sum_dy, sum_dyc = _merge.add_gradient_sums(gathered)
    want_dy, want_dyc = np.zeros(3), np.zeros(3)
    for a, b in parts:  # left to right: the bits are fixed by the rank order
        want_dy, want_dyc = want_dy + a, want_dyc + b
    assert sum_dy.tobytes() == want_dy.tobytes() and sum_dyc.tobytes() == want_dyc.tobytes()


def exact_pair(values):
    """The mean of ``values`` as an exact Fraction and as the nearest float64 pair."""
    from fractions import Fraction

    exact = sum(map(Fraction, values)) / len(values)
    hi = float(exact)
    return exact, hi, float(exact - Fraction(hi))


@given(sizes=splits, offset=st.sampled_from([1e6, 1e9, 1e12]), seed=st.integers(0, 2**16))
def test_the_merged_mean_pair_carries_float64_data_beyond_float64(sizes, offset, seed):
    # float64 data far from zero: the mean needs more than a float64 to be exact
    # to the data's spread, and the merge must carry it as a pair
    from fractions import Fraction

    x = offset + np.random.default_rng(seed).standard_normal(sum(sizes))
    vectors = []
    for shard in np.split(x, np.cumsum(sizes)[:-1]):
        if shard.size == 0:
            vectors.append(_merge.pack(_merge.STATISTICS, 0, [np.zeros(1)] * 3, channels=1, dtype="float64",
                                       axis=1, training=True))
            continue
        _, hi, lo = exact_pair(shard)
        m2 = float(sum((Fraction(v) - Fraction(hi) - Fraction(lo)) ** 2 for v in shard))
        vectors.append(_merge.pack(_merge.STATISTICS, shard.size, ([hi], [lo], [m2]), channels=1, dtype="float64",
                                   axis=1, training=True))
    merged = _merge.merge(vectors)
    exact, _, _ = exact_pair(x)
    error = abs(Fraction(merged.mean[0]) + Fraction(merged.mean_lo[0]) - exact)
    assert error <= 1e-14 * max(float(np.std(x)), 1e-3)
