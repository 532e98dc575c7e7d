"""The bitsandbytes-cuda profile's rules (spec/nf4.md §9, §15), checked on CPU.

bitsandbytes' CUDA quantizer (csrc/kernels.cu, built with --use_fast_math) computes
s = x · rcp.approx.ftz.f32(absmax) and decides FP4 with ``x > literal`` on |s| against seven
float literals. These tests pin the decision at the float32 neighbours of each literal, the measured
reciprocal (its table and its invariants), regression vectors measured on an NVIDIA H200, and the
checker's classification relative to the literals.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import quant
from refimpl.quant import blockwise, codebooks, cuda_rcp

# The literals exactly as they are written in dQuantizeFP4 (csrc/kernels.cu, bitsandbytes 0.50.2),
# in the order of the magnitudes they separate: 0 | 1/192 | 1/6 | 1/4 | 1/3 | 1/2 | 2/3 | 1 (× 1/12 · 12).
SOURCE_LITERALS = ("0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")
FP4_MAGNITUDES = (
    Fraction(0),
    Fraction(1, 192),
    Fraction(1, 6),
    Fraction(1, 4),
    Fraction(1, 3),
    Fraction(1, 2),
    Fraction(2, 3),
    Fraction(1),
)

# Measured on an NVIDIA H200 with bitsandbytes 0.50.2 CUDA (bench/results/bnb-cuda-compare-h200.json, the
# first nibble of each case that the profile with a correctly rounded reciprocal got "wrong"):
# (absmax bits, x bits, nibble bitsandbytes stored for x in a float32 FP4 block whose absmax is that value).
H200_FP4_VECTORS = (
    ("40a35fec", "3c59d54e", 1),
    ("4080bb37", "bc2ba458", 8),
    ("3fae6cfa", "bb689162", 9),
    ("3fd16657", "3b8b999b", 1),
    ("3fe98774", "3f8839aa", 5),
    ("403ead77", "bbfe3cb5", 9),
    ("40cbae2b", "c06da080", 13),
)

_F32_MAX = np.finfo(np.float32).max


def f32(hexbits: str) -> np.float32:
    return np.array(int(hexbits, 16), dtype=np.uint32).view(np.float32)[()]


def literal_f32(text: str) -> np.float32:
    """Correctly rounded float32 of a decimal literal (as the CUDA compiler reads `text` + 'f')."""
    exact = Fraction(text)
    c = np.float32(float(text))
    candidates = [np.nextafter(c, np.float32(-1)), c, np.nextafter(c, np.float32(2))]
    return min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.array(v).view(np.uint32)) & 1))


def fp4_nibble_of_value(v: Fraction, negative: bool) -> int:
    """The nibble whose code is the FP4 value ±v (from the codebook table, sign bit 8)."""
    table = codebooks.codebook("fp4")
    for nib in range(8):
        if Fraction(float(table[nib])) == Fraction(float(np.float32(float(v)))):
            return nib + (8 if negative else 0)
    raise AssertionError(v)


# ------------------------------------------------------------------------------------------- FP4 decisions


def test_profile_literals_are_the_source_literals_rounded_to_float32():
    got = np.array(codebooks.FP4_CUDA_THRESHOLDS, dtype=np.float32)
    want = np.array([literal_f32(t) for t in SOURCE_LITERALS], dtype=np.float32)
    assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()


@pytest.mark.parametrize("j", range(7))
@pytest.mark.parametrize("negative", [False, True])
def test_fp4_cuda_decision_at_the_float32_neighbours_of_each_literal(j, negative):
    lit = literal_f32(SOURCE_LITERALS[j])
    below, above = np.nextafter(lit, np.float32(0)), np.nextafter(lit, np.float32(1))
    s = np.array([below, lit, above], dtype=np.float32)
    if negative:
        s = -s
    got = blockwise.nibbles_of_scaled(s, "fp4", "bitsandbytes-cuda").tolist()
    lower = fp4_nibble_of_value(FP4_MAGNITUDES[j], negative)
    upper = fp4_nibble_of_value(FP4_MAGNITUDES[j + 1], negative)
    # |s| > literal takes the larger magnitude; equality stays below (the comparison is strict).
    assert got == [lower, lower, upper]


def test_fp4_cuda_sign_rules_for_zero_tiny_and_nan():
    s = np.array([0.0, -0.0, 1e-3, -1e-3, np.nan, -np.nan, 1.0, -1.0], dtype=np.float32)
    got = blockwise.nibbles_of_scaled(s, "fp4", "bitsandbytes-cuda").tolist()
    # sign = 8 only when s < 0: −0.0 and NaN get the positive zero; tiny negatives get nibble 8.
    assert got == [0, 0, 0, 8, 0, 0, 3, 11]


# The 15 literals of dQuantizeNF4 as written in the source (ascending).
NF4_SOURCE_LITERALS = (
    "-0.8480964004993439",
    "-0.6106329262256622",
    "-0.4599952697753906",
    "-0.33967943489551544",
    "-0.23460740596055984",
    "-0.13791173323988914",
    "-0.045525018125772476",
    "0.03979014977812767",
    "0.1202552504837513",
    "0.2035212516784668",
    "0.2920137718319893",
    "0.3893125355243683",
    "0.5016634166240692",
    "0.6427869200706482",
    "0.8614784181118011",
)


def test_nf4_cuda_thresholds_are_the_source_literals_correctly_rounded():
    got = codebooks.nf4_cuda_thresholds()
    want = np.array([literal_f32(t) for t in NF4_SOURCE_LITERALS], dtype=np.float32)
    assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()
    # Each literal is within 1e-16 of a float32 midpoint (halfway between two float32 numbers); four of
    # them round to the other neighbour than the CPU rule's float32 midpoint f32((c_j + c_{j+1})/2).
    ulps = got.view(np.int32).astype(np.int64) - codebooks.midpoints("nf4").view(np.int32).astype(np.int64)
    ulps = np.where(got < 0, -ulps, ulps)  # in value order
    print(f"[nf4 cuda literal − float32 midpoint, ulps] {ulps.tolist()}")
    assert {j: int(u) for j, u in enumerate(ulps) if u} == {0: -1, 8: 1, 12: -1, 14: -1}


@pytest.mark.parametrize("j", range(15))
def test_nf4_cuda_decision_at_the_float32_neighbours_of_each_literal(j):
    lit = literal_f32(NF4_SOURCE_LITERALS[j])
    s = np.array([np.nextafter(lit, np.float32(-1)), lit, np.nextafter(lit, np.float32(1))], dtype=np.float32)
    # x > literal_j picks code j + 1 (the tree's comparisons are strict); NF4 nibbles are sorted.
    assert blockwise.nibbles_of_scaled(s, "nf4", "bitsandbytes-cuda").tolist() == [j, j, j + 1]
    assert blockwise.nibbles_of_scaled(np.array([np.nan], np.float32), "nf4", "bitsandbytes-cuda")[0] == 0


# ------------------------------------------------------------------------------------------- the reciprocal


def test_measured_reciprocal_table_is_present_and_within_one_ulp():
    info = cuda_rcp.table_info()
    d = cuda_rcp._delta_table()
    assert info["table"] == cuda_rcp.TABLE_PATH.name and d is not None
    assert d.shape == (1 << 23,) and set(np.unique(d).tolist()) <= {-1, 0, 1}
    assert d[0] == 0  # 1/1.0 is exact
    share = (d != 0).mean()
    print(
        f"[rcp.approx.ftz.f32 sm_90] +1 ulp: {info['plus_one_ulp']}, −1 ulp: {info['minus_one_ulp']}, "
        f"share differing from RN(1/a): {share:.4f}"
    )
    assert 0 < share < 0.5


def _exact_bracket(a: np.float32) -> tuple[np.float32, np.float32]:
    """The float32 values just below and above 1/a (equal when 1/a is a float32)."""
    exact = 1 / Fraction(float(a))
    r = np.float32(float(exact))
    lo = r if Fraction(float(r)) <= exact else np.nextafter(r, np.float32(0))
    hi = r if Fraction(float(r)) >= exact else np.nextafter(r, np.float32(np.inf))
    return lo, hi


@given(st.floats(min_value=float(np.finfo(np.float32).tiny), max_value=2.0**126, width=32))
def test_rcp_approx_is_one_of_the_two_float32_neighbours_of_the_exact_reciprocal(a):
    a = np.float32(a)
    r = cuda_rcp.rcp_approx_ftz(np.array([a, -a], dtype=np.float32))
    lo, hi = _exact_bracket(a)
    assert r[0] in (lo, hi)
    assert r[1] == -r[0]


@given(st.integers(min_value=0, max_value=(1 << 23) - 1), st.integers(min_value=-60, max_value=60))
def test_rcp_approx_depends_on_the_significand_only(m, k):
    a = np.array(m | (127 << 23), dtype=np.uint32).view(np.float32)
    scaled = np.float32(a * np.float32(2.0**k))
    assert cuda_rcp.rcp_approx_ftz(scaled) == np.float32(cuda_rcp.rcp_approx_ftz(a) * np.float32(2.0**-k))


def test_rcp_approx_special_values_flush_to_zero():
    a = np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -_F32_MAX, 2.0**127], dtype=np.float32)
    r = cuda_rcp.rcp_approx_ftz(a)
    assert r[:5].tolist() == [np.inf, -np.inf, 0.0, -0.0, np.inf]
    assert np.signbit(r[3]) and np.signbit(r[5]) and r[5] == 0  # 1/−FLT_MAX is subnormal → −0
    assert r[6] == 0  # 2^-127 is subnormal → +0
    assert np.isnan(cuda_rcp.rcp_approx_ftz(np.array([np.nan], dtype=np.float32))[0])


def test_rcp_approx_rejects_non_float32():
    with pytest.raises(TypeError, match="a: expected float32"):
        cuda_rcp.rcp_approx_ftz(np.array([1.0]))
    with pytest.raises(TypeError, match="a: expected float32"):
        cuda_rcp.rcp_approx_ftz(np.array([1], dtype=np.int32))


# ------------------------------------------------------------------------------------------- H200 vectors


@pytest.mark.parametrize("a_hex,x_hex,nibble", H200_FP4_VECTORS)
def test_profile_reproduces_nibbles_measured_on_h200(a_hex, x_hex, nibble):
    block = np.zeros(32, dtype=np.float32)
    block[0], block[1] = f32(a_hex), f32(x_hex)
    packed, state = quant.quantize_4bit(block, 32, "fp4", profile="bitsandbytes-cuda")
    got = blockwise.unpack_nibbles(packed, 32)[1]
    # With the correctly rounded reciprocal the same x lands on the other side of a literal.
    ieee = blockwise.nibbles_of_scaled(
        np.array([block[1] * (np.float32(1) / block[0])], np.float32), "fp4", "bitsandbytes-cuda"
    )[0]
    print(f"[h200 fp4] a={block[0]!r} x={block[1]!r}: measured {nibble}, profile {got}, with RN(1/a) {ieee}")
    assert got == nibble
    assert ieee != nibble
    assert state.absmax[0] == block[0]


def test_reference_and_cpu_profiles_do_not_use_the_approximate_reciprocal():
    for a_hex, x_hex, _nibble in H200_FP4_VECTORS:
        block = np.zeros(32, dtype=np.float32)
        block[0], block[1] = f32(a_hex), f32(x_hex)
        s = np.float32(block[1] * (np.float32(1) / block[0]))  # the CPU rule: x · f32(1/a)
        want = codebooks.FP4_ORDER[int(np.searchsorted(codebooks.midpoints("fp4"), s, side="left"))]
        for profile in ("reference", "bitsandbytes-cpu"):
            packed, _ = quant.quantize_4bit(block, 32, "fp4", profile=profile)
            assert blockwise.unpack_nibbles(packed, 32)[1] == want, profile


# ------------------------------------------------------------------------------------------- the checker


def _flip_case(a: np.float32, x: np.float32, new_nibble: int):
    block = np.zeros(32, dtype=np.float32)
    block[0], block[1] = a, x
    packed, state = quant.quantize_4bit(block, 32, "fp4", profile="bitsandbytes-cuda")
    nib = blockwise.unpack_nibbles(packed, 32).copy()
    nib[1] = new_nibble
    return blockwise.pack_nibbles(nib), state, block


def test_checker_measures_fp4_cuda_differences_from_the_literal_not_the_midpoint():
    # s = x/a one ulp above CUDA's 0.00260417f, which is 14 float32 ulps above the midpoint 1/384:
    # an implementation deciding "0" there is one reciprocal rounding away, i.e. admissible.
    lit = literal_f32(SOURCE_LITERALS[0])
    x = np.nextafter(lit, np.float32(1))
    packed, state, block = _flip_case(np.float32(1.0), x, 0)
    rep = quant.check_4bit(packed, state, block, profile="bitsandbytes-cuda")
    print(f"[check fp4 cuda at literal 1/384] {rep}")
    assert rep.n_admissible == 1 and rep.n_wrong == 0
    # The same flip judged against the reference profile's midpoint is 13+ ulps away: wrong.
    ref_packed, ref_state = quant.quantize_4bit(block, 32, "fp4", profile="reference")
    nib = blockwise.unpack_nibbles(ref_packed, 32).copy()
    assert nib[1] == 1  # CPU rule: above the midpoint 1/384 → 1/192
    nib[1] = 0
    rep_ref = quant.check_4bit(blockwise.pack_nibbles(nib), ref_state, block, profile="reference")
    assert rep_ref.n_wrong == 1


def test_checker_calls_a_far_fp4_cuda_difference_wrong():
    # s = 0.5 lies in the middle of the 5/12 .. 7/12 interval: a different neighbour is a bug.
    packed, state, block = _flip_case(np.float32(1.0), np.float32(0.5), 2)
    rep = quant.check_4bit(packed, state, block, profile="bitsandbytes-cuda")
    assert rep.n_wrong == 1 and rep.first_wrong == (2, 5)


# ------------------------------------------------------------------------------------------- H200 replay


def test_nf4_literals_account_for_every_nf4_difference_measured_on_h200():
    """bench/results/bnb-cuda-compare-h200-midpoints.json was measured on the H200 while the profile still
    decided NF4 at the float32 midpoints (the current profile measures 0 differences:
    bnb-cuda-compare-h200.json). Regenerating the script's data (seed 0), the nibbles where the CUDA literals and the
    midpoints disagree (same s, same reciprocal) match the measured differences case by case."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("bnb_cuda_compare", root / "bench" / "bnb_cuda_compare.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    measured = json.loads((root / "bench" / "results" / "bnb-cuda-compare-h200-midpoints.json").read_text())
    assert measured["size_per_case"] == 16421 and measured["seed"] == 0
    by_case = {
        (r["quant_type"], r["dtype"], r["blocksize"], r["nested"], r["kind"]): r["bitsandbytes-cuda"]
        for r in measured["cases_4bit"]
    }
    rng = np.random.default_rng(0)
    total = cases = 0
    for quant_type in ("nf4", "fp4"):
        for dtype in bench.DTYPES:
            for bs in bench.BLOCKSIZES:
                for nested in (False, True):
                    for kind in bench.KINDS:
                        x = bench.make_data(kind, 16421, quant_type, dtype, bs, rng)
                        if quant_type != "nf4":
                            continue
                        flat = x.reshape(-1).astype(np.float32)
                        steps = blockwise.profile_steps("bitsandbytes-cuda")
                        with np.errstate(invalid="ignore"):  # 0 · rcp(0) = NaN in an all-zero block
                            s = steps.scaled(flat, steps.block_absmax(flat, bs), bs)
                        at_literals = blockwise.nibbles_of_scaled(s, "nf4", "bitsandbytes-cuda")
                        at_midpoints = np.searchsorted(codebooks.midpoints("nf4"), s, side="left")
                        at_midpoints = np.where(np.isnan(s), 0, at_midpoints)
                        n = int((at_literals != at_midpoints).sum())
                        entry = by_case[(quant_type, dtype, bs, nested, kind)]
                        assert n == entry["nibbles_differ"] == entry["admissible"], (dtype, bs, nested, kind)
                        total += n
                        cases += 1
    print(
        f"[h200 nf4 replay] cases={cases} nibbles where literals and midpoints disagree={total} "
        f"(= measured differences)"
    )
    assert total > 0


# Measured on an NVIDIA H200 with bitsandbytes 0.50.2 CUDA (bench/bnb_cuda_subnormal_probe.py,
# bench/results/bnb-cuda-subnormal-probe-first.json): dequantization stored no subnormal value; with absmax in
# [1e-45, 4e-38] and every code, its output equalled the reference's with subnormals flushed to signed zeros.
_TINY = np.finfo(np.float32).tiny


def _every_code_state(quant_type: str, absmax: np.ndarray) -> tuple[np.ndarray, quant.QuantState]:
    nib = np.arange(16, dtype=np.uint8)
    packed = np.tile((nib[0::2] << 4) | nib[1::2], 4 * absmax.size).astype(np.uint8).reshape(-1, 1)
    state = quant.QuantState(
        shape=(64 * absmax.size,),
        dtype="float32",
        blocksize=64,
        quant_type=quant_type,
        absmax=absmax.astype(np.float32),
        code=codebooks.codebook(quant_type),
    )
    return packed, state


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_dequantization_flushes_subnormal_scales_and_products_to_signed_zeros(quant_type):
    """bitsandbytes-cuda: x̂ = ftz(code · ftz(a)); the reference keeps the subnormal product. Every value the
    two differ in is a reference subnormal whose flushed value (0 with the product's sign) the profile gives."""
    absmax = np.float32([1e-45, 1e-40, 5e-39, 1.1e-38, 1.2e-38, 2e-38, 4e-38, 1.0])
    packed, state = _every_code_state(quant_type, absmax)
    ref = quant.dequantize_4bit(packed, state, profile="reference")
    cuda = quant.dequantize_4bit(packed, state, profile="bitsandbytes-cuda")
    subnormal = (ref != 0) & (np.abs(ref) < _TINY)
    normal = np.abs(ref) >= _TINY  # (zeros: FP4's nibble 8 is −0.0 in this profile, +0.0 in the reference)
    assert subnormal.sum() > 200
    assert not ((cuda != 0) & (np.abs(cuda) < _TINY)).any()
    assert np.array_equal(cuda[subnormal], np.zeros(subnormal.sum(), np.float32))
    assert np.array_equal(np.signbit(cuda[subnormal]), np.signbit(ref[subnormal]))
    assert np.array_equal(cuda[normal].view(np.uint32), ref[normal].view(np.uint32))


def test_cuda_nested_scale_flushes_the_8bit_product_but_adds_the_offset_exactly():
    """Nested: â = f32(ftz(d[q] · ftz(a2)) + offset) — a subnormal a2 zeroes the product, the subnormal offset
    survives torch's add (and is then flushed by the 4-bit product); the reference rebuilds d[q]·a2 + offset."""
    dyn = codebooks.codebook("dynamic8")
    codes = np.array([255, 200, 128], dtype=np.uint8)
    state = quant.QuantState(
        shape=(3 * 64,),
        dtype="float32",
        blocksize=64,
        quant_type="nf4",
        absmax=codes,
        code=codebooks.codebook("nf4"),
        offset=np.float32(3e-39),
        nested_absmax=np.float32([6e-39]),
        nested_code=dyn,
        nested_blocksize=256,
    )
    cuda = blockwise.block_scales(state, "bitsandbytes-cuda")
    ref = blockwise.block_scales(state, "reference")
    assert np.array_equal(cuda, np.full(3, np.float32(3e-39)))
    want_ref = (dyn[codes].astype(np.float32) * np.float32(6e-39) + np.float32(3e-39)).astype(np.float32)
    assert np.array_equal(ref, want_ref)
    assert np.array_equal(ref, state.block_absmax())
    packed = np.full((96, 1), 0xF0, dtype=np.uint8)  # codes 15 and 0 alternate
    out = quant.dequantize_4bit(packed, state, profile="bitsandbytes-cuda")
    assert not out.any()
