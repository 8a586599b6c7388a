"""The statistics exchange of synchronised Batch Normalization: pack, then merge.

One all-gather per forward pass carries, from every rank, a float64 vector

    [FORMAT, channels, dtype code, axis, training, count,
     mean_hi (C values), mean_lo (C values), m2 (C values)]

where ``count`` is the rank's number of values per channel (0 for an empty
shard), ``mean_hi + mean_lo`` its per-channel mean (the backends' hi/lo pair,
widened to float64) and ``m2`` its per-channel sum of squared deviations from
that mean.  Every rank merges the gathered vectors in rank order (never in the
order an all-reduce would add them, which MPI implementations do not fix), so
that every rank computes identical bits.  Headers that disagree (channels, dtype,
axis or mode) make every rank raise the same error, after the one collective:
no rank is left waiting.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT = 1.0  # bumped when the layout of the vector changes
HEADER = ("format", "channels", "dtype", "axis", "training", "count")
DTYPE_CODES = {"float16": 1.0, "bfloat16": 2.0, "float32": 3.0, "float64": 4.0}


def pack(count: int, mean_hi, mean_lo, m2, *, dtype: str, axis: int, training: bool) -> np.ndarray:
    """One rank's contribution: its header and per-channel moments as one float64 vector."""
    mean_hi, mean_lo, m2 = (np.asarray(a, np.float64) for a in (mean_hi, mean_lo, m2))
    channels = mean_hi.shape[0]
    if mean_lo.shape != (channels,) or m2.shape != (channels,):
        raise ValueError(f"mean_hi, mean_lo and m2 must have one value per channel ({channels}), got shapes "
                         f"{mean_lo.shape} and {m2.shape}")
    header = [FORMAT, channels, DTYPE_CODES[dtype], axis, 1.0 if training else 0.0, count]
    return np.concatenate([np.asarray(header, np.float64), mean_hi, mean_lo, m2])


@dataclass(frozen=True)
class Merged:
    """Statistics of the whole batch: ``mean`` (float64), ``m2`` (float64), ``count``
    values per channel; ``var`` is the biased variance ``m2 / count``."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.count


def _headers(vectors) -> list[dict]:
    out = []
    for rank, vector in enumerate(vectors):
        if vector.ndim != 1 or vector.size < len(HEADER):
            raise ValueError(f"rank {rank} sent {vector.size} values, fewer than a header")
        out.append(dict(zip(HEADER, (float(v) for v in vector[:len(HEADER)]), strict=True)))
    return out


def merge(gathered, *, min_count: int = 2) -> Merged:
    """The gathered vectors (index = rank) merged in rank order.

    Raises ValueError, the same on every rank (it depends on the gathered data
    only), when the ranks disagree on format, channels, dtype, axis or mode, or
    when the whole batch has fewer than ``min_count`` values per channel."""
    vectors = [np.asarray(v, np.float64) for v in gathered]
    headers = _headers(vectors)
    names = {v: k for k, v in DTYPE_CODES.items()}
    for field in ("format", "channels", "dtype", "axis", "training"):
        values = [h[field] for h in headers]
        if len(set(values)) > 1:
            shown = [names.get(v, v) if field == "dtype" else (int(v) if field != "training" else bool(v))
                     for v in values]
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            raise ValueError(f"synchronised batch_norm: the ranks disagree on {field} ({per_rank}); every rank "
                             f"must call it with the same {field}")
    channels = int(headers[0]["channels"])
    width = len(HEADER) + 3 * channels
    for rank, vector in enumerate(vectors):
        if vector.size != width:
            raise ValueError(f"rank {rank} sent {vector.size} values, expected {width}")
    total = 0
    mean = np.zeros(channels)
    m2 = np.zeros(channels)
    for header, vector in zip(headers, vectors, strict=True):
        n = int(header["count"])
        if n == 0:
            continue
        body = vector[len(HEADER):]
        mean_r = body[:channels] + body[channels:2 * channels]
        m2_r = body[2 * channels:]
        if total == 0:
            total, mean, m2 = n, mean_r.copy(), m2_r.copy()
            continue
        # Chan, Golub and LeVeque's pairwise update, in float64
        combined = total + n
        delta = mean_r - mean
        mean = mean + delta * (n / combined)
        m2 = m2 + m2_r + delta * delta * (total * n / combined)
        total = combined
    if total < min_count:
        raise ValueError(f"synchronised batch_norm in training needs at least {min_count} values per channel over "
                         f"all ranks to estimate a variance; the whole batch has {total}")
    return Merged(total, mean, m2)
