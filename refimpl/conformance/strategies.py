"""Hypothesis strategies shared by the op rows.

Values are drawn so that derived error bounds stay meaningful: no subnormals and
no products that underflow (every non-zero magnitude is at least 2**-20), and
small shapes, because a counterexample should shrink to something a person can read.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any, Literal

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

#: Smallest non-zero magnitude drawn (keeps products far from the subnormal range).
TINY = 2.0**-20


def _flush_tiny(v: float) -> float:
    return 0.0 if abs(v) < TINY else v


@cache
def reals(low: float = -4.0, high: float = 4.0) -> st.SearchStrategy[float]:
    """Finite floats in [low, high]; magnitudes below 2**-20 become 0."""
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False).map(_flush_tiny)


#: Hypothesis' float ``width`` (bits) per itemsize of the float dtypes drawn (bfloat16 is drawn at 16).
_WIDTHS: dict[int, Literal[16, 32, 64]] = {2: 16, 4: 32, 8: 64}


@cache
def _elements(low: float, high: float, width: Literal[16, 32, 64]) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=width).map(
        _flush_tiny
    )


# strategies are built once per shape and cached: building one inside every draw dominates the run time
@lru_cache(maxsize=4096)
def float_arrays(
    shape: tuple[int, ...], low: float = -4.0, high: float = 4.0, dtype: Any = np.float64
) -> st.SearchStrategy[np.ndarray]:
    """Arrays of ``shape`` with elements from ``reals(low, high)``."""
    return hnp.arrays(dtype, shape, elements=_elements(low, high, _WIDTHS[np.dtype(dtype).itemsize]))


@lru_cache(maxsize=4096)
def keep_masks(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """0/1 float64 keep masks for inverted dropout."""
    return hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0]))


@cache
def dims(low: int = 1, high: int = 8) -> st.SearchStrategy[int]:
    return st.integers(low, high)


# ---------------------------------------------------------------------------- exact golden inputs


def dyadic(rng: np.random.Generator, shape: tuple[int, ...], *, bits: int = 5, scale: float = 2.0) -> np.ndarray:
    """Multiples of 2**-bits in [-scale, scale]: products and sums of a few hundred of them
    are exact in float32 and float64, so a golden output is independent of summation order."""
    step = 2.0**-bits
    n = int(scale / step)
    return rng.integers(-n, n + 1, size=shape).astype(np.float64) * step
