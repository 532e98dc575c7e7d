"""Spherical linear interpolation (SLERP) of two weight tensors, flattened.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; as used for model
merging by mergekit (``merge_methods/slerp.py``). For v₀, v₁ flattened, v̂ = v/‖v‖ (only when
‖v‖ > eps), cos Ω = ⟨v̂₀, v̂₁⟩ clamped to [−1, 1]:

    slerp(t; v₀, v₁) = sin((1 − t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁,

with the unnormalised endpoints, and linear interpolation (1 − t)v₀ + t v₁ when |cos Ω| > 0.9995
(near-colinear or antiparallel). t = 0 gives v₀ (the base), t = 1 gives v₁.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, precision
from refimpl.merging import operands

#: mergekit's DOT_THRESHOLD and normalisation guard.
DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class SlerpCoefficients:
    """slerp(t; v₀, v₁) = c0·v₀ + c1·v₁; ``linear`` tells whether the fallback was taken."""

    c0: float
    c1: float
    dot: float  #: cos Ω of the normalised, flattened endpoints, clamped to [−1, 1]
    linear: bool


def _operands(t: Any, v0: Any, v1: Any) -> tuple[float, np.ndarray, np.ndarray]:
    t = _checks.real(t, "t", low=0.0, high=1.0)
    a, a_dtype = operands.as_float(v0, "v0")
    b, b_dtype = operands.as_float(v1, "v1")
    _checks.same_shape(a, "v0", b, "v1")
    if a_dtype != b_dtype:
        raise ValueError(f"v1: expected dtype {a_dtype} (the dtype of v0), got dtype {b_dtype}")
    return t, a, b


def _coefficients(t: float, a: np.ndarray, b: np.ndarray, dot_threshold: float, eps: float) -> SlerpCoefficients:
    na = float(np.linalg.norm(a.ravel()))
    nb = float(np.linalg.norm(b.ravel()))
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = float(np.clip(np.dot(a.ravel() / na, b.ravel() / nb), -1.0, 1.0))
    if abs(dot) > dot_threshold:
        return SlerpCoefficients(1.0 - t, t, dot, True)
    omega = float(np.arccos(dot))
    s = np.sin(omega)
    return SlerpCoefficients(float(np.sin((1.0 - t) * omega) / s), float(np.sin(t * omega) / s), dot, False)


@precision._overflow_checked
def slerp_coefficients(
    t: float, v0: npt.ArrayLike, v1: npt.ArrayLike, *, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS
) -> SlerpCoefficients:
    """The two scalars c0, c1 of ``slerp`` (and cos Ω), computed in float64."""
    t, a, b = _operands(t, v0, v1)
    return _coefficients(
        t, a, b, _checks.real(dot_threshold, "dot_threshold", low=0.0, high=1.0), _checks.real(eps, "eps", low=0.0)
    )


@precision._overflow_checked
def slerp(
    t: float, v0: npt.ArrayLike, v1: npt.ArrayLike, *, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS
) -> npt.NDArray[np.float64]:
    """SLERP between base v0 (t = 0) and v1 (t = 1) over the whole flattened tensor, in float64.

    mergekit computes the same formula in float32 (float64 only for float64 inputs) and returns
    the input dtype; compare with a bound (tests/test_merging_peers.py derives it).
    """
    t, a, b = _operands(t, v0, v1)
    c = _coefficients(
        t, a, b, _checks.real(dot_threshold, "dot_threshold", low=0.0, high=1.0), _checks.real(eps, "eps", low=0.0)
    )
    return c.c0 * a + c.c1 * b
