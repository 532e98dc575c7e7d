"""Input validation and profile handling shared by the merge operations.

A merge takes T task tensors of one shape and one floating dtype, optional
per-task weights w_t, and options whose defaults come from a ``profile``:
"paper" (the official TIES code, prateeky2806/ties-merging), "peft" (PEFT 0.21.2
``merge_utils``), "mergekit" (mergekit 0.1.5) or "mergelm" (the DARE authors' yule-BUAA/MergeLM, whose
TIES keeps one more entry when d·n is not whole and returns 0 where the elected sign is 0).
Every option can also be given on its own; an explicit option overrides the profile's value.
See spec/merging.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from refimpl import _checks

PROFILES = ("paper", "peft", "mergekit", "mergelm")


_BF16 = np.dtype(ml_dtypes.bfloat16)


def as_float(x: Any, name: str, **kwargs: Any) -> tuple[np.ndarray, np.dtype]:
    """``_checks.float_array`` that also returns the input's dtype: (float64 copy, original dtype)."""
    arr = _checks._to_numpy(x, name)
    out = _checks.float_array(arr, name, **kwargs)
    return out, (arr.dtype if arr.dtype.kind == "f" or arr.dtype == _BF16 else np.dtype(np.float64))


def task_list(tensors: Any, name: str = "task_vectors", *, min_count: int = 1) -> list[np.ndarray]:
    """Validate a sequence of T ≥ min_count float tensors of one shape and dtype; return float64 copies."""
    if isinstance(tensors, np.ndarray) or not isinstance(tensors, Sequence) or isinstance(tensors, str):
        raise TypeError(f"{name}: expected a list or tuple of arrays, got {_checks.describe(tensors)}")
    if len(tensors) < min_count:
        raise ValueError(f"{name}: expected at least {min_count} tensor(s), got {len(tensors)}")
    out: list[np.ndarray] = []
    first_dtype = None
    for i, t in enumerate(tensors):
        arr, dtype = as_float(t, f"{name}[{i}]")
        if first_dtype is None:
            first_dtype = dtype
        elif dtype != first_dtype:
            raise ValueError(
                f"{name}[{i}]: expected dtype {first_dtype} (the dtype of {name}[0]), got dtype {dtype}"
            )
        if out and arr.shape != out[0].shape:
            raise ValueError(f"{name}[{i}]: expected the shape of {name}[0] {out[0].shape}, got shape {arr.shape}")
        out.append(arr)
    return out


def weight_vector(weights: Any, count: int, name: str = "weights") -> np.ndarray:
    """Per-task weights: None means all ones; else a length-``count`` vector of finite reals."""
    if weights is None:
        return np.ones(count)
    if isinstance(weights, (str, bytes)) or np.ndim(weights) != 1:
        raise TypeError(f"{name}: expected a 1-D sequence of {count} real numbers, got {_checks.describe(weights)}")
    vals = [_checks.real(w, f"{name}[{i}]") for i, w in enumerate(weights)]
    if len(vals) != count:
        raise ValueError(f"{name}: expected {count} weights (one per task), got {len(vals)}")
    return np.asarray(vals, dtype=np.float64)


def density(value: Any, name: str = "density") -> float:
    """A keep fraction d in (0, 1]; percentages (d > 1) and d = 0 are rejected."""
    return _checks.real(value, name, low=0.0, high=1.0, low_inclusive=False)


def profile_options(profile: Any, table: Mapping[str, Mapping[str, Any]], given: Mapping[str, Any]) -> dict:
    """Resolve options: an explicit (non-None) value in ``given`` wins over the profile's default."""
    _checks.choice(profile, "profile", PROFILES)
    opts = dict(table[profile])
    opts.update({k: v for k, v in given.items() if v is not None})
    return opts


def stack(tensors: list[np.ndarray]) -> np.ndarray:
    return np.stack(tensors, axis=0)


def bcast(weights: np.ndarray, ndim: int) -> np.ndarray:
    """Weights of shape (T,) reshaped to broadcast against a (T, ...) stack of rank ``ndim``."""
    return weights.reshape((-1,) + (1,) * (ndim - 1))
