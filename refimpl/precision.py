"""Floating-point formats, rounding emulation, ulps and derived error bounds.

The oracle computes in float64. A low-precision kernel is emulated by rounding
the float64 values at the steps where the kernel rounds (``round_to``), and a
comparison that cannot be exact is judged against an error bound derived from
the format's unit roundoff u and the reduction length n (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., §3.1):

    |fl(Σ_{i<n} a_i b_i) − Σ a_i b_i|  ≤  γ_n · Σ |a_i b_i|,   γ_n = n·u / (1 − n·u).

A comparison reports error / bound: a ratio ≤ 1 passes, 0.3 reads as
comfortably inside. Tolerances are never scaled by array size.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import ml_dtypes
import numpy as np
import numpy.typing as npt

from refimpl import _checks

#: Formats by name. float8 formats follow OCP FP8 (ml_dtypes).
DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}

_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


_F = TypeVar("_F", bound=Callable[..., Any])
_NESTING = threading.local()  # set while a checked op runs: ops it calls leave the check to it


def _first_nonfinite(result: Any, name: str = "out") -> tuple[str, int] | None:
    """(output name, flat index) of the first NaN/±inf float in an op's result (arrays, floats, dataclass
    fields, tuple items), or None."""
    if isinstance(result, np.ndarray) and (result.dtype.kind == "f" or result.dtype == DTYPES["bfloat16"]):
        bad = ~np.isfinite(result.astype(np.float64, copy=False))
        return (name, int(np.flatnonzero(bad.reshape(-1))[0])) if bad.any() else None
    if isinstance(result, (float, np.floating)):
        return None if np.isfinite(result) else (name, 0)
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        fields = [(f"{name}.{f.name}", getattr(result, f.name)) for f in dataclasses.fields(result)]
    elif isinstance(result, (tuple, list)):
        fields = [(f"{name}[{i}]", v) for i, v in enumerate(result)]
    elif isinstance(result, Mapping):
        fields = [(f"{name}[{k!r}]", v) for k, v in result.items()]
    else:
        return None
    for sub, value in fields:
        hit = _first_nonfinite(value, sub)
        if hit is not None:
            return hit
    return None


@overload
def _overflow_checked(fn: _F, *, storage_dtype: str | None = None) -> _F: ...


@overload
def _overflow_checked(fn: None = None, *, storage_dtype: str | None = None) -> Callable[[_F], _F]: ...


def _overflow_checked(fn: _F | None = None, *, storage_dtype: str | None = None) -> Any:
    """Decorate a reference op whose inputs are validated finite: a NaN/±inf in its result can then only
    come from overflow (|values| beyond float64's ~1.8e308), so it raises ValueError naming the op and
    the output instead of returning it (and instead of NumPy's RuntimeWarning).

    ``storage_dtype`` names the op's argument that rounds the result to a storage format (the
    ``dtype=`` of a merge): when it asks for a format narrower than float64, overflow gives that
    format's rounding of the value (±inf, NaN for float8_e4m3fn), exactly as ``round_to`` does and
    as the peers do, so the result is returned unchecked. Policy: spec/conventions.md §5, "Overflow".
    """
    if fn is None:
        return functools.partial(_overflow_checked, storage_dtype=storage_dtype)
    op = f"{fn.__module__.removeprefix('refimpl.').split('.')[0]}.{fn.__name__}"  # merging.* from submodules
    sig = inspect.signature(fn) if storage_dtype is not None else None

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        outer = not getattr(_NESTING, "active", False)
        _NESTING.active = True  # an op called by another checked op is checked once, as the outer op
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                result = fn(*args, **kwargs)
        finally:
            _NESTING.active = not outer
        if not outer:
            return result
        if sig is not None and storage_dtype is not None:  # sig is set exactly when storage_dtype is
            dt = sig.bind(*args, **kwargs).arguments.get(storage_dtype)
            if dt is not None and resolve_dtype(dt, storage_dtype) != np.dtype(np.float64):
                return result
        hit = _first_nonfinite(result)
        if hit is not None:
            where, i = hit
            raise ValueError(
                f"{op}: the inputs are finite but the result {where} is not (first at flat index "
                f"{i}): the float64 computation overflows; scale the inputs down"
            )
        return result

    return checked


def resolve_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """Return the NumPy dtype for a name in ``DTYPES`` or a dtype-like; raise otherwise."""
    if dtype is None:  # np.dtype(None) would silently mean float64
        raise TypeError(f"{name}: expected a float format name or dtype ({', '.join(DTYPES)}), got None")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            _checks.choice(dtype, name, DTYPES)
        return DTYPES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name}: expected a float format name or dtype, got {_checks.describe(dtype)}") from exc
    if dt not in DTYPES.values():
        raise ValueError(f"{name}: expected one of {', '.join(DTYPES)}, got {dt}")
    return dt


def finfo(dtype: Any) -> Any:
    """Machine limits of a format (``ml_dtypes.finfo`` covers the non-IEEE formats too)."""
    return ml_dtypes.finfo(resolve_dtype(dtype))


def unit_roundoff(dtype: Any) -> float:
    """u = 2^-p for a format with p significand bits (float32: 2^-24, bfloat16: 2^-8)."""
    return float(finfo(dtype).eps) / 2.0


def gamma(n: int, dtype: Any) -> float:
    """γ_n = n·u / (1 − n·u), the relative error bound of n chained roundings."""
    n = _checks.integer(n, "n", low=0)
    nu = n * unit_roundoff(dtype)
    if nu >= 1.0:
        raise ValueError(f"n: n·u = {nu:g} must be < 1 for the bound to exist (n = {n}, dtype {dtype})")
    return nu / (1.0 - nu)


def _round_to_odd_float32(x: np.ndarray) -> np.ndarray:
    """Round float64 to float32 with round-to-odd, so a second rounding to a
    narrower format (≥ 2 bits shorter) is a correct single rounding."""
    with np.errstate(over="ignore"):
        t = x.astype(np.float32)
    inexact = np.isfinite(x) & (t.astype(np.float64) != x)
    even = (t.view(np.uint32) & 1) == 0
    toward = np.where(x > t.astype(np.float64), np.float32(np.inf), np.float32(-np.inf))
    nudged = np.nextafter(t, toward)
    return np.where(inexact & even, nudged, t)


def round_to(x: npt.ArrayLike, dtype: Any) -> npt.NDArray[np.float64]:
    """Round to the nearest value of ``dtype`` (ties to even) and return float64.

    One correct rounding from the float64 input. (Casting float64 to bfloat16
    in torch or ml_dtypes rounds twice, through float32; for inputs that are
    already float32 the two agree.) Overflow gives ±inf where the format has
    infinities and NaN for float8_e4m3fn, as ml_dtypes does.
    """
    arr = _checks.float_array(x, "x", allow_nonfinite=True, allow_empty=True)
    dt = resolve_dtype(dtype)
    if dt in (np.dtype(np.float64), np.dtype(np.float16)):
        with np.errstate(over="ignore"):
            return arr.astype(dt).astype(np.float64)  # NumPy rounds float64 -> float16 directly
    if dt == np.dtype(np.float32):
        with np.errstate(over="ignore"):
            return arr.astype(np.float32).astype(np.float64)
    return _round_to_odd_float32(arr).astype(dt).astype(np.float64)


def ordered_bits(x: npt.ArrayLike, dtype: Any) -> npt.NDArray[np.int64]:
    """Map values of ``dtype`` to int64 so that adjacent values differ by 1 (−0 and +0 both map to 0)."""
    dt = resolve_dtype(dtype)
    arr = np.asarray(x)
    vals = arr.astype(dt) if arr.dtype != dt else arr
    bits = vals.view(_UINT_OF_SIZE[dt.itemsize]).astype(np.uint64).astype(np.int64)
    sign = np.int64(1) << (8 * dt.itemsize - 1)
    magnitude = bits & (sign - 1)
    return np.where(bits & sign, -magnitude, magnitude)


def ulp_distance(a: npt.ArrayLike, b: npt.ArrayLike, dtype: Any) -> npt.NDArray[np.int64]:
    """Number of representable ``dtype`` values between a and b (values are first rounded to dtype)."""
    ra = round_to(a, dtype)
    rb = round_to(b, dtype)
    if ra.shape != rb.shape:
        raise ValueError(f"b: expected the shape of a {ra.shape}, got shape {rb.shape}")
    dt = resolve_dtype(dtype)
    return np.abs(ordered_bits(ra, dt) - ordered_bits(rb, dt))


def ulp(x: npt.ArrayLike, dtype: Any) -> npt.NDArray[np.float64]:
    """Spacing of ``dtype`` at |x|: the distance from |x| rounded to dtype to the next larger value."""
    dt = resolve_dtype(dtype)
    r = np.abs(round_to(x, dtype)).astype(dt)
    nxt = (r.view(_UINT_OF_SIZE[dt.itemsize]) + 1).view(dt)
    return nxt.astype(np.float64) - r.astype(np.float64)


def _not_scalar(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` unless it is 0-d: a matrix product needs an axis to sum over (ValueError naming ``name``)."""
    if arr.ndim == 0:
        raise ValueError(f"{name}: expected an array of at least one dimension, got {_checks.describe(arr)}")
    return arr


@_overflow_checked
def matmul_error_bound(
    a: npt.ArrayLike, b: npt.ArrayLike, dtype: Any, *, extra_roundings: int = 1
) -> npt.NDArray[np.float64]:
    """Elementwise bound on |fl(a @ b) − a @ b| when the products and the K-term sum
    are computed in ``dtype``: γ_{K + extra} · (|a| @ |b|) (``refimpl.bounds.matmul``).

    ``extra_roundings`` counts roundings after the sum (the default 1 covers
    storing the result in ``dtype``).
    """
    from refimpl import bounds  # deferred: bounds builds on this module's γ_n (a module-level cycle otherwise)

    a_arr = _not_scalar(_checks.float_array(a, "a", allow_empty=True), "a")
    b_arr = _not_scalar(_checks.float_array(b, "b", allow_empty=True), "b")
    k = a_arr.shape[-1]
    kb = b_arr.shape[0] if b_arr.ndim == 1 else b_arr.shape[-2]
    if kb != k:
        raise ValueError(f"b: expected {k} rows to match a's last axis (a @ b), got shape {b_arr.shape}")
    extra = _checks.integer(extra_roundings, "extra_roundings", low=0)
    return bounds.matmul(a_arr, b_arr, dtype, extra_roundings=extra)


@dataclass(frozen=True)
class BoundReport:
    """Outcome of comparing an array with a reference under an elementwise bound."""

    worst_ratio: float  #: max |actual − expected| / bound; ≤ 1 passes
    worst_index: tuple[int, ...]  #: where the worst ratio occurs
    error: float  #: |actual − expected| at that index
    bound: float  #: the bound at that index
    n_over: int  #: elements whose ratio exceeds 1
    size: int

    @property
    def passed(self) -> bool:
        return self.n_over == 0

    def __str__(self) -> str:
        return (
            f"error/bound = {self.worst_ratio:.3g} at {self.worst_index} "
            f"(error {self.error:.3g}, bound {self.bound:.3g}); {self.n_over} of {self.size} over"
        )


def compare_to_bound(actual: npt.ArrayLike, expected: npt.ArrayLike, bound: npt.ArrayLike) -> BoundReport:
    """Report error / bound elementwise. NaN in the same places counts as agreement;
    a zero bound admits only an exact match."""
    act = _checks.float_array(actual, "actual", allow_nonfinite=True, allow_empty=True)
    exp = _checks.float_array(expected, "expected", allow_nonfinite=True, allow_empty=True)
    bnd = np.broadcast_to(_checks.float_array(bound, "bound", allow_empty=True), exp.shape)
    if act.shape != exp.shape:
        raise ValueError(f"actual: expected the shape of expected {exp.shape}, got shape {act.shape}")
    same = (act == exp) | (np.isnan(act) & np.isnan(exp))
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(same, 0.0, np.abs(act - exp))
        err = np.where(np.isnan(err), np.inf, err)
        ratio = np.where(err == 0, 0.0, np.where(bnd > 0, err / np.where(bnd > 0, bnd, 1.0), np.inf))
    if ratio.size == 0:
        return BoundReport(0.0, (), 0.0, 0.0, 0, 0)
    flat = int(np.argmax(ratio))
    idx = tuple(int(i) for i in np.unravel_index(flat, ratio.shape))
    return BoundReport(
        float(ratio.flat[flat]),
        idx,
        float(err.flat[flat]),
        float(bnd.flat[flat]),
        int((ratio > 1).sum()),
        int(ratio.size),
    )
