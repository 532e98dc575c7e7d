"""The argument checks shared by the merge operations and their kernels (numba, CuPy).

A merge takes T task tensors of one shape and one floating dtype, optional per-task weights w_t, keep
fractions d_t and a scale λ; ``task_operands`` checks them and returns a ``TaskOperands`` record of float64
copies. The peer rule sets (``profile="paper" | "peft" | "mergekit" | "mergelm"``) are records in
``refimpl.merging.profiles``. See spec/merging.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from refimpl import _checks

_BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class TaskOperands:
    """Checked operands of a task-vector merge: float64 copies (the core may scale them in place)."""

    taus: list[np.ndarray]
    weights: np.ndarray
    densities: np.ndarray
    lam: float


def task_operands(task_vectors: Any, weights: Any, *, density: Any = 1.0, lam: Any = 1.0) -> TaskOperands:
    """Check T task vectors, their weights (None: all ones), one keep fraction or one per task, and λ."""
    taus = task_list(task_vectors)
    w = weight_vector(weights, len(taus))
    d = densities(density, len(taus))
    return TaskOperands(taus, w, d, _checks.real(lam, "lam"))


def as_float(x: Any, name: str, **kwargs: Any) -> tuple[np.ndarray, np.dtype]:
    """``_checks.float_array`` that also returns the input's dtype: (float64 copy, original dtype)."""
    arr = _checks._to_numpy(x, name)
    out = _checks.float_array(arr, name, **kwargs)
    return out, input_dtype(arr)


def input_dtype(arr: np.ndarray) -> np.dtype:
    """The dtype a task tensor is judged by: its own if floating (bfloat16 included), else float64."""
    return arr.dtype if arr.dtype.kind == "f" or arr.dtype == _BF16 else np.dtype(np.float64)


def task_sequence(tensors: Any, name: str = "task_vectors", *, min_count: int = 1) -> Sequence[Any]:
    """A list or tuple of at least ``min_count`` tensors (not one array, not a string)."""
    if isinstance(tensors, np.ndarray) or not isinstance(tensors, Sequence) or isinstance(tensors, str):
        raise TypeError(f"{name}: expected a list or tuple of arrays, got {_checks.describe(tensors)}")
    if len(tensors) < min_count:
        raise ValueError(f"{name}: expected at least {min_count} tensor(s), got {len(tensors)}")
    return tensors


def same_as_first(
    i: int,
    shape: tuple[int, ...],
    dtype: np.dtype,
    first_shape: tuple[int, ...],
    first_dtype: np.dtype,
    name: str = "task_vectors",
) -> None:
    """Tensor i must have the dtype and the shape of tensor 0 (dtype checked first)."""
    if dtype != first_dtype:
        raise ValueError(f"{name}[{i}]: expected dtype {first_dtype} (the dtype of {name}[0]), got dtype {dtype}")
    if shape != first_shape:
        raise ValueError(f"{name}[{i}]: expected the shape of {name}[0] {first_shape}, got shape {shape}")


def task_list(tensors: Any, name: str = "task_vectors", *, min_count: int = 1) -> list[np.ndarray]:
    """Validate a sequence of T ≥ min_count float tensors of one shape and dtype; return float64 copies."""
    out: list[np.ndarray] = []
    dtypes: list[np.dtype] = []
    for i, t in enumerate(task_sequence(tensors, name, min_count=min_count)):
        arr, dtype = as_float(t, f"{name}[{i}]")
        if out:
            same_as_first(i, arr.shape, dtype, out[0].shape, dtypes[0], name)
        out.append(arr)
        dtypes.append(dtype)
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


def normalizable(weights: np.ndarray) -> np.ndarray:
    """Weights that ``normalize=True`` may divide by: |Σ w| ≥ 1e-8 (mergekit would divide by 1 instead)."""
    total = float(weights.sum())
    if abs(total) < 1e-8:
        raise ValueError(f"weights: normalize=True needs |Σ w| ≥ 1e-8, got Σ w = {total!r}")
    return weights


def density(value: Any, name: str = "density") -> float:
    """A keep fraction d in (0, 1]; percentages (d > 1) and d = 0 are rejected."""
    return _checks.real(value, name, low=0.0, high=1.0, low_inclusive=False)


def densities(value: Any, count: int, name: str = "density") -> npt.NDArray[np.float64]:
    """One keep fraction for all tasks, or one per task (mergekit's per-model density)."""
    if np.ndim(value) == 0:
        return np.full(count, density(value, name))
    vals = [density(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if len(vals) != count:
        raise ValueError(f"{name}: expected one density or {count} (one per task), got {len(vals)}")
    return np.asarray(vals)


def stack(tensors: list[np.ndarray]) -> np.ndarray:
    return np.stack(tensors, axis=0)


def bcast(weights: np.ndarray, ndim: int) -> np.ndarray:
    """Weights of shape (T,) reshaped to broadcast against a (T, ...) stack of rank ``ndim``."""
    return weights.reshape((-1,) + (1,) * (ndim - 1))
