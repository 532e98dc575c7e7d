"""The tolerance model: what "agrees with the reference" means for each op.

Two kinds (spec/conventions.md):

* ``Exact``: bit for bit (NF4 codes and absmax, counts, integer results, anything
  whose every step is a single correctly rounded operation in a fixed order).
  NaN matches NaN; -0.0 and +0.0 differ where the output is floating.
* ``Bounded``: |actual − expected| ≤ bound elementwise, reported as error / bound.
  The bound is derived, never picked: both the reference (float64) and the target
  (its compute dtype) are within γ_K of the exact result, where K counts the
  roundings on the longest path of the formula (Higham §3.1), so

      |actual − expected| ≤ (γ_K(target dtype) + γ_K(float64)) · magnitude,

  with ``magnitude`` the same formula evaluated on |inputs| (the running error
  bound of a sum of products). A ratio ≤ 1 passes.
* ``StoredBounded``: ``Bounded`` for an op that rounds its result into a storage format;
  there the bound applies before the storage rounding, so a stored value passes when it is
  a value of the format in [rd(v − bound), rd(v + bound)] (a correct lower-precision target
  rounds twice, and near a tie of the format lands on the neighbour of rd(v)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refimpl import precision
from refimpl.bounds import StoredNormRange, StoredRange, differential
from refimpl.precision import round_to


@dataclass(frozen=True)
class Verdict:
    """The outcome of comparing one case."""

    passed: bool
    worst_ratio: float  #: error / bound for bounded ops; 0 or inf for exact ops
    message: str = ""


@dataclass(frozen=True)
class Exact:
    """Bit-exact agreement."""

    kind: str = "exact"

    def describe(self) -> str:
        return "exact"


@dataclass(frozen=True)
class Bounded:
    """Agreement within a derived bound.

    ``depth(case)`` is K, the number of roundings on the longest path;
    ``magnitude(case)`` returns, per output name, the formula evaluated on |inputs|
    (elementwise upper bound of |each term| summed).
    """

    depth: Callable[[Mapping[str, Any]], int]
    magnitude: Callable[[Mapping[str, Any]], dict[str, np.ndarray]]
    kind: str = "bounded"
    note: str = field(default="")

    def describe(self) -> str:
        return "bounded: (γ_K(dtype) + γ_K(float64)) · |formula|(|inputs|)" + (f"; {self.note}" if self.note else "")

    def bounds(self, case: Mapping[str, Any], dtype: str) -> dict[str, np.ndarray]:
        k = int(self.depth(case))
        return {name: differential(k, m, dtype) for name, m in self.magnitude(case).items()}


@dataclass(frozen=True)
class StoredBounded(Bounded):
    """``Bounded``, for an op that rounds its result into a storage format (a ``dtype=`` option).

    The reference stores y = rd(v); a target computing v in its precision stores rd(z), |z − v| ≤ e, and
    where v lies within e of a tie of the storage format that is the neighbouring value (double rounding,
    not an error). So a stored output passes when it is a value of the storage format inside the range
    ``refimpl.bounds.StoredRange`` gives: [rd(v − e), rd(v + e)], through the inner rounding of ΔW where the
    op stores it first (safe merge, unmerge). ``stored(case, dtype)`` returns those ranges per output name
    (empty without a storage format: then this is ``Bounded``). The reported error / bound of an element is
    the least λ for which its value lies in the range of the errors scaled by λ (0 for rd(v) itself; ≤ 1
    passes), so it reads like ``Bounded``'s ratio.
    """

    stored: Callable[[Mapping[str, Any], str], Mapping[str, StoredRange | StoredNormRange]] = field(
        default=lambda case, dtype: {}
    )

    def describe(self) -> str:
        return super().describe() + (
            "; with a storage dtype, a value of that format in [rd(v − bound), rd(v + bound)], v the unrounded "
            "result (spec/conventions.md §2)"
        )


Tolerance = Exact | Bounded


def _as_float_bits(a: np.ndarray) -> np.ndarray:
    sizes = {2: np.uint16, 4: np.uint32, 8: np.uint64}
    return a.view(sizes[a.dtype.itemsize])


def compare_exact(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> Verdict:
    """Bit-exact comparison of named outputs (the actual values are cast to the expected dtype)."""
    for name, exp in expected.items():
        act = actual.get(name)
        if act is None:
            return Verdict(False, float("inf"), f"{name}: missing from the target's result")
        act = np.asarray(act)
        if act.shape != exp.shape:
            return Verdict(False, float("inf"), f"{name}: shape {act.shape}, expected {exp.shape}")
        if exp.dtype.kind in "USO":
            differ = np.asarray(act.astype(str) != exp.astype(str))
        elif exp.dtype.kind == "f" or exp.dtype.name == "bfloat16":
            with np.errstate(invalid="ignore", over="ignore"):
                a = act.astype(exp.dtype)
            nan_both = np.isnan(a.astype(np.float64)) & np.isnan(exp.astype(np.float64))
            differ = (_as_float_bits(a) != _as_float_bits(exp)) & ~nan_both
        else:
            if act.dtype.kind == "f" and not np.all(np.isfinite(act)):
                return Verdict(False, float("inf"), f"{name}: non-finite values where integers are expected")
            differ = act.astype(np.float64) != exp.astype(np.float64)
        n = int(np.count_nonzero(differ))
        if n:
            first = tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(differ.ravel())[0]), exp.shape))
            return Verdict(
                False,
                float("inf"),
                f"{name}: {n} of {exp.size} elements differ; first at {first}: "
                f"got {act[first]!r}, expected {exp[first]!r}",
            )
    return Verdict(True, 0.0)


def over_bound_note(ratio: float) -> str:
    """How far over the bound a failure is, in words. The bound is the worst case of rounding on the formula's
    longest path in both precisions, so any ratio above 1 is more than rounding can explain."""
    if not np.isfinite(ratio):
        return "the error is unbounded where the bound admits only an exact match (or a NaN/inf differs)"
    return (
        f"{ratio:.3g}x the derived bound: rounding in the declared precision cannot explain it "
        "(a different formula, a lower precision than declared, or an added epsilon)"
    )


def compare_bounded(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], bounds: Mapping[str, np.ndarray]
) -> Verdict:
    """Elementwise error / bound over every named output; the worst ratio is reported."""
    worst = 0.0
    detail = ""
    for name, exp in expected.items():
        act = actual.get(name)
        if act is None:
            return Verdict(False, float("inf"), f"{name}: missing from the target's result")
        act = np.asarray(act)
        if act.shape != exp.shape:
            return Verdict(False, float("inf"), f"{name}: shape {act.shape}, expected {exp.shape}")
        if exp.dtype.kind != "f" and exp.dtype.name != "bfloat16":
            v = compare_exact({name: act}, {name: exp})
            if not v.passed:
                return v
            continue
        bound = bounds.get(name, np.zeros(exp.shape))
        rep = precision.compare_to_bound(
            act.astype(np.float64), exp.astype(np.float64), np.broadcast_to(bound, exp.shape)
        )
        if rep.worst_ratio > worst or not detail:
            worst = max(worst, rep.worst_ratio)
            detail = f"{name}: {rep}"
        if not rep.passed:
            return Verdict(False, rep.worst_ratio, f"{name}: {rep}; {over_bound_note(rep.worst_ratio)}")
    return Verdict(True, worst, detail)


#: λ searched over [2⁻⁶⁰, 2²⁰⁰] in log2 (enough steps for 3 significant digits)
_LAMBDA_LOG2 = (-60.0, 200.0)
_LAMBDA_STEPS = 40


def _inside(act: np.ndarray, lo: np.ndarray, hi: np.ndarray, overflow_nan: bool) -> np.ndarray:
    """act within [lo, hi] (extended reals; an end at ±inf stands for the format's overflow value)."""
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(act) & (lo <= act) & (act <= hi)
    if overflow_nan:  # no infinities in the format: an overflow is NaN whatever its sign
        return finite | (np.isnan(act) & ((hi == np.inf) | (lo == -np.inf)))
    return finite | ((act == np.inf) & (hi == np.inf)) | ((act == -np.inf) & (lo == -np.inf))


def _least_scale(act: np.ndarray, rng: StoredRange | StoredNormRange, overflow_nan: bool) -> np.ndarray:
    """Per element, the least λ (bisected on log2 λ) whose range holds ``act``; inf if none does."""
    lo_l, hi_l = np.full(act.shape, _LAMBDA_LOG2[0]), np.full(act.shape, _LAMBDA_LOG2[1])
    at_top = _inside(act, *rng.ends(2.0**hi_l), overflow_nan)
    for _ in range(_LAMBDA_STEPS):
        mid = (lo_l + hi_l) / 2
        ok = _inside(act, *rng.ends(2.0**mid), overflow_nan)
        hi_l, lo_l = np.where(ok, mid, hi_l), np.where(ok, lo_l, mid)
    return np.where(at_top, 2.0**hi_l, np.inf)


def compare_stored(act: np.ndarray, exp: np.ndarray, rng: StoredRange | StoredNormRange, name: str) -> Verdict:
    """One stored output against its admissible range (``StoredBounded``)."""
    a = act.astype(np.float64)
    e = exp.astype(np.float64)
    overflow_nan = rng.dtype == "float8_e4m3fn"  # ml_dtypes rounds an overflow to NaN there
    with np.errstate(invalid="ignore", over="ignore"):
        representable = ~np.isfinite(a) | (round_to(a, rng.dtype) == a)
    lo, hi = rng.ends(1.0)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    ok = same | (representable & _inside(a, lo, hi, overflow_nan))
    ratio = np.zeros(a.shape)
    differ = np.flatnonzero(~same & representable)
    if differ.size:
        ratio.flat[differ] = _least_scale(a.flat[differ], rng.subset(differ), overflow_nan)
    ratio[~representable] = np.inf
    ratio = np.where(ok, np.minimum(ratio, 1.0), np.maximum(ratio, np.nextafter(1.0, 2.0)))
    if ratio.size == 0:
        return Verdict(True, 0.0, f"{name}: empty")
    flat = int(np.argmax(ratio))
    i = tuple(int(j) for j in np.unravel_index(flat, a.shape))
    worst, n_over = float(ratio.flat[flat]), int((~ok).sum())
    where = (
        f"{name}: error/bound = {worst:.3g} at {i} (got {float(a[i])!r}, expected {float(e[i])!r}; "
        f"the {rng.dtype} values a correct target can store there: [{float(lo[i])!r}, {float(hi[i])!r}]); "
        f"{n_over} of {a.size} over"
    )
    if not n_over:
        return Verdict(True, worst, where)
    if not representable[i]:
        why = f"{float(a[i])!r} is not a {rng.dtype} value: the result is stored in {rng.dtype} (another format?)"
    else:
        why = (
            f"no {rng.dtype} rounding of a value within {worst:.3g}x the derived bound of the pre-storage result "
            "gives it: rounding in the declared precision cannot explain it (a different formula, a lower "
            "precision than declared, a missing or extra rounding step)"
        )
    return Verdict(False, worst, f"{where}; {why}")


def compare_stored_bounded(
    tol: StoredBounded,
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    case: Mapping[str, Any],
    dtype: str,
) -> Verdict:
    """The stored outputs against their ranges, the others as ``Bounded``; the worst ratio is reported."""
    ranges = tol.stored(case, dtype)
    rest = {k: v for k, v in expected.items() if k not in ranges}
    verdict = compare_bounded(actual, rest, tol.bounds(case, dtype)) if rest else Verdict(True, 0.0)
    if not verdict.passed:
        return verdict
    for name, rng in ranges.items():
        act = actual.get(name)
        if act is None:
            return Verdict(False, float("inf"), f"{name}: missing from the target's result")
        act, exp = np.asarray(act), expected[name]
        if act.shape != exp.shape:
            return Verdict(False, float("inf"), f"{name}: shape {act.shape}, expected {exp.shape}")
        v = compare_stored(act, exp, rng, name)
        if not v.passed:
            return v
        if v.worst_ratio > verdict.worst_ratio or not verdict.message:
            verdict = v
    return verdict


def compare(
    tol: Tolerance,
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    case: Mapping[str, Any],
    dtype: str = "float64",
) -> Verdict:
    """Compare named outputs under a tolerance model; extra outputs of the target are ignored."""
    if isinstance(tol, Exact):
        return compare_exact(actual, expected)
    if isinstance(tol, StoredBounded):
        return compare_stored_bounded(tol, actual, expected, case, dtype)
    return compare_bounded(actual, expected, tol.bounds(case, dtype))
