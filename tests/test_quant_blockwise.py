"""Blockwise 4-bit/8-bit quantization: properties, the special-value table, bad input (spec/nf4.md)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refimpl import precision, quant
from refimpl.quant import QuantState, blockwise, codebooks, profiles

U32 = precision.unit_roundoff("float32")


def float32_data(max_size: int = 400):
    """Finite float32 arrays; magnitudes below 1e-30 become 0 so no block has a subnormal absmax."""
    elems = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)
    return hnp.arrays(np.float32, st.integers(1, max_size), elements=elems).map(
        lambda a: np.where(np.abs(a) < 1e-30, np.float32(0), a).astype(np.float32)
    )


quant_types = st.sampled_from(["nf4", "fp4"])
blocksizes = st.sampled_from([32, 64, 128])


@given(st.lists(st.integers(0, 15), min_size=1, max_size=300))
def test_unpack_inverts_pack(nibbles):
    packed = quant.pack_nibbles(np.array(nibbles))
    assert packed.shape == ((len(nibbles) + 1) // 2, 1)
    assert quant.unpack_nibbles(packed, len(nibbles)).tolist() == nibbles


def test_pack_puts_the_first_element_in_the_high_nibble():
    assert quant.pack_nibbles(np.array([1, 2, 3]), pad=7).ravel().tolist() == [0x12, 0x37]


@given(float32_data(), quant_types, blocksizes)
def test_dequantization_error_is_within_half_the_largest_code_gap_times_absmax(x, quant_type, bs):
    """|x̂ − x| ≤ a_b · (g/2 + 4u): g/2 for the nearest code, 2u for computing s = x·(1/a) and
    2u for the float32 product code·a and its storage (u = 2⁻²⁴)."""
    packed, state = quant.quantize_4bit(x, bs, quant_type)
    xhat = quant.dequantize_4bit(packed, state).astype(np.float64)
    gap = float(np.diff(codebooks.sorted_codebook(quant_type).astype(np.float64)).max())
    a = np.repeat(state.absmax.astype(np.float64), bs)[: x.size]
    err = np.abs(xhat - x.astype(np.float64))
    assert np.all(err <= a * (gap / 2 + 4 * U32))


@given(float32_data(), quant_types, blocksizes)
def test_requantizing_dequantized_values_returns_the_same_codes(x, quant_type, bs):
    """quantize(dequantize(q)) == q in the reference profile; FP4 nibble 8 (the −0 nibble a tiny
    positive value gets) comes back as nibble 0, the same value (spec/nf4.md §4.3)."""
    packed, state = quant.quantize_4bit(x, bs, quant_type)
    again, state2 = quant.quantize_4bit(quant.dequantize_4bit(packed, state), bs, quant_type)
    n = x.size
    q1, q2 = quant.unpack_nibbles(packed, n), quant.unpack_nibbles(again, n)
    if quant_type == "fp4":
        q1 = np.where(q1 == 8, 0, q1)
    assert q1.tolist() == q2.tolist()
    assert state2.absmax.view(np.uint32).tolist() == state.absmax.view(np.uint32).tolist()


@given(float32_data(600), quant_types, st.sampled_from([32, 64]), st.data())
def test_without_double_quant_a_blocks_bytes_depend_only_on_that_block(x, quant_type, bs, data):
    packed, state = quant.quantize_4bit(x, bs, quant_type)
    k = data.draw(st.integers(0, state.n_blocks - 1), label="block")
    lo, hi = k * bs, min(x.size, (k + 1) * bs)
    y = x.copy()
    y[lo:hi] = data.draw(hnp.arrays(np.float32, hi - lo, elements=st.floats(-10, 10, width=32)), label="new block")
    packed2, state2 = quant.quantize_4bit(y, bs, quant_type)
    outside = np.ones(packed.size, bool)
    outside[lo // 2 : (hi + 1) // 2] = False
    assert np.array_equal(packed.ravel()[outside], packed2.ravel()[outside])
    others = np.arange(state.n_blocks) != k
    assert np.array_equal(state.absmax[others], state2.absmax[others])


@given(float32_data(2000), quant_types, st.sampled_from([32, 64]))
def test_double_quant_dequantized_absmax_error_is_within_the_8bit_map_resolution(x, quant_type, bs):
    """â_b differs from a_b by at most a2 · (largest dynamic-map gap / 2 + rounding) (spec §7)."""
    _, state = quant.quantize_4bit(x, bs, quant_type, double_quant=True)
    _, plain = quant.quantize_4bit(x, bs, quant_type)
    d = quant.codebook("dynamic8").astype(np.float64)
    half_gap = max(np.diff(d).max() / 2, 1 + d[0])  # −1 is not in the map: the most negative value
    a2 = np.repeat(state.nested_absmax.astype(np.float64), 256)[: state.n_blocks]
    err = np.abs(state.block_absmax().astype(np.float64) - plain.absmax)
    slack = 8 * U32 * (np.abs(plain.absmax) + abs(float(state.offset)) + a2)
    assert np.all(err <= a2 * half_gap + slack)


def test_storage_cost_matches_the_qlora_paper():
    assert quant.storage_bits_per_parameter(64) - 4 == 0.5
    assert round(quant.storage_bits_per_parameter(64, True) - 4, 3) == 0.127


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_output_dtype_and_shape_follow_the_input(dtype):
    x = np.linspace(-3, 3, 2 * 33, dtype=np.float32).reshape(2, 33).astype(dtype)
    packed, state = quant.quantize_4bit(x, 32)
    out = quant.dequantize_4bit(packed, state)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 33)
    assert packed.shape == (33, 1) and packed.dtype == np.uint8


def test_float64_is_rounded_to_float32_once_in_the_reference_profile():
    x = np.array([0.1, -0.7, 1 / 3, 2.0] * 16, dtype=np.float64)
    p64, s64 = quant.quantize_4bit(x)
    p32, s32 = quant.quantize_4bit(x.astype(np.float32))
    assert np.array_equal(p64, p32) and np.array_equal(s64.absmax, s32.absmax)
    assert s64.dtype == "float64" and quant.dequantize_4bit(p64, s64).dtype == np.float64
    with pytest.raises(TypeError, match="bitsandbytes refuses float64"):
        quant.quantize_4bit(x, profile="bitsandbytes-cpu")


def test_exact_ties_go_to_the_lower_code():
    mids = codebooks.midpoints("nf4")
    x = np.concatenate([[1.0], mids]).astype(np.float32)  # absmax 1: s = x exactly
    packed, _ = quant.quantize_4bit(x, 32)
    assert quant.unpack_nibbles(packed, x.size)[1:].tolist() == list(range(15))


# ----------------------------------------------------------------------------------------------
# special values (spec/nf4.md §9): one test per row and profile


def _nibbles(x, quant_type="nf4", profile="reference", **kw):
    packed, state = quant.quantize_4bit(np.asarray(x, np.float32), 32, quant_type, profile=profile, **kw)
    return quant.unpack_nibbles(packed, np.asarray(x).size), state


def test_reference_raises_on_nan_and_inf_unless_propagate():
    x = np.ones(32, np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        x[5] = bad
        with pytest.raises(ValueError, match="flat index 5"):
            quant.quantize_4bit(x, 32)
    nib, state = _nibbles(x, nonfinite="propagate")  # bitsandbytes-cpu semantics
    assert nib[5] == 15 and np.isinf(state.absmax[0])


@pytest.mark.parametrize(
    "profile,full_nib,full_absmax,tail_absmax",
    [
        ("reference", 7, 0.0, np.float32(1e-38)),
        ("bitsandbytes-cpu", 7, 0.0, np.float32(1e-38)),
        ("bitsandbytes-cuda", 0, 0.0, 0.0),
    ],
)
def test_all_zero_blocks(profile, full_nib, full_absmax, tail_absmax):
    nib, state = _nibbles(np.zeros(40), profile=profile)
    assert set(nib.tolist()) == {full_nib}
    assert state.absmax.tolist() == [full_absmax, tail_absmax]


@pytest.mark.parametrize(
    "profile,nan_nib,other_nib,absmax_is_nan",
    [
        ("bitsandbytes-cpu", 15, 15, True),
        ("bitsandbytes-cuda", 0, 12, False),
    ],
)
def test_nan_element(profile, nan_nib, other_nib, absmax_is_nan):
    x = np.full(32, 0.5, np.float32)
    x[0], x[1] = np.nan, 1.0
    nib, state = _nibbles(x, profile=profile)
    assert nib[0] == nan_nib and nib[2] == other_nib
    assert bool(np.isnan(state.absmax[0])) == absmax_is_nan


def test_nan_poisons_every_block_of_a_nested_cpu_state():
    x = np.ones(32 * 8, np.float32)
    x[3] = np.nan
    packed, state = quant.quantize_4bit(x, 32, double_quant=True, profile="bitsandbytes-cpu")
    assert np.isnan(quant.dequantize_4bit(packed, state)).all()


@pytest.mark.parametrize("profile,inf_nib,finite_nib", [("bitsandbytes-cpu", 15, 7), ("bitsandbytes-cuda", 0, 7)])
def test_inf_element(profile, inf_nib, finite_nib):
    x = np.full(32, 0.5, np.float32)
    x[0] = -np.inf
    nib, state = _nibbles(x, profile=profile)
    assert nib[0] == inf_nib and set(nib[1:].tolist()) == {finite_nib} and state.absmax[0] == np.inf


@pytest.mark.parametrize("profile,nib", [("reference", 7), ("bitsandbytes-cpu", 7), ("bitsandbytes-cuda", 0)])
def test_subnormal_block(profile, nib):
    nibs, _ = _nibbles(np.full(32, 1e-40), profile=profile)
    assert set(nibs.tolist()) == {nib}


@pytest.mark.parametrize(
    "profile,tiny_pos,tiny_neg", [("reference", 8, 0), ("bitsandbytes-cpu", 8, 0), ("bitsandbytes-cuda", 0, 8)]
)
def test_fp4_tiny_values_get_the_zero_nibble_of_the_profile(profile, tiny_pos, tiny_neg):
    x = np.zeros(32, np.float32)
    x[0], x[1], x[2] = 1.0, 1e-3, -1e-3
    nib, _ = _nibbles(x, "fp4", profile)
    assert (nib[1], nib[2]) == (tiny_pos, tiny_neg)


@pytest.mark.parametrize(
    "profile,shape,negative",
    [
        ("reference", (4, 8), False),
        ("bitsandbytes-cpu", (4, 8), True),
        ("bitsandbytes-cpu", (32,), True),
        ("bitsandbytes-cpu", (4, 9), False),
        ("bitsandbytes-cuda", (4, 9), True),
    ],
)
def test_fp4_nibble_8_dequantizes_to_the_profiles_signed_zero(profile, shape, negative):
    n = int(np.prod(shape))
    state = QuantState(
        shape=shape,
        dtype="float32",
        blocksize=64,
        quant_type="fp4",
        absmax=np.ones(1, np.float32),
        code=quant.codebook("fp4"),
        profile=profile,
    )
    out = quant.dequantize_4bit(quant.pack_nibbles(np.full(n, 8)), state)
    assert np.all(out == 0) and bool(np.signbit(out).all()) == negative


def test_cuda_fp4_ties_go_toward_zero_and_cpu_ties_toward_larger_magnitude():
    x = np.zeros(32, np.float32)
    x[0], x[1] = 1.0, -0.0859375  # exactly the 11/128 threshold between −1/192 and −1/6
    cpu, _ = _nibbles(x, "fp4", "bitsandbytes-cpu")
    cuda, _ = _nibbles(x, "fp4", "bitsandbytes-cuda")
    assert cpu[1] == 14 and cuda[1] == 9


# ----------------------------------------------------------------------------------------------
# 8-bit blockwise


def test_blockwise_8bit_reference_is_nearest_code_and_round_trips():
    d = quant.codebook("dynamic8")
    x = np.concatenate([[1.0], d[1:]]).astype(np.float32)  # absmax 1: each code maps to itself
    codes, absmax = quant.quantize_blockwise_8bit(x, 256)
    assert codes.tolist() == [255, *range(1, 256)] and absmax.tolist() == [1.0]
    assert np.array_equal(quant.dequantize_blockwise_8bit(codes, absmax, 256), np.where(codes == 255, 1, x))


def test_cuda_8bit_binary_search_equals_nearest_away_from_ties():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 4096).astype(np.float32)
    x[::256] = 1.0
    ref, _ = quant.quantize_blockwise_8bit(x, 256)
    cuda, _ = quant.quantize_blockwise_8bit(x, 256, profile="bitsandbytes-cuda")
    assert (ref != cuda).sum() == 0


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"blocksize": 100}, ValueError, "blocksize"),
        ({"blocksize": 16}, ValueError, "blocksize"),
        ({"blocksize": True}, TypeError, "blocksize"),
        ({"quant_type": "int4"}, ValueError, "quant_type"),
        ({"profile": "cuda"}, ValueError, "profile"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ({"double_quant": 1}, TypeError, "double_quant"),
    ],
)
def test_quantize_rejects_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quant.quantize_4bit(np.ones(64, np.float32), **kwargs)


@pytest.mark.parametrize("x", [np.ones(8, np.int32), np.ones(8, np.complex64), np.ones(8, bool), np.array(["a"])])
def test_quantize_rejects_non_float_dtypes(x):
    with pytest.raises(TypeError, match="x: expected a float32, float16 or bfloat16"):
        quant.quantize_4bit(x)


def test_quantize_rejects_empty_arrays():
    with pytest.raises(ValueError, match="non-empty"):
        quant.quantize_4bit(np.zeros((0, 4), np.float32))


def test_dequantize_rejects_a_state_that_does_not_match():
    packed, state = quant.quantize_4bit(np.ones((4, 16), np.float32), 32)
    with pytest.raises(ValueError, match="packed: state describes shape"):
        quant.dequantize_4bit(packed[:-1], state)
    with pytest.raises(TypeError, match="packed: expected uint8"):
        quant.dequantize_4bit(packed.astype(np.int8), state)
    with pytest.raises(TypeError, match="state: expected"):
        quant.dequantize_4bit(packed, {"absmax": state.absmax})


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match=r"nibbles: expected codes in \[0, 15\]"):
        quant.pack_nibbles(np.array([3, 16]))
    with pytest.raises(TypeError, match="nibbles"):
        quant.pack_nibbles(np.array([0.5]))
    with pytest.raises(ValueError, match="packed: expected"):
        quant.unpack_nibbles(np.zeros(3, np.uint8), 8)


def test_blockwise_8bit_rejects_bad_input():
    with pytest.raises(ValueError, match="blocksize"):
        quant.quantize_blockwise_8bit(np.ones(8, np.float32), 100)
    with pytest.raises(ValueError, match="absmax: expected 2 values"):
        quant.dequantize_blockwise_8bit(np.zeros(300, np.uint8), np.ones(1, np.float32), 256)
    with pytest.raises(TypeError, match="absmax: expected a float32"):
        quant.dequantize_blockwise_8bit(np.zeros(3, np.uint8), np.ones(1), 256)


def test_cpu_bf16_tail_block_with_nan_dequantizes_to_positive_zero():
    """bitsandbytes-cpu: a NaN tail absmax is stored as the all-ones NaN of torch's clamp, and the C++
    float_to_bf16 (bits + 0x7FFF + lsb, uint32) wraps it to +0.0 (even last dim); full blocks stay NaN."""
    x = np.full(64 + 44, 0.5, np.float32)
    x[70] = np.nan
    x[3] = np.nan
    packed, state = quant.quantize_4bit(x.astype(ml_dtypes.bfloat16), 64, profile="bitsandbytes-cpu")
    assert state.absmax.view(np.uint32)[1] == 0xFFFFFFFF
    out = quant.dequantize_4bit(packed, state).astype(np.float32)
    assert np.isnan(out[:64]).all()
    assert np.all(out[64:] == 0) and not np.signbit(out[64:]).any()
    ref_packed, ref_state = quant.quantize_4bit(x.astype(ml_dtypes.bfloat16), 64, nonfinite="propagate")
    assert np.isnan(quant.dequantize_4bit(ref_packed, ref_state).astype(np.float32)).all()


def test_profile_table_has_every_profile_and_replaces_only_named_steps():
    """Each peer profile replaces some of the reference's steps and keeps the others."""
    assert tuple(profiles.PROFILES) == quant.PROFILES
    step_names = set(blockwise.Steps.__dataclass_fields__)
    reference = blockwise.profile_steps("reference")
    for name, replaced in profiles.PROFILES.items():
        assert set(replaced) <= step_names, name
        steps = blockwise.profile_steps(name)
        for step in step_names:
            expected = replaced.get(step, getattr(reference, step))
            assert getattr(steps, step) is expected, (name, step)
    assert profiles.PROFILES["reference"] == {}
