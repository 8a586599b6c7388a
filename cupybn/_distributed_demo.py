"""What ``python -m cupybn demo --distributed`` adds to the demo: the MPI
communicator, one BLAS thread per rank, and the comparison with one process."""
from __future__ import annotations

import contextlib
import sys

import numpy as np

# The tolerance the README states for the data-parallel curves against one process.
ACCURACY_IMAGES = 1  # held-out images that may be classified differently at any evaluation
PERCENTILE_TOLERANCE = 1e-3  # on the sigmoid input's 15th/50th/85th percentiles


def communicator(args):
    """The MPI communicator, or exit 2 saying what to install."""
    try:
        from .distributed import MPI  # noqa: PLC0415

        return MPI()
    except ImportError as exc:
        print(f"error: --distributed: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


@contextlib.contextmanager
def one_blas_thread(comm):
    """One BLAS thread per rank: ranks that share the cores already use all of them,
    and BLAS threads spinning beside MPI's polling slowed the run 5x here.  Through
    threadpoolctl (scikit-learn, the demo's data, depends on it) where installed."""
    if comm is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def compare(distributed, single, test_images: int) -> str:
    """How far the data-parallel curves are from one process's, against the stated tolerance."""
    lines = []
    ok = True
    for name, label in (("plain", "without BN"), ("bn", "with BN")):
        accuracy = np.max(np.abs(np.subtract(distributed.accuracy[name], single.accuracy[name])))
        percentiles = np.max(np.abs(np.subtract(distributed.percentiles[name], single.percentiles[name])))
        images = round(accuracy * test_images)
        ok = ok and images <= ACCURACY_IMAGES and percentiles <= PERCENTILE_TOLERANCE
        lines.append(f"  {label:<11} held-out accuracy differs by at most {images} image(s) of {test_images}; "
                     f"sigmoid-input percentiles by at most {percentiles:.2e}")
    verdict = ("within" if ok else "OUTSIDE") + (f" the tolerance ({ACCURACY_IMAGES} image, {PERCENTILE_TOLERANCE:g} "
                                                 f"on the percentiles)")
    return "\n".join(["data-parallel against one process, over every evaluation:", *lines, f"  {verdict}"])
