"""numba NF4/FP4 kernels: byte-identical to refimpl.quant (bitsandbytes-cpu and reference profiles)
and to bitsandbytes 0.50.2 CPU itself, nested statistics included."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

pytest.importorskip("numba", reason="numba is not installed: the numba kernels need the fast extra")

import refimpl.quant as R
from refimpl.kernels.numba_cpu import _quant_kernels as K
from refimpl.kernels.numba_cpu import quant as Q
from tests._peers import PathTally, bnb_dequantize_expected, require

DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16)
SHAPES = ((1001,), (33, 129))  # odd sizes give tail blocks and a padded last byte


def _data(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    # heavy-tailed, so every block has a different scale and codes near every threshold occur
    x = rng.standard_normal(shape) * np.exp(2 * rng.standard_normal(shape))
    return x.astype(np.float32).astype(dtype)


def _same_state(a: R.QuantState, b: R.QuantState) -> bool:
    same = (
        np.asarray(a.absmax).tobytes() == np.asarray(b.absmax).tobytes()
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.blocksize == b.blocksize
        and a.quant_type == b.quant_type
    )
    if a.nested or b.nested:
        same &= a.nested == b.nested and np.float32(a.offset).tobytes() == np.float32(b.offset).tobytes()
        same &= np.asarray(a.nested_absmax).tobytes() == np.asarray(b.nested_absmax).tobytes()
    return bool(same)


@pytest.mark.parametrize("profile", ["bitsandbytes-cpu", "reference"])
def test_quantize_and_dequantize_bytes_equal_reference_for_every_dtype_blocksize_and_type(profile):
    rng = np.random.default_rng(7)
    compared = mismatched = cases = 0
    for shape in SHAPES:
        for dtype in DTYPES:
            x = _data(rng, shape, dtype)
            for bs in Q.BLOCKSIZES:
                for qt in ("nf4", "fp4"):
                    for nested in (False, True):
                        rp, rs = R.quantize_4bit(x, bs, qt, nested, profile=profile)
                        kp, ks = Q.quantize_4bit(x, bs, qt, nested, profile=profile)
                        rd = R.dequantize_4bit(rp, rs)
                        kd = Q.dequantize_4bit(kp, ks)
                        cases += 1
                        compared += x.size
                        bad = int(np.count_nonzero(rp != kp)) + int(not _same_state(rs, ks))
                        bad += int(np.count_nonzero(rd.view(np.uint8) != kd.view(np.uint8)))
                        mismatched += bad
                        assert bad == 0, (shape, np.dtype(dtype).name, bs, qt, nested)
                        assert kd.dtype == rd.dtype and kd.shape == rd.shape
    print(f"\n[{profile}] {cases} cases, {compared} elements: {mismatched} mismatching bytes")


SPECIAL_BLOCKS = {
    "nan": np.array([1.0, np.nan] + [0.5] * 62, dtype=np.float32),
    "inf": np.array([1.0, -np.inf] + [0.5] * 62, dtype=np.float32),
    "zeros": np.zeros(64, dtype=np.float32),
    "subnormal": np.full(64, 1e-40, dtype=np.float32),
    "threshold_ties": np.float32([-0.0859375, 0.0859375, -5 / 6, 1.0] * 16),
}


@pytest.mark.parametrize("name", sorted(SPECIAL_BLOCKS))
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_special_value_blocks_follow_the_bitsandbytes_cpu_table(name, qt):
    block = SPECIAL_BLOCKS[name]
    x = np.concatenate([block, block[:37]])  # one full block and a tail block of the same values
    for nested in (False, True):
        rp, rs = R.quantize_4bit(x, 64, qt, nested, profile="bitsandbytes-cpu", nonfinite="propagate")
        kp, ks = Q.quantize_4bit(x, 64, qt, nested, profile="bitsandbytes-cpu", nonfinite="propagate")
        assert np.array_equal(rp, kp)
        assert _same_state(rs, ks) or (nested and np.isnan(rs.offset) and np.isnan(ks.offset))
        with np.errstate(invalid="ignore"):
            assert (
                np.array_equal(R.dequantize_4bit(rp, rs).view(np.uint32), Q.dequantize_4bit(kp, ks).view(np.uint32))
                or nested
            )


def test_reference_profile_raises_on_nonfinite_and_rounds_float64_once():
    x = np.linspace(-3, 3, 200)
    rp, rs = R.quantize_4bit(x, 64, "nf4", profile="reference")
    kp, ks = Q.quantize_4bit(x, 64, "nf4", profile="reference")
    assert np.array_equal(rp, kp) and _same_state(rs, ks) and ks.dtype == "float64"
    assert np.array_equal(R.dequantize_4bit(rp, rs), Q.dequantize_4bit(kp, ks))
    x[17] = np.nan
    with pytest.raises(ValueError, match="flat index 17"):
        Q.quantize_4bit(x.astype(np.float32), 64, "nf4")
    with pytest.raises(TypeError, match="float64"):
        Q.quantize_4bit(x, 64, "nf4", profile="bitsandbytes-cpu")


def test_bad_input_gets_the_references_exact_error_message():
    """The kernel validates through refimpl.quant.operands, so each bad input fails with the same text;
    a float64 value that overflows float32 is caught after its one rounding, as the reference does."""
    x = np.ones(100, dtype=np.float32)
    x64 = np.ones(100)
    x64[41] = 1e39
    cases = [
        ((x, 48), {}),
        ((x, 64, "int4"), {}),
        ((x, 64), {"nonfinite": "ignore"}),
        ((x, 64, "nf4", 1), {}),
        ((x, 64), {"threads": 0}),
        ((np.ones(8, np.int32),), {}),
        ((x64, 64), {}),
        ((np.where(np.arange(100) == 7, np.nan, x),), {}),
        ((x64,), {"profile": "bitsandbytes-cpu"}),
    ]
    for args, kw in cases:
        with pytest.raises((TypeError, ValueError)) as ref:
            R.quantize_4bit(*args, **kw)
        with pytest.raises(ref.type, match=None) as got:
            Q.quantize_4bit(*args, **kw)
        assert str(got.value) == str(ref.value), (args[1:], kw)


@given(
    hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
    st.sampled_from([32, 64, 128]),
    st.sampled_from(["nf4", "fp4"]),
)
def test_numba_codes_equal_reference_codes_for_any_float32_input(x, bs, qt):
    rp, rs = R.quantize_4bit(x, bs, qt, profile="bitsandbytes-cpu")
    kp, ks = Q.quantize_4bit(x, bs, qt, profile="bitsandbytes-cpu")
    assert np.array_equal(rp, kp)
    assert np.array_equal(rs.absmax.view(np.uint32), ks.absmax.view(np.uint32))


def _to_torch(torch, x: np.ndarray):
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _from_torch(torch, t) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.peers
def test_bytes_equal_bitsandbytes_cpu_quantize_and_dequantize():
    torch = require("torch")
    F = require("bitsandbytes.functional")
    rng = np.random.default_rng(3)
    compared = 0
    tally = PathTally()
    # an even last dim: bnb's C++ dequantizer (no torch.compile); 200 % 16 != 0 keeps it on the scalar loop
    # even on an AVX-512 host, except at blocksize 4096 (the AVX-512 host's torch fallback, a known divergence)
    for shape in ((130, 200),):
        for dtype in DTYPES:
            x = _data(rng, shape, dtype)
            for bs in (32, 64, 4096):
                for qt in ("nf4", "fp4"):
                    for nested in (False, True):
                        bp, bstate = F.quantize_4bit(
                            _to_torch(torch, x), blocksize=bs, quant_type=qt, compress_statistics=nested
                        )
                        kp, ks = Q.quantize_4bit(
                            x, bs, qt, nested, profile="bitsandbytes-cpu", threads=torch.get_num_threads()
                        )
                        assert np.array_equal(bp.numpy(), kp)
                        assert np.asarray(ks.absmax).tobytes() == bstate.absmax.numpy().tobytes()
                        if nested:
                            assert np.float32(ks.offset).tobytes() == np.float32(bstate.offset.item()).tobytes()
                            assert ks.nested_absmax.tobytes() == bstate.state2.absmax.numpy().tobytes()
                        bd = _from_torch(torch, F.dequantize_4bit(bp, bstate))
                        kd = Q.dequantize_4bit(kp, ks)
                        expected, path = bnb_dequantize_expected(kp, ks, kd)  # kd itself on the profile's paths
                        assert kd.tobytes() == R.dequantize_4bit(kp, ks).tobytes()
                        assert bd.reshape(-1).view(np.uint8).tobytes() == expected.reshape(-1).view(np.uint8).tobytes()
                        tally.add(path, bd.tobytes() != kd.tobytes())
                        compared += x.size
    print(f"\nbitsandbytes CPU: {compared} elements compared, 0 mismatching bytes; {tally.line()}")


@pytest.mark.peers
def test_nested_offset_matches_bitsandbytes_above_the_torch_grain_size():
    torch = require("torch")
    F = require("bitsandbytes.functional")
    x = _data(np.random.default_rng(5), (40_000 * 64 + 40,), np.float32)  # 40,001 blocks > 32,768
    bp, bstate = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    kp, ks = Q.quantize_4bit(x, 64, "nf4", True, profile="bitsandbytes-cpu", threads=torch.get_num_threads())
    assert np.float32(ks.offset).tobytes() == np.float32(bstate.offset.item()).tobytes()
    assert np.array_equal(ks.absmax, bstate.absmax.numpy()) and np.array_equal(kp, bp.numpy())


@pytest.mark.peers
def test_cascade_sum_equals_torch_sum_for_sizes_and_thread_counts():
    torch = require("torch")
    rng = np.random.default_rng(11)
    saved = torch.get_num_threads()
    checked = 0
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for n in (*range(1, 70), 127, 128, 1000, 4097, 32767, 32768, 32769, 70001, 262_147):
                a = (rng.random(n) * rng.choice([1e-3, 1.0, 1e3], n)).astype(np.float32)
                want = torch.from_numpy(a).sum().numpy()
                got = K.torch_cpu_sum_f32(a, threads, 8)
                assert np.float32(got).tobytes() == np.float32(want).tobytes(), (threads, n)
                checked += 1
    finally:
        torch.set_num_threads(saved)
    print(f"\ncascade sum: {checked} (size, threads) cases bit-identical to torch.sum")


def test_half_and_bfloat16_bit_conversions_equal_numpy_and_ml_dtypes():
    from numba import njit

    from refimpl.kernels.numba_cpu._bits import bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16

    @njit
    def narrow(x, o16, ob):
        for i in range(x.size):
            o16[i] = f32_to_f16(x[i])
            ob[i] = f32_to_bf16(x[i])

    @njit
    def widen(h, o16, ob):
        for i in range(h.size):
            o16[i] = f16_to_f32(h[i])
            ob[i] = bf16_to_f32(h[i])

    bits = np.random.default_rng(0).integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate(
        [bits.view(np.float32), np.float32([0, -0.0, np.inf, -np.inf, 65504, 65520, 2**-24, 2**-25, 3 * 2**-26])]
    )
    o16, ob = np.empty(x.size, np.uint16), np.empty(x.size, np.uint16)
    narrow(x, o16, ob)
    finite = ~np.isnan(x)
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.array_equal(o16[finite], x.astype(np.float16).view(np.uint16)[finite])
        assert np.array_equal(ob[finite], x.astype(ml_dtypes.bfloat16).view(np.uint16)[finite])
    assert np.isnan(o16.view(np.float16)[~finite]).all()
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    w16, wb = np.empty(65536, np.float32), np.empty(65536, np.float32)
    widen(h, w16, wb)
    r16, rb = h.view(np.float16).astype(np.float32), h.view(ml_dtypes.bfloat16).astype(np.float32)
    ok = ~np.isnan(r16)
    assert np.array_equal(w16.view(np.uint32)[ok], r16.view(np.uint32)[ok]) and np.isnan(w16[~ok]).all()
    ok = ~np.isnan(rb)
    assert np.array_equal(wb.view(np.uint32)[ok], rb.view(np.uint32)[ok]) and np.isnan(wb[~ok]).all()


def test_bad_arguments_raise_errors_that_name_them():
    x = np.ones(128, dtype=np.float32)
    with pytest.raises(TypeError, match="x"):
        Q.quantize_4bit(np.ones(128, dtype=np.int32))
    with pytest.raises(ValueError, match="x"):
        Q.quantize_4bit(np.ones(0, dtype=np.float32))
    with pytest.raises(ValueError, match="blocksize"):
        Q.quantize_4bit(x, 48)
    with pytest.raises(TypeError, match="blocksize"):
        Q.quantize_4bit(x, 64.0)
    with pytest.raises(ValueError, match="quant_type"):
        Q.quantize_4bit(x, 64, "int4")
    with pytest.raises(ValueError, match="profile"):
        Q.quantize_4bit(x, 64, profile="bitsandbytes-cuda")
    with pytest.raises(ValueError, match="nonfinite"):
        Q.quantize_4bit(x, 64, nonfinite="ignore")
    with pytest.raises(TypeError, match="double_quant"):
        Q.quantize_4bit(x, 64, "nf4", 1)
    with pytest.raises(ValueError, match="threads"):
        Q.quantize_4bit(x, 64, threads=0)
    p, s = Q.quantize_4bit(x)
    with pytest.raises(TypeError, match="packed"):
        Q.dequantize_4bit(p.astype(np.int8), s)
    with pytest.raises(ValueError, match="packed"):
        Q.dequantize_4bit(p[:-1], s)
    with pytest.raises(TypeError, match="state"):
        Q.dequantize_4bit(p, {"absmax": s.absmax})
    with pytest.raises(ValueError, match="profile"):
        Q.dequantize_4bit(p, s, profile="cpu")
    out = np.empty(128, dtype=np.float32)
    with pytest.raises(TypeError, match="out"):
        Q.dequantize_4bit(p, s, out=[0.0] * 128)
    with pytest.raises(ValueError, match="out"):
        Q.dequantize_4bit(p, s, out=out.astype(np.float16))
    with pytest.raises(ValueError, match="out"):
        Q.dequantize_4bit(p, s, out=out[:64])
    with pytest.raises(ValueError, match="out"):
        Q.dequantize_4bit(p, s, out=np.empty(256, dtype=np.float32)[::2])


# scales that stress the table's rounding: zero, subnormal, huge (products overflow bf16/fp16), inf and NaN
_SCALES = st.sampled_from([0.0, 1e-40, 3e-8, 0.37, 1.0, 7.5, 65519.0, 65536.0, 3e38, np.inf, -np.inf, np.nan])


@pytest.mark.skipif(not K.AVX512, reason="the AVX-512 dequantizer runs only on an AVX-512 host")
@given(
    st.sampled_from([32, 64, 128, 256]),
    st.integers(1, 700),
    st.sampled_from([K.KIND_F32, K.KIND_F16, K.KIND_BF16]),
    st.sampled_from(["nf4", "fp4"]),
    st.data(),
)
def test_avx512_dequantizer_writes_the_scalar_dequantizers_bits_for_any_bytes_scales_and_tail(bs, n, kind, qt, data):
    nb = -(-n // bs)
    packed = data.draw(hnp.arrays(np.uint8, (n + 1) // 2))
    absmax = np.array(data.draw(st.lists(_SCALES, min_size=nb, max_size=nb)), dtype=np.float32)
    code = R.codebooks.codebook(qt)
    word = np.float32 if kind == K.KIND_F32 else np.uint16
    want = np.full(n, 0x5A5A, dtype=word) if kind else np.full(n, np.float32(-9.5))
    got = want.copy()
    K._dequantize_blocks(packed, absmax, n, bs, code, kind, want, 0, nb)
    K.dequantize_4bit_kernel(packed, absmax, n, bs, code, kind, got)
    assert want.view(np.uint8).tobytes() == got.view(np.uint8).tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_dequantize_into_out_returns_out_holding_the_allocating_calls_bits(dtype):
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x = _data(np.random.default_rng(5), (37, 96), dt)
    p, s = Q.quantize_4bit(x, 64, "fp4")
    out = np.full(x.shape, 3, dtype=dt)
    got = Q.dequantize_4bit(p, s, out=out)
    assert got is out
    assert out.tobytes() == Q.dequantize_4bit(p, s).tobytes()


def _simd_paths() -> list:
    """The vector dequantizers this host can run: AVX-512, and AVX2 (taken here by switching AVX-512 off)."""
    return [
        pytest.param("avx512", marks=pytest.mark.skipif(not K.AVX512, reason="no AVX-512 on this host")),
        pytest.param("avx2", marks=pytest.mark.skipif(not K.AVX2, reason="numba does not compile with AVX2 here")),
    ]


def _quantize_by_path(path: str, x, kind, n, bs, bounds, order, zero_nib, packed, absmax) -> None:
    """AVX-512: the dispatching kernel (vector whole blocks, scalar tail); AVX2: its 16-lane code with every
    permute split into two 8-lane halves on the whole blocks, then the scalar tail."""
    if path == "avx512":
        K.quantize_4bit_kernel(x, kind, n, bs, bounds, order, zero_nib, packed, absmax)
        return
    nb, whole = -(-n // bs), n // bs
    K._quantize_blocks_avx2(x, kind, bs, bounds, order, packed, absmax, 0, whole)
    K._quantize_blocks(x, kind, n, bs, bounds, order, zero_nib, packed, absmax[whole:], whole, 0, nb - whole)


@pytest.mark.parametrize("path", _simd_paths())
@given(
    st.sampled_from([32, 64, 128]),
    st.integers(1, 600),
    st.sampled_from([K.KIND_F32, K.KIND_F16, K.KIND_BF16]),
    st.sampled_from(["nf4", "fp4"]),
    st.data(),
)
def test_vector_quantizer_writes_the_scalar_quantizers_bytes_for_any_bit_patterns(path, bs, n, kind, qt, data):
    # any bit pattern: NaN payloads, infinities, subnormals, signed zeros, values at the midpoints
    bits = data.draw(hnp.arrays(np.uint32 if kind == K.KIND_F32 else np.uint16, n))
    x = bits.view(np.float32) if kind == K.KIND_F32 else bits
    _, bounds, order, zero_nib = Q._TABLES[qt]
    nb = -(-n // bs)
    want_p, want_a = np.zeros((n + 1) // 2, np.uint8), np.zeros(nb, np.float32)
    got_p, got_a = np.ones((n + 1) // 2, np.uint8), np.ones(nb, np.float32)
    K._quantize_blocks(x, kind, n, bs, bounds, order, zero_nib, want_p, want_a, 0, 0, nb)
    _quantize_by_path(path, x, kind, n, bs, bounds, order, zero_nib, got_p, got_a)
    assert want_p.tobytes() == got_p.tobytes()
    assert want_a.tobytes() == got_a.tobytes()


@pytest.mark.parametrize("path", _simd_paths())
@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("nested", [False, True])
def test_vector_dequantizer_writes_the_scalar_bits_into_outputs_at_any_offset_and_nothing_outside(
    path, streaming, nested, monkeypatch
):
    # streaming stores need 64-byte (AVX2: 32-byte) aligned lines: an output at any element offset makes the
    # kernel rotate its vectors and write partial head and tail lines with plain stores, per thread range
    if path == "avx2":
        monkeypatch.setattr(K, "AVX512", False)
    monkeypatch.setattr(K, "NONTEMPORAL_MIN_BYTES", 0 if streaming else 1 << 62)
    rng = np.random.default_rng(11)
    code = R.codebooks.codebook("nf4")
    for kind in (K.KIND_F32, K.KIND_F16, K.KIND_BF16):
        word = np.float32 if kind == K.KIND_F32 else np.uint16
        for bs in (32, 64, 256):
            # one block, a tail, many blocks per thread range, more than 256 blocks (nested statistics)
            for n in (bs, 3 * bs + 5, 41 * bs + 1, 64 * bs + 33, 300 * bs + 7):
                nb = -(-n // bs)
                packed = rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)
                absmax = (rng.standard_normal(nb) * 10.0).astype(np.float32)
                extra = None
                if nested:  # absmax holds 8-bit codes, decoded by the scalar nested kernel for the expected bits
                    qcodes = rng.integers(0, 256, nb, dtype=np.uint8)
                    extra = (
                        (rng.standard_normal(-(-nb // 256)) * 10.0).astype(np.float32),
                        np.float32(0.37),
                        Q.DYNAMIC8,
                    )
                    K.dequantize_nested_kernel(qcodes, *extra, absmax)
                want = np.empty(n, dtype=word)
                K._dequantize_blocks(packed, absmax, n, bs, code, kind, want, 0, nb)
                for off in range(0, 64 // np.dtype(word).itemsize + 2):
                    store = np.full(n + off + 9, 0x5A5A, dtype=word) if kind else np.full(n + off + 9, np.float32(-9.5))
                    before = store.copy()
                    K.dequantize_4bit_kernel(
                        packed, qcodes if nested else absmax, n, bs, code, kind, store[off : off + n], extra
                    )
                    assert store[off : off + n].tobytes() == want.tobytes(), (kind, bs, n, off)
                    assert store[:off].tobytes() == before[:off].tobytes(), (kind, bs, n, off)
                    assert store[off + n :].tobytes() == before[off + n :].tobytes(), (kind, bs, n, off)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_into_misaligned_out_views_gives_the_profiles_bytes(dtype, qt, nested, monkeypatch):
    # out= views a few elements into a larger array (off any vector alignment), with streaming stores taken
    # even for this small output; n = 129 · 257 is not a multiple of the blocksize and spans 3 nested blocks
    monkeypatch.setattr(K, "NONTEMPORAL_MIN_BYTES", 0)
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x = _data(np.random.default_rng(3), (129, 257), dt)
    p, s = Q.quantize_4bit(x, 64, qt, nested, profile="bitsandbytes-cpu")
    want = R.dequantize_4bit(p, s)
    for off in (1, 3, 5, 8):
        backing = np.zeros(x.size + off, dtype=dt)
        out = backing[off:].reshape(x.shape)
        assert Q.dequantize_4bit(p, s, out=out) is out
        assert out.tobytes() == want.tobytes()
        assert not backing[:off].view(np.uint8).any()
    fresh = Q.dequantize_4bit(p, s)
    assert fresh.tobytes() == want.tobytes()


def test_dequantize_refuses_the_cuda_profile_whose_flush_to_zero_it_does_not_compile():
    """bitsandbytes-cuda dequantization flushes subnormal scales and products (spec/nf4.md §15.1); the numba
    dequantizer does not, so it names the profile instead of returning the reference's subnormals."""
    x = np.full(64, 1e-39, dtype=np.float32)
    packed, state = R.quantize_4bit(x, 64, profile="bitsandbytes-cuda")
    with pytest.raises(ValueError, match="profile: expected 'reference' or 'bitsandbytes-cpu'"):
        Q.dequantize_4bit(packed, state)
    ref_packed, ref_state = Q.quantize_4bit(x, 64)
    with pytest.raises(ValueError, match="profile"):
        Q.dequantize_4bit(ref_packed, ref_state, profile="bitsandbytes-cuda")
    assert np.array_equal(Q.dequantize_4bit(ref_packed, ref_state), R.dequantize_4bit(ref_packed, ref_state))
