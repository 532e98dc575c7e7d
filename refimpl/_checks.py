"""Argument validation shared by every op.

Every public function of refimpl checks its input with these helpers, so that a
wrong shape, dtype, rank, option or non-finite value raises a ValueError or
TypeError whose message names the argument, what was expected and what was
given. The helpers return the validated value (converted where documented).
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Sequence
from typing import Any

import ml_dtypes
import numpy as np

#: Floating dtypes accepted as array inputs (the reference computes in float64).
FLOAT_DTYPES: tuple[np.dtype, ...] = (
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float32),
    np.dtype(np.float64),
)

#: ``ndim`` of an input batch x of shape (..., features): one feature axis after up to 31 leading
#: (batch, sequence, ...) axes, 32 axes in all (NumPy's limit was 32 before 2.0).
BATCHED_NDIM = range(1, 33)


def describe(x: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert array-likes (lists, DLPack-capable arrays, torch tensors) to NumPy.

    Masked arrays and ``np.matrix`` are refused: a mask would be dropped silently (a masked NaN
    would pass the finite check) and a matrix keeps 2-D shapes under indexing and reductions.
    """
    if isinstance(x, (np.ma.MaskedArray, np.matrix)):
        raise TypeError(
            f"{name}: expected a plain array, got {type(x).__name__} (convert it first, e.g. "
            f"np.asarray(x) or x.filled(...))"
        )
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__") and not isinstance(x, (list, tuple)):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError):
            pass  # e.g. a bfloat16 torch tensor or a GPU array: fall through to np.asarray
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected an array, got {describe(x)}") from exc


def float_array(
    x: Any,
    name: str,
    *,
    ndim: int | Collection[int] | None = None,
    allow_nonfinite: bool = False,
    allow_empty: bool = False,
    convert: bool = True,
) -> np.ndarray:
    """Validate a floating-point array argument.

    Accepts float16, bfloat16, float32 and float64 arrays (and Python lists of
    floats). Integers, booleans and complex numbers raise TypeError: refimpl
    never guesses what an integer tensor means. Returns a float64 copy when
    ``convert`` is true, else the array as given.
    """
    arr = _to_numpy(x, name)
    is_bf16 = arr.dtype == np.dtype(ml_dtypes.bfloat16)  # ml_dtypes reports kind 'V' for bfloat16
    if arr.dtype == object or (arr.dtype.kind in "OSUV" and not is_bf16):
        raise TypeError(f"{name}: expected a floating-point array, got {describe(arr)}")
    if arr.dtype.kind != "f" and not is_bf16:
        if isinstance(x, (list, tuple)) and arr.dtype.kind in "iu":
            arr = arr.astype(np.float64)  # a literal list like [1, 2] means floats
        else:
            raise TypeError(
                f"{name}: expected a floating-point array (float16, bfloat16, float32 or float64), got {describe(arr)}"
            )
    if np.dtype(arr.dtype) not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: unsupported floating dtype {arr.dtype}; expected one of {', '.join(str(d) for d in FLOAT_DTYPES)}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name}: expected a {want}-D array, got {describe(arr)}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got {describe(arr)}")
    out = arr.astype(np.float64) if convert else arr
    if not allow_nonfinite:
        finite = np.isfinite(out if convert else arr.astype(np.float64))
        if not finite.all():
            bad = int(np.flatnonzero(~finite.ravel())[0])
            raise ValueError(f"{name}: expected finite values, got a non-finite value at flat index {bad}")
    return out


def check_shape(arr: np.ndarray, name: str, expected: Sequence[int | None]) -> None:
    """Raise ValueError unless ``arr.shape`` matches ``expected`` (None = any size)."""
    ok = arr.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, arr.shape, strict=False))
    if not ok:
        dims = ", ".join("*" if e is None else str(e) for e in expected)
        want = f"({dims},)" if len(expected) == 1 else f"({dims})"
        raise ValueError(f"{name}: expected shape {want}, got shape {arr.shape}")


def integer(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Validate an integer option in [low, high]; booleans are rejected."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {describe(value)}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {v}")
    return v


def real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Validate a finite real scalar in the given interval."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {describe(value)}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    below = low is not None and (v < low if low_inclusive else v <= low)
    above = high is not None and (v > high if high_inclusive else v >= high)
    if below or above:
        lb = "[" if low_inclusive else "("
        rb = "]" if high_inclusive else ")"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name}: expected a value in {lb}{lo}, {hi}{rb}, got {v!r}")
    return v


def choice(value: Any, name: str, choices: Collection[Any]) -> Any:
    """Validate that an option is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}: expected one of {listed}, got {value!r}")
    return value


def boolean(value: Any, name: str) -> bool:
    """Validate a boolean flag."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {describe(value)}")
    return bool(value)


def rng(value: Any, name: str = "rng") -> np.random.Generator:
    """Validate a NumPy random Generator (randomness is never hidden)."""
    if not isinstance(value, np.random.Generator):
        raise TypeError(
            f"{name}: expected a numpy.random.Generator (e.g. np.random.default_rng(0)), got {describe(value)}"
        )
    return value


def keep_mask(
    mask: Any, p: Any, shape: tuple[int, ...], *, mask_name: str = "dropout_mask", p_name: str = "dropout_p"
) -> tuple[np.ndarray | None, float]:
    """Validate an inverted-dropout keep mask (0/1 entries, the shape of x) and its rate p in [0, 1).

    Returns (the mask as float64, or None when no mask is given, and p). Dropout is then
    x ⊙ mask / (1 − p); the caller decides what None (eval mode) means.
    """
    rate = real(p, p_name, low=0.0, high=1.0, high_inclusive=False)
    if mask is None:
        return None, rate
    m = np.asarray(mask)
    if m.dtype.kind not in "biuf":
        raise TypeError(f"{mask_name}: expected a 0/1 keep mask, got {describe(m)}")
    if m.shape != tuple(shape):
        raise ValueError(f"{mask_name}: expected the shape of x {tuple(shape)}, got shape {m.shape}")
    if not np.isin(m, (0, 1)).all():
        raise ValueError(f"{mask_name}: expected only 0 (dropped) and 1 (kept) entries")
    return m.astype(np.float64), rate


def same_shape(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    """Raise ValueError unless two arrays have the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"{b_name}: expected the shape of {a_name} {a.shape}, got shape {b.shape}")
