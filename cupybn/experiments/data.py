"""The experiments' data: scikit-learn's 8x8 digits (bundled with scikit-learn,
no download) or MNIST files, as float32 images in [0, 1] with int64 labels."""
from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file or folder that is missing or not in the expected format."""


@dataclass
class Dataset:
    x_train: np.ndarray  # (n, features) float32 in [0, 1], images flattened row by row
    y_train: np.ndarray  # (n,) int64 labels 0..9
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    image_shape: tuple[int, int]  # (height, width) of one image

    def images(self, part: str) -> np.ndarray:
        """x_train or x_test ("train", "test") as (n, height, width, 1) channels-last images."""
        x = self.x_train if part == "train" else self.x_test
        return x.reshape(len(x), *self.image_shape, 1)


# ---- data ----------------------------------------------------------------------
def load_digits(seed: int = 0, held_out: int = 300) -> Dataset:
    """scikit-learn's 8x8 digits (shipped inside the package: no download),
    with a seeded held-out split."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits  # noqa: PLC0415
    except ImportError as exc:
        raise DataError("the bundled data set needs scikit-learn: pip install 'cupybn[demo]'") from exc
    bunch = sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:held_out], order[held_out:]
    return Dataset(x[train], y[train], x[test], y[test], "sklearn digits 8x8", (8, 8))


_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read as an IDX file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s)")
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path}: header says shape {dims}, but the file holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_mnist(path) -> Dataset:
    """MNIST from a folder with the four IDX files (gzipped or not) or an .npz
    with x_train, y_train, x_test, y_test."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder (expected a folder with the four MNIST IDX "
                        f"files or an .npz with x_train, y_train, x_test, y_test)")
    if path.is_dir():
        arrays = {}
        for key, stem in _IDX_FILES.items():
            found = [path / (stem + ext) for ext in ("", ".gz") if (path / (stem + ext)).is_file()]
            if not found:
                raise DataError(f"--data {path}: missing {stem} (or {stem}.gz)")
            arrays[key] = _read_idx(found[0], 3 if key.startswith("x") else 1)
    else:
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in _IDX_FILES if k not in npz.files]
                if missing:
                    raise DataError(f"--data {path}: the .npz lacks {', '.join(missing)}")
                arrays = {k: npz[k] for k in _IDX_FILES}
        except DataError:
            raise
        except (OSError, ValueError) as exc:
            raise DataError(f"--data {path}: not a readable .npz file ({exc})") from exc
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if len(x) != len(y) or len(x) == 0:
            raise DataError(f"--data {path}: x_{part} has {len(x)} images but y_{part} has {len(y)} labels")
        if y.min() < 0 or y.max() > 9:
            raise DataError(f"--data {path}: y_{part} labels must be 0..9")
    scale = 255.0 if arrays["x_train"].dtype == np.uint8 else 1.0

    def flat(a):
        return (a.reshape(len(a), -1) / scale).astype(np.float32)

    return Dataset(flat(arrays["x_train"]), arrays["y_train"].astype(np.int64),
                   flat(arrays["x_test"]), arrays["y_test"].astype(np.int64), f"MNIST from {path}",
                   _image_shape(path, arrays["x_train"], arrays["x_test"]))


def _image_shape(path, x_train, x_test) -> tuple[int, int]:
    """(height, width) of (n, height, width) images, or of square images stored flat as (n, side**2)."""
    if x_train.shape[1:] != x_test.shape[1:] or x_train.ndim not in (2, 3):
        raise DataError(f"--data {path}: x_train and x_test must hold images of one size, as (n, height, width) "
                        f"or (n, side**2), got {x_train.shape} and {x_test.shape}")
    if x_train.ndim == 3:
        return int(x_train.shape[1]), int(x_train.shape[2])
    side = math.isqrt(x_train.shape[1])
    if side * side != x_train.shape[1]:
        raise DataError(f"--data {path}: flat images of {x_train.shape[1]} values are not square: store them as "
                        f"(n, height, width)")
    return side, side
