"""Fused 4-bit dequantize-GEMV/GEMM and the QLoRA forward (Dettmers et al., arXiv 2305.14314, eq. 5).

    Y = X · doubleDequant(c1, c2, W_4bit)ᵀ + b + s · (drop(X) Aᵀ) Bᵀ

The base weight is never materialised: each output row n decodes its K weights from the packed
nibbles through a 16-entry table per block, tbl[j] = RNE_dtype(f32(code[j] · absmax_b)) — exactly
the reference's dequantized values — into a row buffer, and dots it with every row of X
(m < 4: float64 products, eight interleaved partial sums per dot product, a fixed
thread-independent order; m = 1 with whole blocks per row decodes and multiplies in one loop).
For m ≥ 4 rows, tiles of 256 decoded rows (float64) go through BLAS.
The reference (``refimpl.qlora.forward``) sums in BLAS order, so the two agree within
2·γ_K(float64)·Σ|x·w| (``precision.matmul_error_bound`` with float64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from refimpl import _checks
from refimpl.kernels.numba_cpu import _quant_kernels as K
from refimpl.kernels.numba_cpu import quant as nquant
from refimpl.kernels.numba_cpu._bits import bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16
from refimpl.kernels.numba_cpu.lora import lora_branch_add
from refimpl.quant import QuantState
from refimpl.quant.blockwise import float_input_array


@njit(cache=True, inline="always")
def _round_kind(v, kind):
    """float32 v rounded to the state's dtype (fp16/bf16, RNE) and widened to float64."""
    if kind == K.KIND_BF16:
        return np.float64(bf16_to_f32(f32_to_bf16(v)))
    if kind == K.KIND_F16:
        return np.float64(f16_to_f32(f32_to_f16(v)))
    return np.float64(v)


@njit(cache=True, inline="always")
def _dot8(x, i, w, k):
    """Σ_j x[i, j] · w[j] over j < k with 8 interleaved float64 partial sums."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    j = 0
    while j + 8 <= k:
        a0 += x[i, j] * w[j]
        a1 += x[i, j + 1] * w[j + 1]
        a2 += x[i, j + 2] * w[j + 2]
        a3 += x[i, j + 3] * w[j + 3]
        a4 += x[i, j + 4] * w[j + 4]
        a5 += x[i, j + 5] * w[j + 5]
        a6 += x[i, j + 6] * w[j + 6]
        a7 += x[i, j + 7] * w[j + 7]
        j += 8
    while j < k:
        a0 += x[i, j] * w[j]
        j += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(parallel=True, cache=True, fastmath=False)
def dequant_gemv_kernel(x, packed, scales, n_out, k_in, bs, code, kind, y):
    """m = 1, every row a whole number of blocks (k_in % bs == 0): decode and multiply in one loop,
    y[n] = Σ over the row of tbl[nib]·x with eight interleaved float64 partial sums (fixed order)."""
    nblk = k_in // bs
    xv = x[0]
    for n in prange(n_out):
        tbl = np.empty(16, dtype=np.float64)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        for bb in range(nblk):
            b = n * nblk + bb
            scale = scales[b]
            for j in range(16):
                tbl[j] = _round_kind(code[j] * scale, kind)
            base = (b * bs) >> 1
            k = bb * bs
            for p in range(0, bs // 2, 4):
                c0 = np.int64(packed[base + p])
                c1 = np.int64(packed[base + p + 1])
                c2 = np.int64(packed[base + p + 2])
                c3 = np.int64(packed[base + p + 3])
                kk = k + 2 * p
                a0 += tbl[c0 >> 4] * xv[kk]
                a1 += tbl[c0 & 15] * xv[kk + 1]
                a2 += tbl[c1 >> 4] * xv[kk + 2]
                a3 += tbl[c1 & 15] * xv[kk + 3]
                a4 += tbl[c2 >> 4] * xv[kk + 4]
                a5 += tbl[c2 & 15] * xv[kk + 5]
                a6 += tbl[c3 >> 4] * xv[kk + 6]
                a7 += tbl[c3 & 15] * xv[kk + 7]
        y[0, n] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(parallel=True, cache=True, fastmath=False)
def dequant_matmul_kernel(x, packed, scales, n_out, k_in, bs, code, kind, y):
    """y[i, n] = Σ_k x[i, k] · W_dq[n, k] with W_dq decoded row by row from the packed nibbles."""
    m = x.shape[0]
    nchunks = min(n_out, 256)
    for c in prange(nchunks):
        w = np.empty(k_in, dtype=np.float64)
        tbl = np.empty(16, dtype=np.float64)
        for n in range(c * n_out // nchunks, (c + 1) * n_out // nchunks):
            e0 = n * k_in
            e = e0
            e1 = e0 + k_in
            while e < e1:
                b = e // bs
                seg = min(e1, (b + 1) * bs)
                scale = scales[b]
                for j in range(16):
                    tbl[j] = _round_kind(code[j] * scale, kind)
                if e % 2 == 0 and seg % 2 == 0:
                    for p in range((seg - e) // 2):
                        byte = packed[(e >> 1) + p]
                        w[e - e0 + 2 * p] = tbl[byte >> 4]
                        w[e - e0 + 2 * p + 1] = tbl[byte & 15]
                else:
                    for i in range(e, seg):
                        byte = np.int64(packed[i >> 1])
                        nib = (byte >> 4) if i % 2 == 0 else (byte & 15)
                        w[i - e0] = tbl[nib]
                e = seg
            for i in range(m):
                y[i, n] = _dot8(x, i, w, k_in)


@njit(parallel=True, cache=True, fastmath=False)
def dequant_rows_kernel(packed, scales, row0, n_rows, k_in, bs, code, kind, w):
    """w[r, :] = the dequantized row row0 + r of the (n_out, k_in) weight, float64 (exact values)."""
    for r in prange(n_rows):
        tbl = np.empty(16, dtype=np.float64)
        e0 = (row0 + r) * k_in
        e = e0
        e1 = e0 + k_in
        while e < e1:
            b = e // bs
            seg = min(e1, (b + 1) * bs)
            scale = scales[b]
            for j in range(16):
                tbl[j] = _round_kind(code[j] * scale, kind)
            for i in range(e, seg):
                byte = np.int64(packed[i >> 1])
                nib = (byte >> 4) if i % 2 == 0 else (byte & 15)
                w[r, i - e0] = tbl[nib]
            e = seg


#: From this many rows of x on, the product runs as BLAS GEMMs over tiles of decoded weight rows
#: (each tile is _TILE_ROWS x in float64), which beats the row-at-a-time dot products.
GEMM_MIN_ROWS = 4
_TILE_ROWS = 256


def _float64(value: Any, name: str) -> np.ndarray:
    """Any float array (bfloat16 included) as float64, finite values only (as the reference)."""
    arr = float_input_array(value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.float64),
                            name).astype(np.float64)
    return _checks.float_array(arr, name, convert=False)


def dequant_matmul(x: Any, packed: Any, state: QuantState, *, profile: str | None = None) -> np.ndarray:
    """x · dequantize_4bit(packed, state)ᵀ in float64 without forming the (out, in) weight.

    x: (..., in) of any float dtype (used exactly); state: a 2-D (out, in) weight.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a refimpl.quant.QuantState, got {_checks.describe(state)}")
    if len(state.shape) != 2:
        raise ValueError(f"state: expected a 2-D (out_features, in_features) weight, got shape {state.shape}")
    n_out, k_in = state.shape
    xx = _float64(x, "x")
    if xx.ndim < 1 or xx.shape[-1] != k_in:
        raise ValueError(f"x: expected shape (..., {k_in}), got shape {xx.shape}")
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise TypeError(f"packed: expected uint8 packed codes, got {_checks.describe(p)}")
    if p.size != (state.n + 1) // 2:
        raise ValueError(f"packed: state describes shape {state.shape} ({(state.n + 1) // 2} bytes), "
                         f"got {p.size} bytes")
    x2 = np.ascontiguousarray(xx.reshape(-1, k_in))
    y = np.empty((x2.shape[0], n_out), dtype=np.float64)
    kind = nquant._KIND.get(state.dtype, K.KIND_F32)  # float64 states hold float32 values
    flat = np.ascontiguousarray(p).reshape(-1)
    scales = nquant.block_scales(state)
    code = nquant.code_table(state, profile)
    if x2.shape[0] == 1 and k_in % state.blocksize == 0:
        dequant_gemv_kernel(x2, flat, scales, n_out, k_in, state.blocksize, code, kind, y)
    elif x2.shape[0] < GEMM_MIN_ROWS:
        dequant_matmul_kernel(x2, flat, scales, n_out, k_in, state.blocksize, code, kind, y)
    else:
        tile = np.empty((min(_TILE_ROWS, n_out), k_in), dtype=np.float64)
        for lo in range(0, n_out, _TILE_ROWS):
            rows = min(_TILE_ROWS, n_out - lo)
            dequant_rows_kernel(flat, scales, lo, rows, k_in, state.blocksize, code, kind, tile)
            np.matmul(x2, tile[:rows].T, out=y[:, lo:lo + rows])
    return y.reshape(*xx.shape[:-1], n_out)


def forward(
    x: Any,
    packed: Any,
    state: QuantState,
    A: Any,
    B: Any,
    scaling: float,
    bias: Any = None,
    *,
    dropout_mask: Any = None,
    dropout_p: float = 0.0,
    profile: str | None = None,
) -> np.ndarray:
    """``refimpl.qlora.forward`` with the fused dequantize-matmul: y = x·W_dqᵀ + b + s·(drop(x)Aᵀ)Bᵀ."""
    y = dequant_matmul(x, packed, state, profile=profile)
    n_out = state.shape[0]
    if bias is not None:
        b = _float64(bias, "bias")
        _checks.check_shape(b, "bias", (n_out,))
        y += b
    xx = _float64(x, "x")
    mask = None if dropout_mask is None else _float64(dropout_mask, "dropout_mask")
    lora_branch_add(y, xx, _float64(A, "A"), _float64(B, "B"), scaling, mask, dropout_p)
    return y
