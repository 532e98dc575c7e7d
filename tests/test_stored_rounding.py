"""Results stored in a narrower format: a correct lower-precision target may round twice, and must pass;
a target that skips the safe path's inner rounding or stores in another format must still fail.

The reference stores y = rd(v) (v in float64); a target computing v in float32 stores rd(z), |z − v| ≤ e. Near
a tie of the storage format the two differ by one of its ulps (double rounding): ``StoredBounded`` admits the
values of the format in [rd(v − e), rd(v + e)] (spec/conventions.md, "Results stored in a narrower format").
"""

from __future__ import annotations

import numpy as np
import pytest

from refimpl import bounds, dora, lora, precision
from refimpl.conformance.table import op_table
from refimpl.conformance.tolerance import StoredBounded, compare

F32 = np.float32
ROWS = op_table()
STORAGE = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def _merge32(W, A, B, s, dtype, *, safe=False, sign=1.0):
    """lora.merge / unmerge as a float32 kernel: W ± s·B A in float32, then rounded to ``dtype``."""
    W32, d32 = W.astype(F32), (F32(s) * (B.astype(F32) @ A.astype(F32))).astype(F32)
    if safe:
        d32 = precision.round_to(d32, dtype).astype(F32)
    return precision.round_to((W32 + F32(sign) * d32).astype(F32), dtype)


def _verdict(op, case, got, dtype="float32", name="out"):
    expected = {name: lora.merge(**case) if op == "lora.merge" else None}
    return compare(ROWS[op].tolerance, {name: got}, expected, case, dtype)


# ---------------------------------------------------------------------------- the first-time user's case


def _tie_case():
    # v = 1 + b lies 2⁻²⁸ below the float16 tie 1.41162109375 (between 1.4111328125 and 1.412109375, the
    # even one): b rounds to the tie's fraction in float32, so the float32 sum is the tie and rounds to even,
    # one float16 ulp from rd(v) (the user's case, below, has its float32 error from a 6-term sum instead)
    W = np.array([[1.0]])
    A = np.array([[1.0]])
    B = np.array([[0.41162109375 - 2.0**-28]])
    return {"W": W, "A": A, "B": B, "scaling": 1.0, "dtype": "float16"}


def test_a_float32_merge_rounding_a_tie_twice_conforms_in_float32_and_is_caught_declaring_float64():
    case = _tie_case()
    v = (case["W"] + case["B"] @ case["A"])[0, 0]
    tie = 1.41162109375
    assert 0 < tie - v < 2.0**-24  # within float32 error of the tie
    got = _merge32(case["W"], case["A"], case["B"], 1.0, "float16")
    expected = lora.merge(**case)
    assert got[0, 0] != expected[0, 0]  # double rounding: one float16 ulp apart
    assert abs(got[0, 0] - expected[0, 0]) == precision.ulp(expected[0, 0], "float16")
    ok = compare(ROWS["lora.merge"].tolerance, {"out": got}, {"out": expected}, case, "float32")
    assert ok.passed, ok.message
    assert 0 < ok.worst_ratio <= 1
    bad = compare(ROWS["lora.merge"].tolerance, {"out": got}, {"out": expected}, case, "float64")
    assert not bad.passed and "rounding in the declared precision cannot explain it" in bad.message


def test_the_user_reported_merge_case_conforms_in_float32():
    case = {
        "W": np.array([[-1.2103536128997803]], dtype=F32),
        "A": np.array([[0.0], [0.0], [0.0], [0.6855905652046204], [0.0], [1.8898593187332153]], dtype=F32),
        "B": np.array([[0.0, 0.0, 0.0, -2.479550361633301, 0.0, 1.0617958307266235]], dtype=F32),
        "scaling": -2.0,
        "dtype": "float16",
        "safe": False,
    }
    got = _merge32(case["W"], case["A"], case["B"], -2.0, "float16")
    expected = lora.merge(**case)
    assert got[0, 0] != expected[0, 0]
    v = compare(ROWS["lora.merge"].tolerance, {"out": got}, {"out": expected}, case, "float32")
    assert v.passed, v.message


# ---------------------------------------------------------------------------- random layers: correct kernels pass


def _layer(seed, out_f=24, in_f=40, r=4):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out_f, in_f))
    A, B = rng.standard_normal((r, in_f)) * 0.5, rng.standard_normal((out_f, r)) * 0.5
    return W, A, B


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("safe", [False, True])
def test_float32_merges_into_every_storage_format_pass_and_the_safe_path_is_distinguished(storage, safe):
    # over many layers, correct float32 kernels pass; ignoring ``safe`` fails somewhere (float16 and wider)
    ignored_caught = False
    for seed in range(12):
        W, A, B = _layer(seed)
        s = 0.75 if seed % 2 else -1.5
        case = {"W": W, "A": A, "B": B, "scaling": s, "dtype": storage, "safe": safe}
        expected = {"out": lora.merge(**case)}
        good = compare(
            ROWS["lora.merge"].tolerance, {"out": _merge32(W, A, B, s, storage, safe=safe)}, expected, case, "float32"
        )
        assert good.passed, good.message
        wrong = _merge32(W, A, B, s, storage, safe=not safe)
        ignored_caught |= not compare(ROWS["lora.merge"].tolerance, {"out": wrong}, expected, case, "float32").passed
    assert ignored_caught, "a kernel that ignores safe was never told apart"


@pytest.mark.parametrize("storage", STORAGE)
def test_float32_unmerge_passes_and_rounding_once_is_caught(storage):
    caught = False
    for seed in range(12):
        W, A, B = _layer(100 + seed)
        case = {"W_merged": W, "A": A, "B": B, "scaling": 0.5, "dtype": storage}
        expected = {"out": lora.unmerge(**case)}
        tol = ROWS["lora.unmerge"].tolerance
        good = _merge32(W, A, B, 0.5, storage, safe=True, sign=-1.0)
        v = compare(tol, {"out": good}, expected, case, "float32")
        assert v.passed, v.message
        once = _merge32(W, A, B, 0.5, storage, safe=False, sign=-1.0)  # ΔW not stored first
        caught |= not compare(tol, {"out": once}, expected, case, "float32").passed
    assert caught


@pytest.mark.parametrize("storage", STORAGE)
def test_a_merge_stored_in_float32_instead_of_the_storage_format_fails(storage):
    W, A, B = _layer(7)
    case = {"W": W, "A": A, "B": B, "scaling": 0.75, "dtype": storage}
    got = (W.astype(F32) + (F32(0.75) * (B.astype(F32) @ A.astype(F32))).astype(F32)).astype(F32)
    v = compare(ROWS["lora.merge"].tolerance, {"out": got}, {"out": lora.merge(**case)}, case, "float32")
    assert not v.passed
    assert f"is not a {storage} value" in v.message


def test_a_float16_merge_judged_as_bfloat16_storage_fails():
    W, A, B = _layer(8)
    case = {"W": W, "A": A, "B": B, "scaling": 0.75, "dtype": "bfloat16"}
    got = _merge32(W, A, B, 0.75, "float16")
    v = compare(ROWS["lora.merge"].tolerance, {"out": got}, {"out": lora.merge(**case)}, case, "float32")
    assert not v.passed


# ---------------------------------------------------------------------------- float8 overflow, DoRA


def test_float8_e4m3fn_overflow_is_nan_and_admitted_only_beyond_the_largest_value():
    # v = 470 overflows float8_e4m3fn (largest 448, overflow threshold 464): NaN, as ml_dtypes
    case = {"W": np.array([[400.0]]), "A": np.array([[1.0]]), "B": np.array([[70.0]]), "scaling": 1.0}
    case["dtype"] = "float8_e4m3fn"
    expected = lora.merge(**case)
    assert np.isnan(expected[0, 0])
    tol = ROWS["lora.merge"].tolerance
    assert compare(tol, {"out": np.array([[np.nan]])}, {"out": expected}, case, "float32").passed
    assert not compare(tol, {"out": np.array([[448.0]])}, {"out": expected}, case, "float32").passed
    assert not compare(tol, {"out": np.array([[np.inf]])}, {"out": expected}, case, "float32").passed
    # v = 440 is finite: NaN is not admitted
    case["B"] = np.array([[40.0]])
    expected = lora.merge(**case)
    assert not compare(tol, {"out": np.array([[np.nan]])}, {"out": expected}, case, "float32").passed


def test_stored_range_holds_every_double_rounding_of_values_within_the_bound():
    # rd(z) for z = v ± e (and the points between) lies in [rd(v − e), rd(v + e)]; rd(v) itself has λ = 0
    rng = np.random.default_rng(5)
    v = rng.standard_normal(2000) * 3
    e = np.abs(v) * 2.0**-20
    for storage in STORAGE:
        r = bounds.StoredRange(storage, v, e)
        lo, hi = r.ends(1.0)
        for t in np.linspace(-1, 1, 9):
            z = precision.round_to(v + t * e, storage)
            assert ((lo <= z) & (z <= hi)).all()
        lo0, hi0 = r.ends(0.0)
        assert (lo0 == hi0).all() and (lo0 == precision.round_to(v, storage)).all()


@pytest.mark.parametrize("op", ["dora.merge", "dora.unmerge"])
def test_dora_rows_store_through_the_stored_range(op):
    assert isinstance(ROWS[op].tolerance, StoredBounded)
    rng = np.random.default_rng(9)
    W, A, B = rng.standard_normal((6, 16)), rng.standard_normal((2, 16)), rng.standard_normal((6, 2))
    m = np.abs(rng.standard_normal(6)) + 0.5
    if op == "dora.merge":
        case = {"W": W, "A": A, "B": B, "m": m, "scaling": 0.5, "dtype": "bfloat16"}
        exact = dora.merge(**{**case, "dtype": None})
        exp = dora.merge(**case)
        expected, name = {"out.W": exp.W, "out.weight_norm": exp.weight_norm}, "out.W"
        v = exact.W
        others = {"out.weight_norm": exp.weight_norm}
    else:
        n = np.abs(rng.standard_normal(6)) + 1.0
        case = {"W_merged": W, "A": A, "B": B, "m": m, "scaling": 0.5, "weight_norm": n, "dtype": "bfloat16"}
        v = dora.unmerge(**{**case, "dtype": None})
        expected, name, others = {"out": dora.unmerge(**case)}, "out", {}
    tol = ROWS[op].tolerance
    # a float32 evaluation: v within a few float32 ulps, then stored; float32 (not stored) is caught
    z = (v * (1 + 2.0**-23)).astype(F32)
    got = {name: precision.round_to(z, "bfloat16"), **others}
    assert compare(tol, got, expected, case, "float32").passed
    assert not compare(tol, {name: z.astype(np.float64), **others}, expected, case, "float32").passed
    assert not compare(tol, {name: precision.round_to(v, "float16"), **others}, expected, case, "float32").passed


def _init_magnitude32(W, A, B, s, dtype):
    """PEFT's magnitude in a storage format, each stage computed in float32 and stored (dora.init_magnitude)."""

    def rd(x):
        return precision.round_to(np.asarray(x, dtype=F32), dtype).astype(F32)

    w = rd(W.astype(F32))
    low_rank = rd(F32(s) * rd(B.astype(F32) @ A.astype(F32)))
    V = rd(w + low_rank)
    return precision.round_to(np.sqrt((V * V).sum(axis=1, dtype=F32)), dtype)


@pytest.mark.parametrize("storage", STORAGE)
def test_a_float32_init_magnitude_passes_and_rounding_the_float64_norm_once_fails(storage):
    tol, caught = ROWS["dora.init_magnitude"].tolerance, False
    for seed in range(12):
        rng = np.random.default_rng(200 + seed)
        W, A, B = rng.standard_normal((16, 48)), rng.standard_normal((3, 48)) * 0.5, rng.standard_normal((16, 3))
        s = 0.5 if seed % 2 else -2.0
        case = {"W": W, "A": A, "B": B, "scaling": s, "dtype": storage}
        expected = {"out": dora.init_magnitude(**case)}
        v = compare(tol, {"out": _init_magnitude32(W, A, B, s, storage)}, expected, case, "float32")
        assert v.passed, v.message
        once = precision.round_to(dora.init_magnitude(**{**case, "dtype": None}), storage)
        caught |= not compare(tol, {"out": once}, expected, case, "float32").passed
    assert caught, "rounding the float64 norm once was never told apart"
