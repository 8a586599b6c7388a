"""What synchronised Batch Normalization exchanges, and how it is merged.

Every call sends, from every rank, one float64 vector through one all-gather:

    header  [FORMAT, phase, channels, dtype code, axis, training, eps, momentum,
             gamma given, beta given, running statistics given, count]
    body    statistics phase (training):   mean_hi, mean_lo, m2   (C values each)
            statistics phase (inference):  nothing
            gradient phase:                sum_dy, sum_dyc         (C values each)

``count`` is the rank's number of values per channel (0 for an empty shard),
``mean_hi + mean_lo`` its per-channel mean (the backends' hi/lo pair, widened to
float64), ``m2`` its sum of squared deviations from that mean, ``sum_dy`` and
``sum_dyc`` its ``sum(dy)`` and ``sum(dy * (x - mean_hi))`` about the merged mean.

Every rank merges the gathered vectors in rank order, never in the order an
all-reduce would add them (MPI implementations do not fix it), so every rank
computes identical bits.  A rank that could not take part (its arguments failed
the checks) sends a failure vector instead, its error message as bytes; then, as
when the headers disagree (phase, channels, dtype, axis or mode), every rank
raises the same ValueError after the one collective and none is left waiting.
The settings that shape the results (eps, momentum, which of gamma, beta and the
running statistics are given) travel in the header too: ranks that differ there
would otherwise compute different statistics without a word.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT = 3.0  # bumped when the layout of the vector changes
HEADER = ("format", "phase", "channels", "dtype", "axis", "training", "eps", "momentum", "gamma", "beta", "running",
          "count")
# what every rank must agree on, in the order the checks name them
AGREED = HEADER[:-1]
_FLAGS = ("gamma", "beta", "running")
STATISTICS, GRADIENTS = 1.0, 2.0
PHASES = {STATISTICS: "forward (statistics)", GRADIENTS: "backward (gradient sums)"}
DTYPE_CODES = {"float16": 1.0, "bfloat16": 2.0, "float32": 3.0, "float64": 4.0}
_FAILED = -1.0  # in the channels slot: the rest of the vector is an error message
_MESSAGE_BYTES = 400


def pack(phase: float, count: int, body, *, channels: int, dtype: str, axis: int, training: bool, eps: float = 0.0,
         momentum: float = 0.0, gamma: bool = False, beta: bool = False, running: bool = False) -> np.ndarray:
    """One rank's contribution: its header and per-channel vectors as one float64 vector."""
    parts = [np.asarray(a, np.float64).ravel() for a in body]
    if any(p.shape != (channels,) for p in parts):
        raise ValueError(f"every per-channel vector must have {channels} values, got shapes "
                         f"{[p.shape for p in parts]}")
    header = [FORMAT, phase, channels, DTYPE_CODES[dtype], axis, float(training), eps, momentum, float(gamma),
              float(beta), float(running), count]
    return np.concatenate([np.asarray(header, np.float64), *parts])


def pack_failure(phase: float, error: BaseException, max_bytes: int = _MESSAGE_BYTES) -> np.ndarray:
    """The vector of a rank whose call failed before the exchange: its error, as
    (at most ``max_bytes``) bytes."""
    message = f"{type(error).__name__}: {error}".encode()[:max_bytes]
    header = [FORMAT, phase, _FAILED] + [0.0] * (len(HEADER) - 3)
    return np.concatenate([np.asarray(header, np.float64), np.frombuffer(message, np.uint8).astype(np.float64)])


@dataclass(frozen=True)
class Merged:
    """Statistics of the whole batch: ``count`` values per channel, their mean as a
    float64 pair ``mean + mean_lo`` (float64 data need more than float64 carries at
    large offsets) and ``m2``; ``var`` is the biased variance ``m2 / count``."""

    count: int
    mean: np.ndarray
    mean_lo: np.ndarray
    m2: np.ndarray

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.count


def _two_sum(a, b):
    """``a + b`` as ``(s, e)`` with ``s + e`` exact (Knuth)."""
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


def _checked(gathered, phase: float) -> tuple[list[np.ndarray], list[dict]]:
    """The gathered vectors and their headers, once every rank took part and they agree."""
    vectors = [np.asarray(v, np.float64).ravel() for v in gathered]
    headers = []
    for rank, vector in enumerate(vectors):
        if vector.size < len(HEADER):
            raise ValueError(f"synchronised batch_norm: rank {rank} sent {vector.size} values, fewer than a header")
        headers.append(dict(zip(HEADER, (float(v) for v in vector[:len(HEADER)]), strict=True)))
    failed = [rank for rank, h in enumerate(headers) if h["channels"] == _FAILED]
    if failed:
        reasons = "; ".join(
            f"rank {r}: " + bytes(vectors[r][len(HEADER):].astype(np.uint8)).decode(errors="replace")
            for r in failed)
        raise ValueError(f"synchronised batch_norm: {len(failed)} of {len(vectors)} ranks could not take part in "
                         f"the {PHASES.get(headers[failed[0]]['phase'], 'unknown')} exchange, so no rank went on "
                         f"({reasons})")
    names = {v: k for k, v in DTYPE_CODES.items()}
    for field in AGREED:
        values = [h[field] for h in headers]
        if len(set(values)) > 1:
            shown: list
            if field == "phase":
                shown = [PHASES.get(v, v) for v in values]
            elif field == "dtype":
                shown = [names.get(v, v) for v in values]
            elif field == "training":
                shown = [bool(v) for v in values]
            elif field in _FLAGS:
                shown = ["given" if v else "None" for v in values]
            elif field in ("eps", "momentum"):
                shown = values
            else:
                shown = [int(v) for v in values]
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            what = "call" if field == "phase" else field + (" (given or None)" if field in _FLAGS else "")
            raise ValueError(f"synchronised batch_norm: the ranks disagree on {field} ({per_rank}); every rank "
                             f"must make the same {what}" + (" in the same order" if field == "phase" else ""))
    if headers[0]["phase"] != phase:
        raise ValueError(f"synchronised batch_norm: this rank is in the {PHASES[phase]} exchange, the others in "
                         f"the {PHASES.get(headers[0]['phase'], 'unknown')} one")
    channels = int(headers[0]["channels"])
    width = len(HEADER) + (2 if phase == GRADIENTS else 3 * bool(headers[0]["training"])) * channels
    for rank, vector in enumerate(vectors):
        if vector.size != width:
            raise ValueError(f"synchronised batch_norm: rank {rank} sent {vector.size} values, expected {width}")
    return vectors, headers


def merge(gathered, *, min_count: int = 2) -> Merged:
    """The statistics vectors (index = rank) merged in rank order.

    Raises ValueError, the same on every rank (it depends on the gathered data
    only), when a rank failed, when the ranks disagree, or when the whole batch
    has fewer than ``min_count`` values per channel."""
    vectors, headers = _checked(gathered, STATISTICS)
    channels = int(headers[0]["channels"])
    total = 0
    mean = mean_lo = m2 = np.zeros(channels)
    for header, vector in zip(headers, vectors, strict=True):
        n = int(header["count"])
        if n == 0:
            continue
        body = vector[len(HEADER):]
        hi_r, lo_r, m2_r = body[:channels], body[channels:2 * channels], body[2 * channels:]
        if total == 0:
            total, (mean, mean_lo), m2 = n, _two_sum(hi_r, lo_r), m2_r.copy()
            continue
        # Chan, Golub and LeVeque's pairwise update, in float64, the mean carried as a pair
        combined = total + n
        d_hi, d_lo = _two_sum(hi_r, -mean)
        delta = d_hi + (d_lo + (lo_r - mean_lo))
        mean, carry = _two_sum(mean, delta * (n / combined))
        mean, mean_lo = _two_sum(mean, mean_lo + carry)
        m2 = m2 + m2_r + delta * delta * (total * n / combined)
        total = combined
    if total < min_count:
        raise ValueError(f"synchronised batch_norm in training needs at least {min_count} values per channel over "
                         f"all ranks to estimate a variance; the whole batch has {total}")
    return Merged(total, mean, mean_lo, m2)


def check_agreement(gathered) -> None:
    """An inference call's exchange: only that every rank took part and agrees."""
    _checked(gathered, STATISTICS)


def add_gradient_sums(gathered) -> tuple[np.ndarray, np.ndarray]:
    """The gradient vectors (index = rank): ``sum_dy`` and ``sum_dyc`` of the whole
    batch, added in rank order."""
    vectors, headers = _checked(gathered, GRADIENTS)
    channels = int(headers[0]["channels"])
    sum_dy = np.zeros(channels)
    sum_dyc = np.zeros(channels)
    for vector in vectors:
        body = vector[len(HEADER):]
        sum_dy = sum_dy + body[:channels]
        sum_dyc = sum_dyc + body[channels:]
    return sum_dy, sum_dyc
