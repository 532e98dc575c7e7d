"""CuPy GPU kernels against the NumPy reference (and bitsandbytes CUDA where installed).

Marker ``gpu``: every test that launches a kernel skips with the reason when CuPy or a CUDA device is
missing (CI has no GPU). Table and bad-input tests run everywhere. Figures (case counts, worst
error/bound) are printed; run with ``-s`` or ``-rA`` to see them.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from refimpl import kernels, precision
from refimpl.kernels import cupy_gpu as G
from refimpl.quant import codebooks as _tables
from tests._peers import require

BF16 = np.dtype(ml_dtypes.bfloat16)
NP_DT = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}
REASON = kernels.available()["cupy"]
needs_gpu = pytest.mark.skipif(REASON is not None, reason=f"GPU kernels unavailable: {REASON}")


# ----------------------------------------------------------------------------------------- helpers


def dev(a: np.ndarray):
    """NumPy → CuPy; bfloat16 travels as its uint16 bits."""
    import cupy as cp

    a = np.ascontiguousarray(a)
    return cp.asarray(a.view(np.uint16) if a.dtype == BF16 else a)


def host(a, dtype: str) -> np.ndarray:
    h = a.get() if hasattr(a, "get") else a.cpu().numpy()
    return h.view(BF16) if dtype == "bfloat16" else h


def data(rng: np.random.Generator, kind: str, shape, dtype: str) -> np.ndarray:
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "uniform":
        x = rng.uniform(-1, 1, shape)
    else:  # heavy-tailed
        x = rng.standard_normal(shape) * np.exp(2 * rng.standard_normal(shape))
    return x.astype(NP_DT[dtype])


def report(name: str, rep: precision.BoundReport, cases: int) -> None:
    print(f"\n[{name}] cases={cases} worst error/bound = {rep.worst_ratio:.3g} ({rep})")


# ----------------------------------------------------------------------- runs everywhere (no GPU)


def test_float_literals_are_exact_float32():
    from refimpl.kernels.cupy_gpu import _device as D

    for w in _tables.NF4_MIDPOINT_HEX + _tables.DYNAMIC8_HEX:
        lit = D.hex_literal(w)[1:-2]  # strip "(" and "f)"
        assert np.float32(float.fromhex(lit)).view(np.uint32) == int(w, 16)
    with pytest.raises(ValueError, match="value"):
        D.f32_literal(float("nan"))


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: G.quantize_4bit(np.zeros(64, np.float32)), TypeError, ["x:", "CuPy array", "ndarray"]),
        (lambda: G.quantize_4bit(None, blocksize=48), ValueError, ["blocksize:", "48"]),
        (lambda: G.quantize_4bit(None, quant_type="int4"), ValueError, ["quant_type:", "int4"]),
        (lambda: G.dequantize_4bit([1, 2], None), TypeError, ["packed:", "list"]),
        (lambda: G.gemv_4bit(np.zeros((1, 16)), None, None), TypeError, ["x:", "ndarray"]),
        (lambda: G.lora_forward(np.zeros((2, 2)), None, None, None, 1.0), TypeError, ["x:", "ndarray"]),
        (lambda: G.pack(np.zeros((2, 2)), None, None, 1.0), TypeError, ["W:", "ndarray"]),
        (lambda: G.ties("abc", density=0.2), TypeError, ["task_vectors:", "str"]),
        (lambda: G.ties([], density=0.2), TypeError, ["task_vectors:"]),
        (lambda: G.ties([np.zeros(3, np.float32)], density=0.2), TypeError, ["task_vectors[0]:", "ndarray"]),
    ],
)
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value)


# ------------------------------------------------------------------------------ GPU: NF4 / FP4

SHAPES = [(4096, 64), (1000, 77), (33, 129), (12345,), (7,)]
BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_matches_reference_cuda_profile_and_dequantize_is_bit_exact(quant_type):
    """Codes: equal to refimpl.quant's bitsandbytes-cuda profile or classified admissible by check_4bit;
    absmax bit-identical; dequantized bits identical to the reference's dequantization of our bytes."""
    from refimpl import quant as Q

    rng = np.random.default_rng(1)
    n_el = n_case = n_wrong = n_adm = n_neq = n_deq_bad = n_abs_bad = 0
    for dtype in ("float32", "float16", "bfloat16"):
        for bs in BLOCKS:
            for shape in SHAPES:
                for kind in ("normal", "uniform", "heavy"):
                    x = data(rng, kind, shape, dtype)
                    packed, st = G.quantize_4bit(dev(x), bs, quant_type, dtype=dtype)
                    pk = packed.get()
                    ref_p, ref_s = Q.quantize_4bit(x, bs, quant_type, profile="bitsandbytes-cuda")
                    absmax = st.absmax.get()
                    n_abs_bad += int((absmax.view(np.uint32) != ref_s.absmax.view(np.uint32)).sum())
                    rep = Q.check_4bit(pk, ref_s, x, profile="bitsandbytes-cuda")
                    n_wrong += rep.n_wrong + rep.n_special
                    n_adm += rep.n_admissible
                    n_neq += int((pk != ref_p).sum())
                    # dequantize our bytes both ways: the bits must agree
                    ours = host(G.dequantize_4bit(packed, st), dtype)
                    ref_st = Q.QuantState(
                        shape=tuple(shape),
                        dtype=dtype,
                        blocksize=bs,
                        quant_type=quant_type,
                        absmax=absmax,
                        code=ref_s.code,
                        profile="bitsandbytes-cuda",
                    )
                    theirs = Q.dequantize_4bit(pk, ref_st)
                    n_deq_bad += int((ours.view(np.uint8) != np.ascontiguousarray(theirs).view(np.uint8)).sum())
                    n_el += x.size
                    n_case += 1
    print(
        f"\n[{quant_type} quantize vs reference bitsandbytes-cuda] cases={n_case} elements={n_el} "
        f"bytes differing={n_neq} admissible nibbles={n_adm} wrong={n_wrong} absmax mismatches={n_abs_bad} "
        f"dequantized bytes differing={n_deq_bad}"
    )
    assert n_wrong == 0
    assert n_abs_bad == 0
    assert n_deq_bad == 0


def _threshold_neighbours(quant_type: str) -> np.ndarray:
    """Every CUDA threshold t of the code rule, ±t, and their float32 neighbours (where a lookup goes wrong)."""
    t = _tables.nf4_cuda_thresholds() if quant_type == "nf4" else np.array(_tables.FP4_CUDA_THRESHOLDS, np.float32)
    t = np.concatenate([t, -t]).astype(np.float32)
    return np.concatenate([t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2))]).astype(np.float32)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_at_every_threshold_and_its_neighbours_equal_the_cuda_rule(quant_type):
    """Blocks whose absmax is 1 (so s = x exactly) holding each threshold, its two float32 neighbours, ±0
    and tiny values: every nibble equals the bitsandbytes-cuda profile's rule (the kernel looks the code up in
    a table keyed by the high bits of s, code_cells.py; a wrong cell edge shows here first)."""
    from refimpl import quant as Q

    vals = np.concatenate([_threshold_neighbours(quant_type), np.float32([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5])])
    per = 63  # each block of 64: one 1.0 (absmax 1, rcp exact) then 63 test values
    blocks = -(-vals.size // per)
    x = np.zeros((blocks, 64), np.float32)
    x[:, 0] = 1.0
    x[:, 1:].flat[: vals.size] = vals
    packed, _ = G.quantize_4bit(dev(x.ravel()), 64, quant_type)
    pk = packed.get().ravel()
    ref_p, _ = Q.quantize_4bit(x.ravel(), 64, quant_type, profile="bitsandbytes-cuda")
    print(f"\n[{quant_type} codes at thresholds] values={vals.size} bytes differing={int((pk != ref_p.ravel()).sum())}")
    assert np.array_equal(pk, ref_p.ravel())


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("blocksize", "quant_type", "slots"),
    [(64, "nf4", 1), (64, "nf4", 2), (4096, "fp4", 1), (32, "nf4", 1), (256, "fp4", 4)],
)
def test_quantize_grid_loops_over_inputs_larger_than_one_grid_layer(blocksize, quant_type, slots, monkeypatch):
    """The quantize grid is a few waves of resident blocks looping over the input, ``slots`` quant blocks a
    thread: an input of several grid layers plus a ragged tail quantizes as the reference bitsandbytes-cuda
    profile (no block skipped or done twice)."""
    from refimpl import quant as Q

    monkeypatch.setattr(G.nf4, "QUANT_SLOTS", slots)
    kern = G.nf4._quant_kernel("float32", blocksize, quant_type)
    grid = G.nf4.QUANT_WAVES * G._device.resident_blocks(kern, 256)
    layer = grid * 256 // min(blocksize // 8, 32) * blocksize
    n = 3 * layer * (slots if blocksize <= 256 else 1) + 5 * blocksize + 3
    x = np.random.default_rng(7).standard_normal(n).astype(np.float32)
    packed, st = G.quantize_4bit(dev(x), blocksize, quant_type)
    ref_p, ref_s = Q.quantize_4bit(x, blocksize, quant_type, profile="bitsandbytes-cuda")
    rep = Q.check_4bit(packed.get(), ref_s, x, profile="bitsandbytes-cuda")
    n_diff = int((packed.get() != ref_p).sum())
    print(f"\n[grid loop bs={blocksize} {quant_type} slots={slots}] n={n} bytes differing={n_diff}")
    assert n_diff == 0
    assert np.array_equal(st.absmax.get().view(np.uint32), ref_s.absmax.view(np.uint32))
    assert rep.n_wrong + rep.n_special == 0


@needs_gpu
@pytest.mark.gpu
def test_all_zero_and_nan_blocks_follow_the_cuda_rule():
    """All-zero block: 0·(1/0) = NaN → nibble 0, bytes 0x00, absmax 0; NaN element → nibble 0, ignored by absmax."""
    x = np.zeros(128, np.float32)
    x[64:] = np.linspace(-1, 1, 64, dtype=np.float32)
    x[70] = np.nan
    packed, st = G.quantize_4bit(dev(x), 64, "nf4")
    pk = packed.get().ravel()
    assert (pk[:32] == 0).all()
    assert st.absmax.get()[0] == 0.0
    assert st.absmax.get()[1] == 1.0
    assert pk[35] >> 4 == 0  # element 70 is the high nibble of byte 35


@needs_gpu
@pytest.mark.gpu
def test_double_quant_state_dequantizes_as_the_reference_rule():
    """Given the same offset: absmax2 equals the reference's bitsandbytes-cuda profile bit for bit, and the
    dequantized absmax and tensor equal the reference dequantization of our state (f32(f32(d[q]·a2) + offset)).

    The 8-bit codes themselves follow bitsandbytes' CUDA dQuantize<0> (byte-identical to bitsandbytes in
    test_bytes_identical_to_bitsandbytes_cuda); the reference profile's binary search omits the final pivot
    and differs by one code in about half the cases: counted here, each difference must be ±1.
    """
    import cupy as cp

    from refimpl import quant as Q

    rng = np.random.default_rng(2)
    n_codes = n_a2_bad = n_code_diff = n_far = n_deq_bad = cases = 0
    for n in (64 * 300, 64 * 256 * 3 + 64 * 17, 4096 * 1024 + 33):
        x = data(rng, "heavy", (n,), "float32")
        _, ref_s = Q.quantize_4bit(x, 64, "nf4", True, profile="bitsandbytes-cuda")
        packed, st = G.quantize_4bit(
            dev(x), 64, "nf4", double_quant=True, offset=cp.asarray(np.array([ref_s.offset], np.float32))
        )
        codes = st.absmax.get()
        diff = np.abs(codes.astype(np.int64) - ref_s.absmax.astype(np.int64))
        n_code_diff += int((diff != 0).sum())
        n_far += int((diff > 1).sum())
        n_a2_bad += int((st.absmax2.get().view(np.uint32) != ref_s.nested_absmax.view(np.uint32)).sum())
        ours_state = Q.QuantState(
            shape=(n,),
            dtype="float32",
            blocksize=64,
            quant_type="nf4",
            absmax=codes,
            code=ref_s.code,
            offset=ref_s.offset,
            nested_absmax=st.absmax2.get(),
            nested_code=ref_s.nested_code,
            profile="bitsandbytes-cuda",
        )
        ours = G.dequantize_4bit(packed, st).get()
        theirs = Q.dequantize_4bit(packed.get(), ours_state)
        n_deq_bad += int((ours.view(np.uint32) != theirs.view(np.uint32)).sum())
        n_codes += codes.size
        cases += 1
    print(
        f"\n[double quant vs reference bitsandbytes-cuda] cases={cases} nested codes={n_codes} "
        f"absmax2 mismatches={n_a2_bad} codes differing from the reference profile={n_code_diff} "
        f"(by more than one: {n_far}) dequantized mismatches={n_deq_bad}"
    )
    assert n_a2_bad == 0
    assert n_far == 0
    assert n_deq_bad == 0


@needs_gpu
@pytest.mark.gpu
@pytest.mark.peers
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bytes_identical_to_bitsandbytes_cuda(quant_type):
    """Packed bytes, absmax and nested state byte-identical to bitsandbytes 0.50.2 CUDA (finite data)."""
    torch = require("torch")
    F = require("bitsandbytes.functional")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    rng = np.random.default_rng(3)
    n_el = n_bad = n_abs_bad = n_nested_bad = n_deq_bad = cases = 0
    for dtype in ("float32", "float16", "bfloat16"):
        for bs in BLOCKS:
            for shape in [(2048, 512), (1000, 77), (12345,), (7,)]:
                x = data(rng, "heavy" if cases % 2 else "normal", shape, dtype)
                xt = torch.from_numpy(x.view(np.uint16) if dtype == "bfloat16" else x).cuda()
                if dtype == "bfloat16":
                    xt = xt.view(torch.bfloat16)
                for nested in (False, True):
                    bp, bst = F.quantize_4bit(xt, blocksize=bs, quant_type=quant_type, compress_statistics=nested)
                    off = bst.offset.reshape(1).float() if nested else None
                    gp, gst = G.quantize_4bit(xt, bs, quant_type, double_quant=nested, offset=off)
                    n_bad += int((gp != bp).sum())
                    if nested:
                        n_nested_bad += int((gst.absmax != bst.absmax).sum())
                        a2, b2 = gst.absmax2.view(torch.int32), bst.state2.absmax.view(torch.int32)
                        n_nested_bad += int((a2 != b2).sum())
                    else:
                        n_abs_bad += int((gst.absmax.view(torch.int32) != bst.absmax.view(torch.int32)).sum())
                    gd = G.dequantize_4bit(gp, gst)
                    bd = F.dequantize_4bit(bp, bst)
                    n_deq_bad += int((gd.reshape(-1).view(torch.uint8) != bd.reshape(-1).view(torch.uint8)).sum())
                    n_el += x.size
                    cases += 1
    print(
        f"\n[{quant_type} vs bitsandbytes CUDA] cases={cases} elements={n_el} byte mismatches={n_bad} "
        f"absmax mismatches={n_abs_bad} nested mismatches={n_nested_bad} dequantized byte mismatches={n_deq_bad}"
    )
    assert n_bad == 0 and n_abs_bad == 0 and n_nested_bad == 0 and n_deq_bad == 0


# ------------------------------------------------------------------------- GPU: GEMV / QLoRA


def _dequant64(packed: np.ndarray, absmax: np.ndarray, n: int, bs: int, quant_type: str) -> np.ndarray:
    nib = np.empty(2 * packed.size, np.uint8)
    nib[0::2] = packed.ravel() >> 4
    nib[1::2] = packed.ravel() & 15
    code = _tables.from_hex(_tables.NF4_HEX if quant_type == "nf4" else _tables.FP4_HEX).astype(np.float64)
    return code[nib[:n]] * np.repeat(absmax.astype(np.float64), bs)[:n]


def _gemv_against_float64(rng, x, packed, st, Wq, dtype: str, *, lora: bool, r: int, s: float, a_div: float):
    """gemv_4bit(x) (with a LoRA branch A/a_div, B and a bias drawn from rng when ``lora``) against the float64
    product, under u_out·|y| + γ_{K+r+4}(float32)·(|x||W|ᵀ + s·|x||A|ᵀ|B|ᵀ + |b|): the comparison report."""
    N, K = Wq.shape
    x64 = x.astype(np.float64)
    ref, S = x64 @ Wq.T, np.abs(x64) @ np.abs(Wq).T
    kw: dict = {}
    if lora:
        A = (data(rng, "normal", (r, K), dtype).astype(np.float32) / a_div).astype(NP_DT[dtype])
        B = data(rng, "normal", (N, r), dtype)
        b = data(rng, "normal", (N,), dtype)
        A64, B64, b64 = (a.astype(np.float64) for a in (A, B, b))
        ref = ref + s * (x64 @ A64.T) @ B64.T + b64
        S = S + s * (np.abs(x64) @ np.abs(A64).T) @ np.abs(B64).T + np.abs(b64)
        kw = {"A": dev(A), "B": dev(B), "scaling": s, "bias": dev(b)}
    y = host(G.gemv_4bit(dev(x), packed, st, dtype=dtype, **kw), dtype).astype(np.float64)
    u_out = precision.unit_roundoff(dtype)
    bound = u_out * np.abs(ref) + (1 + u_out) * precision.gamma(K + r + 4, "float32") * S
    return precision.compare_to_bound(y, ref, bound)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_gemv_and_qlora_forward_within_derived_bound(dtype):
    """y = x·dequant(W)ᵀ + s·(x Aᵀ) Bᵀ + b for m = 1..16 within
    u_out·|y| + γ_{K+r+4}(float32)·(|x||W|ᵀ + s·|x||A|ᵀ|B|ᵀ + |b|)."""
    rng = np.random.default_rng(4)
    worst = 0.0
    cases = 0
    for N, K, bs, qt in [(256, 1024, 64, "nf4"), (300, 4096, 128, "nf4"), (129, 544, 32, "fp4")]:
        W = data(rng, "normal", (N, K), dtype)
        packed, st = G.quantize_4bit(dev(W), bs, qt, dtype=dtype)
        Wq = _dequant64(packed.get(), st.absmax.get(), N * K, bs, qt).reshape(N, K)
        for m in (1, 2, 3, 7, 8, 16):
            for lora in (False, True):
                x = data(rng, "normal", (m, K), dtype)
                rep = _gemv_against_float64(rng, x, packed, st, Wq, dtype, lora=lora, r=8, s=0.5, a_div=8)
                worst = max(worst, rep.worst_ratio)
                cases += 1
                assert rep.passed, f"N={N} K={K} m={m} lora={lora}: {rep}"
    print(f"\n[gemv_4bit/qlora {dtype}] cases={cases} worst error/bound = {worst:.3g}")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows_kernel", [True, False])
def test_gemv_m1_within_derived_bound_with_and_without_the_rows_kernel(rows_kernel, monkeypatch):
    """m = 1 by ``gemv4_rows`` (x in registers, blocks looping over row groups) or by ``gemv4``: within
    u_out·|y| + γ_{K+r+4}(float32)·(|x||W|ᵀ + s·|x||A|ᵀ|B|ᵀ + |b|) where the rows kernel can go wrong: K not a
    multiple of 1024 (idle lanes), K = 32 (one lane), more row groups than resident blocks (the loop), a
    ragged last group."""
    monkeypatch.setattr(G.gemv4, "ROWS_MAX_M", 1 if rows_kernel else 0)
    rng = np.random.default_rng(5)
    dtype = "bfloat16"
    worst = 0.0
    for N, K, bs, qt in [
        (2050, 8192, 64, "nf4"),
        (3001, 1056, 32, "fp4"),
        (77, 32, 32, "nf4"),
        (513, 4096, 256, "nf4"),
    ]:
        W = data(rng, "normal", (N, K), dtype)
        packed, st = G.quantize_4bit(dev(W), bs, qt, dtype=dtype)
        Wq = _dequant64(packed.get(), st.absmax.get(), N * K, bs, qt).reshape(N, K)
        for lora in (False, True):
            x = data(rng, "normal", (1, K), dtype)
            rep = _gemv_against_float64(rng, x, packed, st, Wq, dtype, lora=lora, r=4, s=2.0, a_div=1)
            worst = max(worst, rep.worst_ratio)
            assert rep.passed, f"N={N} K={K} lora={lora}: {rep}"
    print(f"\n[gemv m=1 rows_kernel={rows_kernel}] worst error/bound = {worst:.3g}")


@needs_gpu
@pytest.mark.gpu
def test_gemv_rejects_k_not_multiple_of_32():
    W = np.ones((4, 48), np.float32)
    packed, st = G.quantize_4bit(dev(W), 32, "nf4")
    with pytest.raises(ValueError, match="multiple of 32"):
        G.gemv_4bit(dev(np.ones((1, 48), np.float32)), packed, st)


@needs_gpu
@pytest.mark.gpu
def test_qlora_forward_large_m_uses_dequantize_then_gemm():
    rng = np.random.default_rng(5)
    N, K, m, r, s = 256, 512, 40, 4, 2.0
    W = data(rng, "normal", (N, K), "bfloat16")
    packed, st = G.quantize_4bit(dev(W), 64, "nf4", dtype="bfloat16")
    Wq = _dequant64(packed.get(), st.absmax.get(), N * K, 64, "nf4").reshape(N, K)
    Wq_bf = Wq.astype(BF16).astype(np.float64)  # the dequantized weight is stored in bfloat16
    x, A, B = (data(rng, "normal", sh, "bfloat16") for sh in ((m, K), (r, K), (N, r)))
    x64, A64, B64 = (a.astype(np.float64) for a in (x, A, B))
    u = s * (x64 @ A64.T)
    ref = x64 @ Wq_bf.T + u @ B64.T
    y = host(G.qlora_forward(dev(x), packed, st, dev(A), dev(B), s, dtype="bfloat16"), "bfloat16").astype(np.float64)
    ub = precision.unit_roundoff("bfloat16")
    g = precision.gamma(K + r + 2, "float32")
    du = ub * np.abs(u) + (1 + ub) * g * s * (np.abs(x64) @ np.abs(A64).T)
    S = np.abs(x64) @ np.abs(Wq_bf).T + (np.abs(u) + du) @ np.abs(B64).T
    bound = ub * np.abs(ref) + (1 + ub) * (g * S + du @ np.abs(B64).T)
    rep = precision.compare_to_bound(y, ref, bound)
    report("qlora_forward m=40", rep, 1)
    assert rep.passed


# --------------------------------------------------------------------------- GPU: LoRA / DoRA


def _lora_bound(x64, W64, A64, B64, b64, s, ref, dtype, w_round=0.0):
    """u = dtype(s·x Aᵀ) (float32 sums), then one float32-accumulated GEMM over K = d + r + 1, output
    rounded to dtype; ``w_round`` is the relative rounding of the packed weight (DoRA's f⊙W)."""
    ud = precision.unit_roundoff(dtype)
    K = W64.shape[1] + A64.shape[0] + 1
    g = precision.gamma(K + 1, "float32")
    u = s * (x64 @ A64.T)
    du = ud * np.abs(u) + (1 + ud) * g * s * (np.abs(x64) @ np.abs(A64).T)
    S = np.abs(x64) @ np.abs(W64).T + (np.abs(u) + du) @ np.abs(B64).T
    inner = (1 + w_round) * (g * (S + np.abs(b64)) + du @ np.abs(B64).T) + w_round * S
    return ud * np.abs(ref) + (1 + ud) * inner


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lora_forward_one_gemm_within_derived_bound(dtype):
    from refimpl import lora as L

    rng = np.random.default_rng(6)
    worst, cases = 0.0, 0
    for m, d, out, r in [(64, 256, 128, 8), (300, 1024, 512, 16), (37, 264, 72, 3)]:
        x, W, A, B, b = (data(rng, "normal", sh, dtype) for sh in ((m, d), (out, d), (r, d), (out, r), (out,)))
        s = L.scaling(16, r)
        x64, W64, A64, B64, b64 = (a.astype(np.float64) for a in (x, W, A, B, b))
        for bias in (False, True):
            ref = L.forward(x64, W64, A64, B64, s, bias=b64 if bias else None)
            bb = b64 if bias else np.zeros_like(b64)
            bound = _lora_bound(x64, W64, A64, B64, bb, s, ref, dtype)
            for chunks in (1, 3):
                y = G.lora_forward(
                    dev(x), dev(W), dev(A), dev(B), s, bias=dev(b) if bias else None, dtype=dtype, chunks=chunks
                )
                rep = precision.compare_to_bound(host(y, dtype).astype(np.float64), ref, bound)
                worst = max(worst, rep.worst_ratio)
                cases += 1
                assert rep.passed, f"m={m} d={d} bias={bias} chunks={chunks}: {rep}"
    print(f"\n[lora_forward {dtype}] cases={cases} worst error/bound = {worst:.3g}")


@needs_gpu
@pytest.mark.gpu
def test_dora_forward_folded_factor_within_derived_bound():
    from refimpl import dora as Dr
    from refimpl import lora as L

    rng = np.random.default_rng(7)
    dtype = "bfloat16"
    worst, cases = 0.0, 0
    wr = precision.unit_roundoff(dtype) + precision.unit_roundoff("float32") * 2
    for m, d, out, r in [(64, 256, 128, 8), (200, 1024, 384, 16)]:
        x, W, A, B, b = (data(rng, "normal", sh, dtype) for sh in ((m, d), (out, d), (r, d), (out, r), (out,)))
        s = L.scaling(8, r)
        x64, W64, A64, B64, b64 = (a.astype(np.float64) for a in (x, W, A, B, b))
        mag = (np.linalg.norm(W64, axis=1) * rng.uniform(0.5, 1.5, out)).astype(np.float32)
        ref = Dr.forward(x64, W64, A64, B64, mag.astype(np.float64), s, bias=b64)
        f = mag / np.linalg.norm(W64 + s * B64 @ A64, axis=1)
        bound = _lora_bound(x64, W64 * f[:, None], A64, B64 * f[:, None], b64, s, ref, dtype, w_round=wr)
        import cupy as cp

        y = G.dora_forward(dev(x), dev(W), dev(A), dev(B), cp.asarray(mag), s, bias=dev(b), dtype=dtype, chunks=2)
        rep = precision.compare_to_bound(host(y, dtype).astype(np.float64), ref, bound)
        worst = max(worst, rep.worst_ratio)
        cases += 1
        assert rep.passed, f"m={m} d={d}: {rep}"
    print(f"\n[dora_forward bf16] cases={cases} worst error/bound = {worst:.3g}")


@needs_gpu
@pytest.mark.gpu
def test_dora_zero_norm_row_raises():
    import cupy as cp

    W = np.zeros((4, 16), np.float32)
    W[1:] = 1.0
    A = np.zeros((2, 16), np.float32)
    B = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="zero norm"):
        G.pack(dev(W), dev(A), dev(B), 1.0, magnitude=cp.ones(4, dtype=np.float32))


# ---------------------------------------------------------------------------------- GPU: TIES


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("profile", ["paper", "peft", "mergekit"])
def test_ties_equals_reference_rounded_once(profile):
    """The fused float64 pass reproduces refimpl.merging.ties exactly (then one rounding to float32)."""
    from refimpl.merging import TIES_PROFILES
    from refimpl.merging import ties as ref_ties

    rng = np.random.default_rng(8)
    opts = dict(TIES_PROFILES[profile])
    opts.pop("rescale")
    cases = n_el = n_bad = 0
    for n, T, dens, w, tied in [
        (10_000, 3, 0.2, None, False),
        (100_003, 4, [0.1, 0.3, 0.5, 1.0], [1.0, 0.5, 2.0, 0.7], False),
        (999, 2, 0.5, [1.0, -1.0], False),
        (20_001, 3, 0.3, None, True),
    ]:
        taus = [rng.standard_normal(n).astype(np.float32) for _ in range(T)]
        if tied:  # magnitudes on a grid of 1/4: many ties at every trim threshold
            taus = [np.round(t * 4).astype(np.float32) / 4 for t in taus]
        taus[0][:50] = 0.0  # zeros never vote
        taus[1][10:20] = taus[0][10:20] * -1  # exact sign ties → zero score
        ref = ref_ties(taus, w, density=dens, profile=profile, lam=1.5)
        got = G.ties([dev(t) for t in taus], w, density=dens, lam=1.5, **opts).get()
        n_bad += int((got != ref.astype(np.float32)).sum())
        n_el += n
        cases += 1
    print(f"\n[ties {profile}] cases={cases} elements={n_el} mismatches={n_bad}")
    assert n_bad == 0


# ------------------------------------------- the reference-named API, the registry and `conform --target cupy`


def _reference_function(op: str):
    import importlib

    module, func = op.split(".")
    return getattr(importlib.import_module(f"refimpl.{module}"), func)


def _adapter(op: str):
    import importlib

    entry = G.OPS[op]
    sub, _, attr = entry.rpartition(".")
    return getattr(importlib.import_module(f"refimpl.kernels.cupy_gpu.{sub}"), attr)


def test_ops_table_names_registry_ops_with_the_reference_signatures():
    """Every OPS entry is a registry op, resolves to a callable, and takes exactly the reference's
    parameters (names, kinds, defaults), so the harness can call it with a reference case."""
    import inspect

    from refimpl import kernels

    assert set(G.OPS) == {
        "lora.forward",
        "lora.forward_batched",
        "dora.forward",
        "qlora.forward",
        "qlora.backward",
        "quant.quantize_4bit",
        "quant.dequantize_4bit",
        "merging.ties",
    }
    for op in G.OPS:
        assert op in kernels.OPS
        ref = inspect.signature(_reference_function(op)).parameters
        ours = inspect.signature(_adapter(op)).parameters
        assert [(p.name, p.kind, p.default) for p in ours.values()] == [
            (p.name, p.kind, p.default) for p in ref.values()
        ], op


def test_cupy_target_declares_float32_and_the_cuda_profile():
    from refimpl.conformance.targets import KernelTarget
    from refimpl.kernels.cupy_gpu import numpy_adapter as api

    t = KernelTarget("cupy")
    for op in G.OPS:
        assert t.compute_dtype(op) == "float32"
    assert t.options("quant.quantize_4bit") == {"profile": "bitsandbytes-cuda"}
    assert t.options("quant.dequantize_4bit") == {"profile": "bitsandbytes-cuda"}
    assert t.options("lora.forward") == {"dropout_mask": None}
    assert t.options("merging.ties") == {}
    assert api.PROFILE == "bitsandbytes-cuda"
    numba = KernelTarget("numba")  # unchanged: float64, no options
    assert numba.compute_dtype("lora.forward") == "float64"
    assert numba.options("quant.quantize_4bit") == {}


@pytest.mark.skipif(REASON is None, reason="a GPU is present: conform --target cupy runs for real")
def test_conform_target_cupy_without_gpu_exits_nonzero_with_the_reason(capsys):
    from refimpl import cli

    rc = cli.main(["conform", "--target", "cupy", "--ops", "lora.forward", "--examples", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cupy is unavailable here" in err and "CuPy" in err


def _special_cases():
    from refimpl.conformance.table import op_table
    from refimpl.kernels.cupy_gpu import numpy_adapter as api

    table = op_table()
    out = []
    for op in G.OPS:
        for sp in table[op].specials():
            case = {**sp.case, **api.OPTIONS.get(op, {})}
            if _reference_raises(op, case) is None:
                continue  # the reference returns a result: compared on the GPU by conform --target cupy
            marks = [needs_gpu] if (op, sp.label) in DETECTED_ON_DEVICE else []
            out.append(pytest.param(op, case, id=f"{op}:{sp.label}", marks=marks))
    return out


def _reference_raises(op, case):
    """The ValueError/TypeError class the reference raises on ``case``, or None if it returns a result."""
    import copy

    try:
        with np.errstate(all="ignore"):
            _reference_function(op)(**copy.deepcopy(case))
    except (ValueError, TypeError) as exc:
        return type(exc)
    return None


#: rejections that need the kernel's result (the DoRA row norms are computed on the GPU)
DETECTED_ON_DEVICE = {("dora.forward", "a row of W + s·B A is zero")}


@pytest.mark.parametrize("op, case", _special_cases())
def test_adapter_rejects_what_the_reference_rejects_before_touching_the_gpu(op, case):
    """Special values the reference rejects: the adapter raises the same exception class from its own
    validation, without CuPy or a GPU (except DETECTED_ON_DEVICE)."""
    import copy

    with pytest.raises(_reference_raises(op, case)):
        _adapter(op)(**copy.deepcopy(case))


def _linear_case(rng):
    x, W = rng.standard_normal((3, 8)), rng.standard_normal((6, 8))
    return x, W, rng.standard_normal((2, 8)), rng.standard_normal((6, 2))


@pytest.mark.parametrize(
    "call, words",
    [
        (
            lambda c: G.numpy_adapter.lora_forward(*c, 0.5, dropout_mask=np.ones((3, 8)), dropout_p=0.5),
            ["dropout_mask", "eval form"],
        ),
        (lambda c: G.numpy_adapter.dora_forward(*c, np.ones(6), 0.5, dropout_mask=np.ones((3, 8))), ["dropout_mask"]),
        (lambda c: G.numpy_adapter.quantize_4bit(np.ones(64, np.float32)), ["profile", "bitsandbytes-cuda"]),
        (lambda c: G.numpy_adapter.ties([c[0], c[0]], density=0.5, rescale="l1"), ["rescale", "l1"]),
        (lambda c: G.numpy_adapter.ties([c[0]] * 17, density=0.5), ["task_vectors", "16"]),
    ],
)
def test_unsupported_arguments_raise_not_implemented_naming_them(call, words):
    with pytest.raises(NotImplementedError) as info:
        call(_linear_case(np.random.default_rng(0)))
    for w in words:
        assert w in str(info.value)


def test_qlora_adapter_refuses_a_half_precision_state_and_the_reference_profile_for_dequantize():
    from refimpl import quant as Q

    rng = np.random.default_rng(0)
    packed, st = Q.quantize_4bit(rng.standard_normal((4, 32)).astype(np.float16), 32)
    with pytest.raises(NotImplementedError, match=r"state\.dtype"):
        G.numpy_adapter.qlora_forward(
            rng.standard_normal((1, 32)), packed, st, rng.standard_normal((2, 32)), rng.standard_normal((4, 2)), 1.0
        )
    with pytest.raises(NotImplementedError, match="profile"):
        G.numpy_adapter.dequantize_4bit(packed, st)  # the state's own profile is "reference"


@needs_gpu
@pytest.mark.gpu
def test_registry_lists_the_cupy_ops_and_adapters_match_the_reference():
    """On a GPU the registry finds every adapter; one small case per op agrees with the reference
    (quant ops bit for bit under bitsandbytes-cuda, the rest within the float32 bound of the harness)."""
    from refimpl import kernels
    from refimpl.conformance import runner

    assert sorted(kernels.ops("cupy")) == sorted(G.OPS)
    res = runner.run("cupy", list(G.OPS), examples=3, tiers=("names", "shapes", "properties"))
    for r in res.results:
        print(f"[{r.op} {r.tier}] {r.status} cases={r.n_cases} worst={r.worst_ratio} {r.message[:120]}")
    assert not res.failures
    assert res.ok
