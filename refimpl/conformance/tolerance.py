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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refimpl import precision
from refimpl.bounds import differential


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
    return compare_bounded(actual, expected, tol.bounds(case, dtype))
