"""numba kernels other than quantization: fused 4-bit GEMV/GEMM (QLoRA), LoRA, DoRA, TIES, and the
kernel registry — each checked against the NumPy reference (exact where the math is, else within
a bound derived from float64's unit roundoff and the reduction length)."""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba", reason="numba is not installed: the numba kernels need the fast extra")

import refimpl.kernels as kernels
import refimpl.quant as R
from refimpl import dora, lora, merging, precision, qlora
from refimpl.kernels.numba_cpu import dora as ndora
from refimpl.kernels.numba_cpu import lora as nlora
from refimpl.kernels.numba_cpu import qlora as nqlora
from refimpl.kernels.numba_cpu import ties as nties


def _bound(x, W, A, B, s, extra=4):
    """Both sides compute in float64 in different orders: each is within γ_{K+extra}(f64)·Σ|terms|
    of the exact value, so their difference is within twice that."""
    base = precision.matmul_error_bound(x, W.T, "float64", extra_roundings=extra)
    branch = precision.gamma(A.shape[1] + B.shape[1] + extra, "float64") * (np.abs(x) @ np.abs(A.T) @ np.abs(B.T))
    return 2.0 * (base + abs(s) * branch)


def _check(actual, expected, bound, label):
    rep = precision.compare_to_bound(actual, expected, bound)
    print(f"\n{label}: {rep}")
    assert rep.passed, f"{label}: {rep}"
    return rep


# ---------------------------------------------------------------- QLoRA: fused dequantize-GEMV/GEMM


@pytest.mark.parametrize("shape,bs", [((48, 64), 64), ((33, 130), 64), ((7, 33), 32)])  # row-straddling blocks
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_fused_qlora_forward_matches_reference_within_float64_bound(shape, bs, dtype):
    rng = np.random.default_rng(1)
    n_out, k_in = shape
    W = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    A, B = rng.standard_normal((4, k_in)), rng.standard_normal((n_out, 4))
    bias = rng.standard_normal(n_out)
    for qt in ("nf4", "fp4"):
        for nested in (False, True):
            packed, state = R.quantize_4bit(W, bs, qt, nested, profile="bitsandbytes-cpu")
            Wd = R.dequantize_4bit(packed, state).astype(np.float64)
            for m in (1, 5):  # GEMV path (m < 4) and tiled BLAS path
                x = rng.standard_normal((m, k_in))
                want = qlora.forward(x, packed, state, A, B, 0.5, bias)
                got = nqlora.forward(x, packed, state, A, B, 0.5, bias)
                _check(
                    got,
                    want,
                    _bound(x, Wd, A, B, 0.5),
                    f"qlora {shape} {np.dtype(dtype).name} {qt} nested={nested} m={m}",
                )
                # without the LoRA branch the fused product is x·W_dqᵀ
                base = nqlora.dequant_matmul(x, packed, state)
                _check(base, x @ Wd.T, 2 * precision.matmul_error_bound(x, Wd.T, "float64"), "dequant_matmul")


def _fixed_order_gemv(x, Wd):
    """NumPy emulation of the AVX2 GEMV kernel's float64 summation order: lane l of 16 sums the
    products x[k]·Ŵ[n, k] with k ≡ l (mod 16) in increasing k (cumsum is sequential), lanes l and
    l + 8 are added, then the 8 lanes in the tree ((0+1)+(2+3))+((4+5)+(6+7))."""
    prod = x[:, None, :] * Wd[None, :, :]
    lanes = np.cumsum(prod.reshape(*prod.shape[:2], -1, 16), axis=2)[:, :, -1, :]
    t = lanes[..., :8] + lanes[..., 8:]
    return ((t[..., 0] + t[..., 1]) + (t[..., 2] + t[..., 3])) + ((t[..., 4] + t[..., 5]) + (t[..., 6] + t[..., 7]))


@pytest.mark.skipif(not nqlora.AVX2, reason="the vectorised GEMV kernel needs an AVX2 host")
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_vectorised_gemv_sums_exact_dequantized_weights_in_its_stated_order(dtype):
    """Bit-identical to the documented order over the reference's dequantized weights: the vpermps
    table lookup, the in-vector fp16/bf16 rounding of the table and the in-kernel decoding of the
    nested absmax (600 rows x 4096 / 64 = 38,400 blocks: 150 nested groups) are all exact."""
    rng = np.random.default_rng(11)
    cases = 0
    for (n_out, k_in), bs in (((600, 4096), 64), ((24, 256), 32), ((10, 512), 128), ((6, 4096), 4096)):
        W = (rng.standard_normal((n_out, k_in)) * rng.lognormal(0, 3, (n_out, 1))).astype(np.float32).astype(dtype)
        for qt in ("nf4", "fp4"):
            for nested in (False, True):
                packed, state = R.quantize_4bit(W, bs, qt, nested, profile="bitsandbytes-cpu")
                Wd = R.dequantize_4bit(packed, state).astype(np.float64)
                for m in (1, 3):
                    x = rng.standard_normal((m, k_in))
                    got = nqlora.dequant_matmul(x, packed, state)
                    assert np.array_equal(got, _fixed_order_gemv(x, Wd)), (n_out, k_in, bs, qt, nested, m)
                    cases += 1
    print(f"\nAVX2 GEMV {np.dtype(dtype).name}: {cases} cases bit-identical to the stated summation order")


@pytest.mark.skipif(not nqlora.AVX2, reason="the vectorised GEMV kernel needs an AVX2 host")
def test_vectorised_and_scalar_gemv_agree_within_float64_bound_and_ignore_thread_count(monkeypatch):
    import numba

    rng = np.random.default_rng(12)
    W = rng.standard_normal((96, 1024)).astype(np.float32).astype(ml_dtypes.bfloat16)
    packed, state = R.quantize_4bit(W, 64, "nf4", True, profile="bitsandbytes-cpu")
    Wd = R.dequantize_4bit(packed, state).astype(np.float64)
    x = rng.standard_normal((1, 1024))
    fast = nqlora.dequant_matmul(x, packed, state)
    bound = 2 * precision.matmul_error_bound(x, Wd.T, "float64")
    _check(fast, x @ Wd.T, bound, "AVX2 GEMV vs x·Ŵᵀ")
    monkeypatch.setattr(nqlora, "AVX2", False)
    _check(nqlora.dequant_matmul(x, packed, state), x @ Wd.T, bound, "scalar GEMV vs x·Ŵᵀ")
    monkeypatch.setattr(nqlora, "AVX2", True)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = nqlora.dequant_matmul(x, packed, state)
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(one, fast)  # each output is summed by one thread in a fixed order


@pytest.mark.skipif(not nqlora.AVX2, reason="the vectorised kernels need an AVX2 host")
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_fused_forward_on_both_sides_of_the_m_dispatch_matches_reference(dtype, monkeypatch):
    """Below ``FUSED_MAX_ROWS`` rows of x the blocked GEMM kernel runs: every row bit-identical to the GEMV
    kernel's stated order (so the output does not depend on m); from the threshold on, decoded float64 tiles
    through BLAS (several tiles and a short last one here). Both sides: the forward within the float64 bound
    of the reference. Odd row counts exercise the short blocks of 4 rows of x and 2 rows of W."""
    rng = np.random.default_rng(13)
    th = nqlora.FUSED_MAX_ROWS
    monkeypatch.setattr(nqlora, "FORWARD_TILE_ELEMENTS", 3 * 4096)  # several tiles per weight, a short last one
    cases = 0
    for (n_out, k_in), bs in (((37, 256), 64), ((515, 128), 32), ((9, 4096), 4096)):
        W = (rng.standard_normal((n_out, k_in)) * rng.lognormal(0, 2, (n_out, 1))).astype(np.float32).astype(dtype)
        A, B, bias = rng.standard_normal((4, k_in)), rng.standard_normal((n_out, 4)), rng.standard_normal(n_out)
        for qt, nested in (("nf4", True), ("fp4", False)):
            packed, state = R.quantize_4bit(W, bs, qt, nested, profile="bitsandbytes-cpu")
            Wd = R.dequantize_4bit(packed, state).astype(np.float64)
            for m in (2, 5, 8, th - 1, th, th + 3):
                x = rng.standard_normal((m, k_in))
                assert nqlora.forward_path(m, state) == ("avx2" if m < th else "avx2 tiles+BLAS")
                base = nqlora.dequant_matmul(x, packed, state)
                if m < th:
                    assert np.array_equal(base, _fixed_order_gemv(x, Wd)), (n_out, k_in, bs, qt, m)
                _check(base, x @ Wd.T, 2 * precision.matmul_error_bound(x, Wd.T, "float64"), f"x·Ŵᵀ m={m}")
                got = nqlora.forward(x, packed, state, A, B, 0.5, bias)
                want = qlora.forward(x, packed, state, A, B, 0.5, bias)
                label = f"qlora m={m} {np.dtype(dtype).name} {qt} ({n_out}, {k_in})"
                _check(got, want, _bound(x, Wd, A, B, 0.5), label)
                cases += 1
    print(f"\n{cases} cases on both sides of FUSED_MAX_ROWS = {th}")


@pytest.mark.skipif(not nqlora.AVX2, reason="the vectorised kernels need an AVX2 host")
def test_fused_gemm_ignores_thread_count():
    import numba

    rng = np.random.default_rng(14)
    W = rng.standard_normal((203, 512)).astype(np.float32)
    packed, state = R.quantize_4bit(W, 64, "nf4", True, profile="bitsandbytes-cpu")
    x = rng.standard_normal((nqlora.FUSED_MAX_ROWS - 1, 512))
    many = nqlora.dequant_matmul(x, packed, state)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = nqlora.dequant_matmul(x, packed, state)
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(one, many)


def test_fused_qlora_forward_with_dropout_mask_matches_reference():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((40, 64)).astype(np.float32)
    packed, state = R.quantize_4bit(W, 64, "nf4", True, profile="bitsandbytes-cpu")
    Wd = R.dequantize_4bit(packed, state).astype(np.float64)
    x, A, B = rng.standard_normal((2, 5, 64)), rng.standard_normal((8, 64)), rng.standard_normal((40, 8))
    mask = (rng.random(x.shape) > 0.25).astype(np.float64)
    want = qlora.forward(x, packed, state, A, B, 2.0, dropout_mask=mask, dropout_p=0.25)
    got = nqlora.forward(x, packed, state, A, B, 2.0, dropout_mask=mask, dropout_p=0.25)
    assert got.shape == want.shape == (2, 5, 40)
    _check(got.reshape(-1, 40), want.reshape(-1, 40), _bound(x.reshape(-1, 64), Wd, A, B, 2.0 / 0.75), "qlora dropout")


def test_fused_qlora_bad_arguments_raise():
    W = np.ones((8, 64), dtype=np.float32)
    packed, state = R.quantize_4bit(W, 64, "nf4")
    A, B = np.ones((2, 64)), np.ones((8, 2))
    with pytest.raises(ValueError, match="x"):
        nqlora.forward(np.ones((1, 63)), packed, state, A, B, 1.0)
    with pytest.raises(TypeError, match="state"):
        nqlora.forward(np.ones((1, 64)), packed, None, A, B, 1.0)
    with pytest.raises(TypeError, match="packed"):
        nqlora.forward(np.ones((1, 64)), packed.astype(np.int16), state, A, B, 1.0)
    with pytest.raises(ValueError, match="bias"):
        nqlora.forward(np.ones((1, 64)), packed, state, A, B, 1.0, np.ones(7))
    p1, s1 = R.quantize_4bit(np.ones(64, dtype=np.float32), 64, "nf4")
    with pytest.raises(ValueError, match="state"):
        nqlora.forward(np.ones((1, 64)), p1, s1, A, B, 1.0)


# ---------------------------------------------------------------- LoRA and DoRA


def _layer(rng, shape=(3, 5, 24), out=20, r=4):
    x = rng.standard_normal(shape)
    return (
        x,
        rng.standard_normal((out, shape[-1])),
        rng.standard_normal((r, shape[-1])),
        rng.standard_normal((out, r)),
        rng.standard_normal(out),
    )


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_forward_and_backward_match_reference(fifo, dropout):
    rng = np.random.default_rng(3)
    x, W, A, B, b = _layer(rng)
    kw = {"dropout_mask": (rng.random(x.shape) > 0.3).astype(np.float64), "dropout_p": 0.3} if dropout else {}
    Wc = W.T.copy() if fifo else W
    x2 = x.reshape(-1, x.shape[-1])
    s_eff = 1.5 / 0.7 if dropout else 1.5
    want = lora.forward(x, Wc, A, B, 1.5, bias=b, fan_in_fan_out=fifo, **kw)
    got = nlora.forward(x, Wc, A, B, 1.5, bias=b, fan_in_fan_out=fifo, **kw)
    _check(
        got.reshape(-1, 20),
        want.reshape(-1, 20),
        _bound(x2, W, A, B, s_eff) + 2 * np.abs(b) * precision.gamma(4, "float64"),
        "lora forward",
    )
    g = rng.standard_normal(want.shape)
    rg = lora.backward(x, Wc, A, B, g, 1.5, fan_in_fan_out=fifo, need_dW=True, need_dbias=True, **kw)
    ng = nlora.backward(x, Wc, A, B, g, 1.5, fan_in_fan_out=fifo, need_dW=True, need_dbias=True, **kw)
    g2 = g.reshape(-1, 20)
    bound_dx = _bound(g2, W.T, B.T, A.T, s_eff)
    _check(ng.dx.reshape(-1, 24), rg.dx.reshape(-1, 24), bound_dx, "lora dx")
    for name in ("dA", "dB", "dW", "dbias"):
        want_g, got_g = getattr(rg, name), getattr(ng, name)
        scale = np.abs(want_g).max() + 1.0
        k = x2.shape[0] + A.shape[0] + 24
        _check(got_g, want_g, 2 * precision.gamma(k, "float64") * scale * 1e2, f"lora {name}")


@pytest.mark.parametrize("dropout", [False, True])
def test_dora_forward_and_weight_norm_match_reference(dropout):
    rng = np.random.default_rng(4)
    x, W, A, B, b = _layer(rng, out=300)  # 300 rows: more than one row tile of the norm kernel
    m = rng.random(300) + 0.5
    kw = {"dropout_mask": (rng.random(x.shape) > 0.3).astype(np.float64), "dropout_p": 0.3} if dropout else {}
    want = dora.forward(x, W, A, B, m, 0.8, bias=b, **kw)
    got = ndora.forward(x, W, A, B, m, 0.8, bias=b, **kw)
    norm = dora.weight_norm(W, A, B, 0.8)
    f = np.abs(m / norm)
    x2 = x.reshape(-1, 24)
    bound = _bound(x2, W, A, B, 0.8 / 0.7) * (1 + f) * 2 + np.abs(b) * 1e-15
    _check(got.reshape(-1, 300), want.reshape(-1, 300), bound, f"dora forward dropout={dropout}")
    got_norm = ndora.weight_norm(W, A, B, 0.8)
    v = W + 0.8 * B @ A
    _check(
        got_norm,
        norm,
        2 * precision.gamma(24 + 8, "float64") * np.sqrt((v * v).sum(axis=1)) + 1e-300,
        "dora weight_norm",
    )


def test_lora_and_dora_bad_arguments_raise():
    rng = np.random.default_rng(5)
    x, W, A, B, _ = _layer(rng)
    with pytest.raises(ValueError, match="A"):
        nlora.forward(x, W, A[:, :-1], B, 1.0)
    with pytest.raises(ValueError, match="B"):
        nlora.forward(x, W, A, B[:-1], 1.0)
    with pytest.raises(ValueError, match="x"):
        nlora.forward(x[..., :-1], W, A, B, 1.0)
    with pytest.raises(TypeError, match="scaling"):
        nlora.forward(x, W, A, B, "1")
    with pytest.raises(ValueError, match="dropout_mask"):
        nlora.forward(x, W, A, B, 1.0, dropout_mask=np.full(x.shape, 2.0), dropout_p=0.5)
    with pytest.raises(ValueError, match="dropout_p"):
        nlora.forward(x, W, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="grad_y"):
        nlora.backward(x, W, A, B, np.ones((3, 5, 19)), 1.0)
    with pytest.raises(ValueError, match="m"):
        ndora.forward(x, W, A, B, np.ones(19), 1.0)
    with pytest.raises(ValueError, match="row norm is zero"):
        ndora.forward(x, np.zeros_like(W), A, np.zeros_like(B), np.ones(20), 1.0)
    with pytest.raises(ValueError, match="x"):
        nlora.forward(np.full((2, 24), np.nan), W, A, B, 1.0)


# ---------------------------------------------------------------- TIES


def _task_vectors(rng, n, dtype, tied):
    taus = [rng.standard_normal(n) for _ in range(3)]
    if tied:  # many equal magnitudes: the trim's tie rules and zero election sums are exercised
        taus = [np.round(t * 2) for t in taus]
    return [t.astype(dtype) for t in taus]


@pytest.mark.parametrize("profile", ["paper", "peft", "mergekit"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_equals_reference_bit_for_bit_for_every_profile(profile, dtype):
    rng = np.random.default_rng(6)
    cases = 0
    for n in (1000, 40_001):
        for tied in (False, True):
            taus = _task_vectors(rng, n, dtype, tied)
            for density in (0.2, 1.0, [0.1, 0.3, 0.9]):
                for weights in (None, [1.0, 0.5, 2.0]):
                    want = merging.ties(taus, weights, density=density, profile=profile)
                    got = nties.ties(taus, weights, density=density, profile=profile, out_dtype=np.float64)
                    assert np.array_equal(got, want), (n, tied, density, weights)
                    cases += 1
    print(f"\nTIES {profile} {np.dtype(dtype).name}: {cases} cases bit-identical to the reference")


def test_ties_l1_rescale_and_options_match_reference_within_a_few_ulps():
    rng = np.random.default_rng(7)
    taus = _task_vectors(rng, 5000, np.float64, False)
    for opts in (
        {"rescale": "l1"},
        {"elect": "count", "divisor": "weight_sum"},
        {"weight_stage": "before_election", "divisor": "none", "lam": 0.7},
        {"k_rule": "floor_min1", "zero_sign": "global_majority"},
    ):
        want = merging.ties(taus, [1.0, -0.5, 2.0], density=0.3, profile="mergekit", **opts)
        got = nties.ties(taus, [1.0, -0.5, 2.0], density=0.3, profile="mergekit", out_dtype=np.float64, **opts)
        # only the L1 factor ‖τ‖₁/‖τ̂‖₁ is summed in another order: each norm is within γ_n of exact on
        # either side (4γ_n for the ratio of the two sides), plus a few roundings of the entry itself
        n = taus[0].size
        bound = (4 * precision.gamma(n, "float64") + 8 * precision.unit_roundoff("float64")) * np.abs(want)
        _check(got, want, bound, f"ties {opts}")


def test_ties_float32_output_is_the_reference_rounded_once():
    rng = np.random.default_rng(8)
    taus = _task_vectors(rng, 10_000, np.float32, False)
    want = merging.ties(taus, [0.3, 0.3, 0.4], density=0.2, profile="peft")
    got = nties.ties(taus, [0.3, 0.3, 0.4], density=0.2, profile="peft")
    assert got.dtype == np.float32
    assert np.array_equal(got, want.astype(np.float32))


@given(st.integers(1, 400), st.floats(0.01, 1.0), st.sampled_from(["paper", "peft", "mergekit"]), st.integers(0, 2**31))
def test_ties_kernel_equals_reference_for_any_size_and_density(n, density, profile, seed):
    rng = np.random.default_rng(seed)
    taus = [np.round(rng.standard_normal(n) * 3) / 2 for _ in range(2)]
    want = merging.ties(taus, density=density, profile=profile)
    got = nties.ties(taus, density=density, profile=profile)
    assert np.array_equal(got, want)


def test_ties_peak_extra_memory_is_at_most_two_tensors():
    rng = np.random.default_rng(9)
    n = 2_000_000
    taus = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    nties.ties(taus[:1], density=0.2, profile="peft")  # compile outside the measurement
    tracemalloc.start()
    try:
        out = nties.ties(taus, density=0.2, profile="peft")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one = taus[0].nbytes
    print(f"\nTIES 3 x {n} float32: peak extra {peak / one:.2f} x one tensor (output included)")
    assert out.nbytes == one
    assert peak <= 2 * one


def test_ties_bad_arguments_raise():
    t = [np.ones(10), np.ones(10)]
    with pytest.raises(TypeError, match="task_vectors"):
        nties.ties(np.ones((2, 10)), density=0.5)
    with pytest.raises(ValueError, match="task_vectors\\[1\\]"):
        nties.ties([np.ones(10), np.ones(9)], density=0.5)
    with pytest.raises(ValueError, match="dtype"):
        nties.ties([np.ones(10), np.ones(10, dtype=np.float32)], density=0.5)
    with pytest.raises(ValueError, match="density"):
        nties.ties(t, density=0.0)
    with pytest.raises(ValueError, match="weights"):
        nties.ties(t, [1.0], density=0.5)
    with pytest.raises(ValueError, match="profile"):
        nties.ties(t, density=0.5, profile="torch")
    with pytest.raises(ValueError, match="out_dtype"):
        nties.ties(t, density=0.5, out_dtype=np.float16)
    with pytest.raises(ValueError, match="finite"):
        nties.ties([np.array([1.0, np.nan, 2.0] * 4), np.ones(12)], density=0.5)


# ---------------------------------------------------------------- registry


def test_registry_lists_numba_ops_under_the_reference_names():
    avail = kernels.available()
    assert avail["numpy"] is None and avail["numba"] is None
    assert kernels.ops("numba") == list(kernels.OPS)
    assert kernels.get("merging.ties", "numba") is nties.ties
    assert kernels.get("quant.quantize_4bit", "numpy") is R.quantize_4bit
    for op in kernels.OPS:  # the kernel's parameters are the reference's (plus options)
        import inspect

        ref_params = list(inspect.signature(kernels.get(op, "numpy")).parameters)
        ker_params = list(inspect.signature(kernels.get(op, "numba")).parameters)
        assert ker_params[: len(ref_params)] == ref_params, op  # same names in the same order, options after


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="backend"):
        kernels.get("lora.forward", "rust")
    with pytest.raises(ValueError, match="op"):
        kernels.get("forward", "numba")
    with pytest.raises(LookupError, match=r"lora\.nonexistent"):
        kernels.get("lora.nonexistent", "numba")
    with pytest.raises(LookupError, match="module"):
        kernels.get("nomodule.forward", "numba")
    if kernels.available()["cupy"] is not None:
        with pytest.raises(LookupError, match="not available"):
            kernels.get("lora.forward", "cupy")
        assert kernels.fastest("merging.ties")[0] == "numba"


def test_registry_reads_a_backend_ops_table(monkeypatch):
    import sys
    import types

    pkg = types.ModuleType("fake_backend_pkg")
    sub = types.ModuleType("fake_backend_pkg.impl")

    def my_forward(*args, **kwargs):
        return "fake"

    sub.my_forward = my_forward
    pkg.OPS = {"lora.forward": "impl.my_forward", "dora.forward": my_forward, "lora.backward": 3}
    monkeypatch.setitem(sys.modules, "fake_backend_pkg", pkg)
    monkeypatch.setitem(sys.modules, "fake_backend_pkg.impl", sub)
    monkeypatch.setitem(kernels.BACKENDS, "fake", "fake_backend_pkg")
    monkeypatch.setattr(kernels, "_probe", lambda backend: None)
    assert kernels.get("lora.forward", "fake") is my_forward
    assert kernels.get("dora.forward", "fake") is my_forward
    with pytest.raises(LookupError, match="not callable"):
        kernels.get("lora.backward", "fake")
    assert kernels.ops("fake") == ["lora.forward", "dora.forward"]
