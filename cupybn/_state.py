"""A layer's state as a dict under PyTorch's names, and Keras's weights in that form.

``BatchNorm.state_dict()`` / ``load_state_dict()`` use these.  The names are
``torch.nn.BatchNorm*d``'s, so a PyTorch state dict loads as it is; values may
be NumPy or CuPy arrays or anything NumPy or DLPack can read (torch tensors).
Loading checks every entry before it changes anything.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .backends import _is_cupy_array

# state-dict name -> the layer's attribute
ARRAYS = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean", "running_var": "running_var"}
COUNT = "num_batches_tracked"


def array_module(arrays) -> Any:
    """CuPy if any of ``arrays`` is a CuPy array, else NumPy."""
    return sys.modules["cupy"] if any(_is_cupy_array(a) for a in arrays) else np


def to_module(value, xp, name: str):
    """``value`` as an array of ``xp`` (no copy where it already is one)."""
    if isinstance(value, xp.ndarray):
        return value
    try:
        if xp is np:
            if type(value).__module__.split(".")[0] == "cupy":
                return value.get()
            return np.asarray(value)  # NumPy scalars and arrays, torch CPU tensors, lists
        if hasattr(value, "__dlpack__"):
            try:
                return xp.from_dlpack(value)  # torch CUDA tensors stay on the device
            except Exception:  # noqa: BLE001 - host memory: through NumPy below
                pass
        return xp.asarray(np.asarray(value))
    except Exception as e:
        raise TypeError(f"{name}: cannot read a {type(value).__name__} as an array of {xp.__name__} ({e})") from e


def state_dict(layer) -> dict:
    """Copies of the layer's parameters and running statistics, and its batch count."""
    xp = array_module(getattr(layer, attr) for attr in ARRAYS.values())
    state = {name: getattr(layer, attr).copy() for name, attr in ARRAYS.items() if getattr(layer, attr) is not None}
    if layer.track_running_stats:
        state[COUNT] = xp.asarray(layer.num_batches_tracked, dtype=np.int64)
    return state


def load_state_dict(layer, state, *, strict: bool = True) -> tuple[list[str], list[str]]:
    """Check every entry of ``state``, then copy them into the layer in its dtype and array module.

    Returns (missing, unexpected) names; with ``strict`` either raises KeyError
    instead.  ``num_batches_tracked`` may be absent (Keras and older PyTorch
    checkpoints have none): the layer's count is then left as it is.
    """
    if not hasattr(state, "keys"):
        raise TypeError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
    expected = [name for name, attr in ARRAYS.items() if getattr(layer, attr) is not None]
    if layer.track_running_stats:
        expected.append(COUNT)
    missing = [name for name in expected if name not in state and name != COUNT]
    unexpected = [name for name in state if name not in expected]
    if strict and (missing or unexpected):
        raise KeyError(f"state does not match the layer: missing {missing}, unexpected {unexpected} "
                       f"(the layer has {expected})")
    xp = array_module(getattr(layer, attr) for attr in ARRAYS.values())
    updates: dict[str, Any] = {}
    for name, attr in ARRAYS.items():
        if name not in state or name not in expected:
            continue
        current = getattr(layer, attr)
        value = to_module(state[name], xp, name)
        if getattr(value.dtype, "kind", None) != "f" and value.dtype.name != "bfloat16":
            raise TypeError(f"{name} must be a floating-point array, got dtype {value.dtype.name}")
        if value.shape != current.shape:
            raise ValueError(f"{name} must have shape {current.shape}, got {value.shape}")
        updates[attr] = xp.array(value, dtype=current.dtype, copy=True)  # never the caller's memory
    if COUNT in state and COUNT in expected:
        count = np.asarray(to_module(state[COUNT], np, COUNT))
        if count.shape not in ((), (1,)) or count.dtype.kind not in "iu" or int(count.reshape(())) < 0:
            raise ValueError(f"{COUNT} must be one integer >= 0, got {count.dtype.name} of shape {count.shape}")
        updates["num_batches_tracked"] = int(count.reshape(()))
    for attr, value in updates.items():
        setattr(layer, attr, value)
    return missing, unexpected


def keras_state_dict(weights, *, center: bool = True, scale: bool = True, batch_size: int | None = None) -> dict:
    """A state dict from a Keras ``BatchNormalization`` layer's ``get_weights()``.

    Keras lists ``gamma`` (when ``scale``), ``beta`` (when ``center``),
    ``moving_mean`` and ``moving_variance``.  Its moving variance averages the
    biased batch variance, ours (as PyTorch's) the unbiased one: give the
    training ``batch_size`` (values per channel per batch) to rescale it by
    n / (n - 1).  Keras's ``momentum`` is ``1 - momentum`` here, and its
    ``epsilon`` defaults to 1e-3 (``eps`` here: 1e-5).
    """
    weights = list(weights)
    names = [*(["weight"] if scale else []), *(["bias"] if center else []), "running_mean", "running_var"]
    if len(weights) != len(names):
        raise ValueError(f"weights must be {len(names)} arrays ({', '.join(names)}), got {len(weights)}")
    state = dict(zip(names, weights, strict=True))
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
            raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
        variance = to_module(state["running_var"], array_module([state["running_var"]]), "running_var")
        state["running_var"] = variance * (batch_size / (batch_size - 1))
    return state
