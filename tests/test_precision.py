"""Rounding emulation, ulps and error bounds (refimpl.precision)."""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import precision

finite64 = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e30, max_value=1e30)


@given(finite64)
def test_round_to_bfloat16_is_a_single_correct_rounding(x):
    got = precision.round_to(np.array([x]), "bfloat16")[0]
    # the result is a bf16 value and no other bf16 value is closer (ties: even significand)
    assert np.array([got]).astype(ml_dtypes.bfloat16).astype(np.float64)[0] == got
    step = precision.ulp(got, "bfloat16")[()] if got != 0 else precision.finfo("bfloat16").smallest_subnormal
    assert abs(Fraction(got) - Fraction(x)) <= Fraction(float(step)) / 2


def test_round_to_bfloat16_avoids_double_rounding():
    # 1 + 2^-8 + 2^-30: float32 rounds to the bf16 tie 1 + 2^-8, which then rounds to even (1.0);
    # the correct single rounding is 1 + 2^-7 because x is above the midpoint.
    x = 1 + 2**-8 + 2**-30
    assert np.array([x]).astype(ml_dtypes.bfloat16).astype(np.float64)[0] == 1.0  # ml_dtypes double-rounds
    assert precision.round_to([x], "bfloat16")[0] == 1 + 2**-7


@given(finite64)
def test_round_to_float32_and_float16_agree_with_numpy_casts(x):
    with np.errstate(over="ignore"):
        assert precision.round_to([x], "float32")[0] == np.float64(np.float32(x))
        assert precision.round_to([x], "float16")[0] == np.float64(np.float16(x))


_BF16_BITS = np.arange(2**16, dtype=np.uint16).view(ml_dtypes.bfloat16)
_BF16_BITS = _BF16_BITS[np.isfinite(_BF16_BITS.astype(np.float32))]
_ALL_BF16 = np.unique(_BF16_BITS.astype(np.float64))  # sorted distinct finite values (−0 and +0 are one value)


@given(st.integers(0, len(_ALL_BF16) - 1), st.integers(0, 300))
def test_ulp_distance_counts_representable_bfloat16_steps(i, steps):
    j = min(i + steps, len(_ALL_BF16) - 1)
    assert precision.ulp_distance(_ALL_BF16[[i]], _ALL_BF16[[j]], "bfloat16")[0] == j - i


def test_ulp_distance_across_zero_and_neighbours():
    one = np.array([1.0])
    nxt = one + 2**-7
    assert precision.ulp_distance(one, nxt, "bfloat16")[0] == 1
    assert precision.ulp_distance([-0.0], [0.0], "float32")[0] == 0
    tiny = precision.finfo("float32").smallest_subnormal
    assert precision.ulp_distance([-tiny], [tiny], "float32")[0] == 2


def test_unit_roundoffs_are_the_textbook_values():
    assert precision.unit_roundoff("float64") == 2.0**-53
    assert precision.unit_roundoff("float32") == 2.0**-24
    assert precision.unit_roundoff("float16") == 2.0**-11
    assert precision.unit_roundoff("bfloat16") == 2.0**-8


@given(st.integers(1, 256), st.integers(0, 2**32 - 1))
def test_float32_dot_products_stay_within_the_gamma_bound(k, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(k), rng.standard_normal(k)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    acc = np.float32(0)
    for i in range(k):  # sequential fp32 accumulation: the worst order for the bound's derivation
        acc = np.float32(acc + np.float32(a32[i] * b32[i]))
    exact = float(np.dot(a32.astype(np.float64), b32.astype(np.float64)))
    bound = precision.matmul_error_bound(a32[None, :], b32[:, None], "float32", extra_roundings=0)[0, 0]
    assert abs(float(acc) - exact) <= bound


def test_compare_to_bound_reports_the_worst_element_and_counts():
    rep = precision.compare_to_bound([1.0, 2.0, 3.5], [1.0, 2.1, 3.0], [0.1, 0.2, 0.25])
    assert rep.worst_index == (2,) and rep.worst_ratio == pytest.approx(2.0) and rep.n_over == 1
    assert not rep.passed and "1 of 3 over" in str(rep)
    assert precision.compare_to_bound([np.nan], [np.nan], [0.0]).passed
    assert not precision.compare_to_bound([1.0], [1.0 + 1e-12], [0.0]).passed
