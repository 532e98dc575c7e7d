"""Fused 4-bit GEMV for m = 1..16 rows, and the QLoRA forward (QLoRA, arXiv 2305.14314, eq. 5).

    y[i, n] = Σ_k x[i, k] · code[q[n, k]] · absmax[(n·K + k) / bs]   (+ s · Σ_j u[i, j] B[n, j]) (+ b[n])
    u = x Aᵀ (the LoRA down-projection, computed first by a small kernel)

The weight is read once, as 4-bit codes plus its absmax: no dequantized copy is written. A block of KS
warps owns R output rows; the warps split K. Each lane decodes 32 consecutive codes (one 16-byte load) per
row and step through a 16-entry shared-memory table (a byte offset per nibble, one PRMT each), multiplies
them by the matching inputs of every row of x (read through L1, shared by the R rows), and keeps a float32
partial sum per 16-element group that is scaled by the group's absmax once. Warp shuffles, a fixed-order
sum over the KS warps and one rounding to the output dtype end it. Sums are float32; the bound used in the
tests is γ_{K+r+4}(float32) · Σ_k |x_k| |w_k| plus the output rounding.

For m = 1 ``gemv4_rows`` keeps each warp's 1024-column slice of x in registers and loops the block over
groups of rows, so x is read once per block instead of once per row group: on the H200, 8192², 18.65 µs =
0.517 × bitsandbytes' time (``gemv4``: 20.2 µs, 0.557 ×); both are bound by the L1/shared-memory pipe, one
table lookup per weight (bench/README.md, GEMV; bench/results/gpu-h200-bench-gemv-rows.json).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refimpl.kernels.cupy_gpu import _device as D
from refimpl.kernels.cupy_gpu import nf4 as _nf4

MAX_M = 16
#: (rows per block R, 1024-element steps in flight per warp U, warps splitting K KS) by m, from the sweep in
#: bench/gpu_bench.py on the H200 (m > 4: (2, 2, 1) and (2, 2, 4) within 0.1 %; (2, 2, 1) is the tested one)
GEMV_CONFIG = {m: ((4, 1, 2) if m <= 4 else (2, 2, 1)) for m in range(1, MAX_M + 1)}
#: m ≤ ROWS_MAX_M and K ≤ 1024 · ROWS_MAX_WARPS take ``gemv4_rows`` (x held in registers, blocks looping over
#: groups of ROWS_RPW weight rows; grid ROWS_WAVES × the resident blocks); ROWS_MAX_M = 0 turns it off
ROWS_MAX_M = 1
ROWS_MAX_WARPS = 32
ROWS_RPW = 8
ROWS_WAVES = 1

_GEMV_SRC = r"""
// x: (M, K) elem_t; q: (N*K/2) codes; absmax float (N*K/BS); out (M, N) elem_t
// optional LoRA: u (M, R_LORA) float32 (already scaled by s), lb (N, R_LORA) elem_t; optional bias (N) elem_t
__device__ __forceinline__ void load16(const elem_t* __restrict__ p, float v[16]) {
#if DT == 0
  const float4* q = reinterpret_cast<const float4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) { float4 a = __ldg(q + i); v[4*i] = a.x; v[4*i+1] = a.y; v[4*i+2] = a.z; v[4*i+3] = a.w; }
#else
  const uint4* q = reinterpret_cast<const uint4*>(p);
  uint4 a = __ldg(q), b = __ldg(q + 1);
  u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) { v[2*i] = to_f((u16)(w[i] & 0xffffu)); v[2*i+1] = to_f((u16)(w[i] >> 16)); }
#endif
}

// 16 codes (two code words, the high nibble of each byte first) through the shared-memory table: w[j] = lut[nib_j]
__device__ __forceinline__ void decode16(const char* __restrict__ lut_b, u32 c0, u32 c1, float w[16]) {
  const u32 cw[2] = {c0, c1};
#pragma unroll
  for (int b2 = 0; b2 < 2; ++b2) {
    // byte k of hi4/lo4 = 4 x (high/low nibble of code byte k): a shared-memory byte offset
    const u32 hi4 = (cw[b2] >> 2) & 0x3c3c3c3cu, lo4 = (cw[b2] << 2) & 0x3c3c3c3cu;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const u32 sel = 0x4440u + k;                   // byte k, zero-extended (one PRMT)
      w[8 * b2 + 2 * k] = *reinterpret_cast<const float*>(lut_b + __byte_perm(hi4, 0u, sel));
      w[8 * b2 + 2 * k + 1] = *reinterpret_cast<const float*>(lut_b + __byte_perm(lo4, 0u, sel));
    }
  }
}

// y (the weight product of output (i, n)) + the LoRA branch Σ_j u[i, j] B[n, j] + the bias, in that order
__device__ __forceinline__ float add_lora_bias(float y, const float* __restrict__ u, const elem_t* __restrict__ lb,
                                               const elem_t* __restrict__ bias, int i, int n) {
#if R_LORA > 0
  for (int j = 0; j < R_LORA; ++j) y = fmaf(u[i * R_LORA + j], to_f(lb[(long long)n * R_LORA + j]), y);
#endif
#if HAS_BIAS
  y += to_f(bias[n]);
#endif
  return y;
}

extern "C" __global__ void __launch_bounds__(32 * KS) gemv4(
    const elem_t* __restrict__ x, const u8* __restrict__ q, const float* __restrict__ absmax,
    const float* __restrict__ u, const elem_t* __restrict__ lb, const elem_t* __restrict__ bias,
    elem_t* __restrict__ out, int N, int K) {
  // a lane decodes 32 consecutive codes of a row (one 16-byte load) per step; a warp step covers 1024 k
  const float lut_init[16] = LUT_INIT;
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = lut_init[threadIdx.x];
  __syncthreads();
  const char* lut_b = reinterpret_cast<const char*>(lut);
  // a block of KS warps owns RPW rows; warp wk takes every KS-th group of U steps (split K)
  const int lane = threadIdx.x & 31;
  const int wk = threadIdx.x >> 5;
  const int n0 = blockIdx.x * RPW;
  if (n0 >= N) return;                               // the whole block leaves together
  float acc[RPW][M];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int i = 0; i < M; ++i) acc[r][i] = 0.0f;

  for (int kb = wk * 1024 * U; kb < K; kb += 1024 * U * KS) {
    // every code and absmax load of U steps first: RPW * U * 16 bytes in flight per lane
    uint4 c[U][RPW];
    float a[U][RPW];
#pragma unroll
    for (int s = 0; s < U; ++s) {
      int k0 = min(kb + s * 1024 + lane * 32, K - 32);
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        int n = min(n0 + r, N - 1);                    // a missing last row repeats row N-1, never stored
        long long e = (long long)n * K + k0;
        c[s][r] = __ldg(reinterpret_cast<const uint4*>(q + e / 2));
        a[s][r] = __ldg(absmax + e / BS);
      }
    }
#pragma unroll
    for (int s = 0; s < U; ++s) {
      const int k0 = kb + s * 1024 + lane * 32;
      if (k0 >= K) break;
#pragma unroll
      for (int h = 0; h < 2; ++h) {                   // two halves of 16 codes (8 bytes) each
        float w[RPW][16];
#pragma unroll
        for (int r = 0; r < RPW; ++r) decode16(lut_b, h ? c[s][r].z : c[s][r].x, h ? c[s][r].w : c[s][r].y, w[r]);
#pragma unroll
        for (int i = 0; i < M; ++i) {
          float xv[16];
          load16(x + (long long)i * K + k0 + 16 * h, xv);
#pragma unroll
          for (int r = 0; r < RPW; ++r) {
            float p = 0.0f;
#pragma unroll
            for (int j = 0; j < 16; ++j) p = fmaf(xv[j], w[r][j], p);
            acc[r][i] = fmaf(p, a[s][r], acc[r][i]);
          }
        }
      }
    }
  }
  __shared__ float part[KS][RPW][M];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int i = 0; i < M; ++i) {
      float v = acc[r][i];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) part[wk][r][i] = v;
    }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      int n = n0 + r;
      if (n >= N) break;
#pragma unroll
      for (int i = 0; i < M; ++i) {
        float y = part[0][r][i];
        for (int w = 1; w < KS; ++w) y += part[w][r][i];   // fixed order: deterministic
        acc[r][i] = y;
      }
      for (int i = 0; i < M; ++i) out[(long long)i * N + n] = from_f(add_lora_bias(acc[r][i], u, lb, bias, i, n));
    }
  }
}

// m = 1 (ROWS_M rows of x): a block of KS = ceil(K / 1024) warps loops over groups of RPW weight rows. Warp w
// owns the columns [1024 w, 1024 w + 1024) and holds that slice of x in registers, read once per block rather
// than once per row group: the L1 traffic is then the code-table lookups and the weight codes (bench/README.md,
// GEMV). Sums as in gemv4: a float32 partial per 16 codes scaled by the block's absmax, a warp tree, then the
// KS warps in a fixed order.
extern "C" __global__ void __launch_bounds__(32 * KS) gemv4_rows(
    const elem_t* __restrict__ x, const u8* __restrict__ q, const float* __restrict__ absmax,
    const float* __restrict__ u, const elem_t* __restrict__ lb, const elem_t* __restrict__ bias,
    elem_t* __restrict__ out, int N, int K) {
  const float lut_init[16] = LUT_INIT;
  __shared__ float lut[16];
  __shared__ float part[2][KS][RPW][M];            // two buffers: one barrier per row group
  if (threadIdx.x < 16) lut[threadIdx.x] = lut_init[threadIdx.x];
  __syncthreads();
  const char* lut_b = reinterpret_cast<const char*>(lut);
  const int lane = threadIdx.x & 31;
  const int wk = threadIdx.x >> 5;
  const int k0 = wk * 1024 + lane * 32;
  const bool active = k0 < K;                      // K is a multiple of 32: a lane's 32 codes are all in or out
  float xr[M][32];
#pragma unroll
  for (int i = 0; i < M; ++i) {
    if (active) {
      load16(x + (long long)i * K + k0, xr[i]);
      load16(x + (long long)i * K + k0 + 16, xr[i] + 16);
    } else {
#pragma unroll
      for (int j = 0; j < 32; ++j) xr[i][j] = 0.0f;
    }
  }
  const int groups = (N + RPW - 1) / RPW;
  int buf = 0;
  for (int grp = blockIdx.x; grp < groups; grp += gridDim.x, buf ^= 1) {
    const int n0 = grp * RPW;
    uint4 c[RPW];
    float a[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int n = min(n0 + r, N - 1);            // a missing last row repeats row N-1, never stored
      const long long e = (long long)n * K + (active ? k0 : 0);
      c[r] = __ldg(reinterpret_cast<const uint4*>(q + e / 2));
      a[r] = __ldg(absmax + e / BS);                 // 32 | BS: the lane's 32 codes share one block
    }
    float acc[RPW][M];
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
      for (int i = 0; i < M; ++i) acc[r][i] = 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        float w[16];
        decode16(lut_b, h ? c[r].z : c[r].x, h ? c[r].w : c[r].y, w);
#pragma unroll
        for (int i = 0; i < M; ++i) {
          float p = 0.0f;
#pragma unroll
          for (int j = 0; j < 16; ++j) p = fmaf(xr[i][16 * h + j], w[j], p);
          acc[r][i] = fmaf(p, a[r], acc[r][i]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
      for (int i = 0; i < M; ++i) {
        float v = active ? acc[r][i] : 0.0f;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) part[buf][wk][r][i] = v;
      }
    __syncthreads();
    if (threadIdx.x < RPW * M) {
      const int r = threadIdx.x / M, i = threadIdx.x % M, n = n0 + r;
      if (n < N) {
        float y = part[buf][0][r][i];
        for (int w2 = 1; w2 < KS; ++w2) y += part[buf][w2][r][i];   // fixed order: deterministic
        out[(long long)i * N + n] = from_f(add_lora_bias(y, u, lb, bias, i, n));
      }
    }
  }
}

// u[i, j] = s * sum_k x[i, k] A[j, k]: one warp per (i, j)
extern "C" __global__ void lora_down(const elem_t* __restrict__ x, const elem_t* __restrict__ A,
                                     float* __restrict__ u, int Mrows, int R, int K, float s) {
  const int lane = threadIdx.x & 31;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (warp >= Mrows * R) return;
  const int i = warp / R, j = warp % R;
  float acc = 0.0f;
  for (int k0 = lane * 16; k0 < K; k0 += 512) {
    float xv[16], av[16];
    load16(x + (long long)i * K + k0, xv);
    load16(A + (long long)j * K + k0, av);
#pragma unroll
    for (int t = 0; t < 16; ++t) acc = fmaf(xv[t], av[t], acc);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) u[i * R + j] = s * acc;
}
"""


def _gemv_kernel(dt: str, bs: int, qt: str, m: int, r_lora: int, has_bias: bool):
    rpw, steps, ks = GEMV_CONFIG[m]
    return D.compile_kernel(
        _GEMV_SRC,
        "gemv4",
        (
            ("DT", D.DT_CODE[dt]),
            ("BS", bs),
            ("M", m),
            ("RPW", rpw),
            ("U", steps),
            ("KS", ks),
            ("R_LORA", r_lora),
            ("HAS_BIAS", int(has_bias)),
            ("LUT_INIT", _nf4._lut_define(qt)),
        ),
    )


def _rows_kernel(dt: str, bs: int, qt: str, m: int, r_lora: int, has_bias: bool, ks: int):
    return D.compile_kernel(
        _GEMV_SRC,
        "gemv4_rows",
        (
            ("DT", D.DT_CODE[dt]),
            ("BS", bs),
            ("M", m),
            ("RPW", ROWS_RPW),
            ("U", 1),
            ("KS", ks),
            ("R_LORA", r_lora),
            ("HAS_BIAS", int(has_bias)),
            ("LUT_INIT", _nf4._lut_define(qt)),
        ),
    )


def _down_kernel(dt: str):
    return D.compile_kernel(
        _GEMV_SRC,
        "lora_down",
        (
            ("DT", D.DT_CODE[dt]),
            ("BS", 64),
            ("M", 1),
            ("RPW", 1),
            ("U", 1),
            ("KS", 1),
            ("R_LORA", 0),
            ("HAS_BIAS", 0),
            ("LUT_INIT", _nf4._lut_define("nf4")),
        ),
    )


def float_absmax(state: _nf4.GpuQuantState) -> Any:
    """The float32 per-block absmax of a state (rebuilt from the nested statistics when double-quantized)."""
    if not state.nested:
        return state.absmax
    cp = D._cp()
    dyn = _nf4._dynamic_map_device()
    codes = cp.asarray(state.absmax)
    a2 = cp.asarray(state.absmax2)
    off = cp.asarray(state.offset).reshape(())
    blocks = cp.arange(codes.size) // _nf4.NESTED_BLOCKSIZE
    # f32(f32(d[q] · a2) + offset): two separately rounded float32 operations, as bitsandbytes
    return (dyn[codes] * a2[blocks]).astype(cp.float32) + off


def gemv_4bit(
    x: Any,
    packed: Any,
    state: _nf4.GpuQuantState,
    *,
    A: Any = None,
    B: Any = None,
    scaling: float = 1.0,
    bias: Any = None,
    dtype: str | None = None,
) -> Any:
    """y = x · dequant(W)ᵀ (+ s·(x Aᵀ) Bᵀ) (+ bias) for x of shape (m, K), m = 1..16; W (N, K) 4-bit.

    ``A`` (r, K) and ``B`` (N, r) add the LoRA branch (QLoRA forward); all of x, A, B, bias share one
    dtype. K must be a multiple of 32.
    """
    xd = D.as_dev(x, "x", dtypes=("float32", "float16", "bfloat16"), dtype=dtype)
    if len(xd.shape) != 2:
        raise ValueError(f"x: expected shape (m, K), got {xd.shape}")
    m, K = xd.shape
    if not 1 <= m <= MAX_M:
        raise ValueError(f"x: expected 1 <= m <= {MAX_M} rows for the fused GEMV, got m = {m}")
    if not isinstance(state, _nf4.GpuQuantState):
        raise TypeError(f"state: expected a GpuQuantState, got {type(state).__name__}")
    if len(state.shape) != 2 or state.shape[1] != K:
        raise ValueError(f"state.shape: expected (N, {K}) to match x, got {state.shape}")
    if K % 32:
        raise ValueError(f"x: expected K to be a multiple of 32 for the fused GEMV, got K = {K}")
    N = state.shape[0]
    pd = D.as_dev(packed, "packed", dtypes=("uint8",))
    if pd.size != N * K // 2:
        raise ValueError(f"packed: expected {N * K // 2} bytes, got {pd.size}")
    amax = D.as_dev(float_absmax(state), "state.absmax", dtypes=("float32",))
    r_lora = 0
    u_ptr = lb_ptr = b_ptr = np.uint64(0)
    keep = []
    if (A is None) != (B is None):
        raise ValueError("A, B: expected both LoRA factors or neither")
    if A is not None:
        ad = D.as_dev(A, "A", dtypes=(xd.dtype,), dtype=dtype)
        bd = D.as_dev(B, "B", dtypes=(xd.dtype,), dtype=dtype)
        if len(ad.shape) != 2 or ad.shape[1] != K:
            raise ValueError(f"A: expected shape (r, {K}), got {ad.shape}")
        r_lora = ad.shape[0]
        if bd.shape != (N, r_lora):
            raise ValueError(f"B: expected shape ({N}, {r_lora}), got {bd.shape}")
        u = D.empty(xd, (m, r_lora), "float32")
        keep.append(u)
        with D.launch_stream(xd):
            _down_kernel(xd.dtype)(
                D.grid_for(m * r_lora * 32),
                (256,),
                (
                    D.ptr(xd.ptr),
                    D.ptr(ad.ptr),
                    D.ptr(u.ptr),
                    np.int32(m),
                    np.int32(r_lora),
                    np.int32(K),
                    np.float32(scaling),
                ),
            )
        u_ptr, lb_ptr = D.ptr(u.ptr), D.ptr(bd.ptr)
    if bias is not None:
        bb = D.as_dev(bias, "bias", dtypes=(xd.dtype,), dtype=dtype)
        if bb.shape != (N,):
            raise ValueError(f"bias: expected shape ({N},), got {bb.shape}")
        b_ptr = D.ptr(bb.ptr)
    out = D.empty(xd, (m, N), xd.dtype)
    args = (
        D.ptr(xd.ptr),
        D.ptr(pd.ptr),
        D.ptr(amax.ptr),
        u_ptr,
        lb_ptr,
        b_ptr,
        D.ptr(out.ptr),
        np.int32(N),
        np.int32(K),
    )
    if m <= ROWS_MAX_M and K <= 1024 * ROWS_MAX_WARPS:
        ks = -(-K // 1024)
        kern = _rows_kernel(xd.dtype, state.blocksize, state.quant_type, m, r_lora, bias is not None, ks)
        grid = min(-(-N // ROWS_RPW), ROWS_WAVES * D.resident_blocks(kern, 32 * ks))
        with D.launch_stream(xd):
            kern((grid,), (32 * ks,), args)
        return out.obj
    kern = _gemv_kernel(xd.dtype, state.blocksize, state.quant_type, m, r_lora, bias is not None)
    rpw, _, ks = GEMV_CONFIG[m]
    with D.launch_stream(xd):
        kern((-(-N // rpw),), (32 * ks,), args)
    return out.obj


def qlora_forward(
    x: Any,
    packed: Any,
    state: _nf4.GpuQuantState,
    A: Any,
    B: Any,
    scaling: float,
    *,
    bias: Any = None,
    dtype: str | None = None,
) -> Any:
    """QLoRA forward y = x · dequant(W)ᵀ + s·(x Aᵀ) Bᵀ + b: the fused GEMV for m ≤ 16, else
    dequantize once and run the LoRA GEMM path (``refimpl.kernels.cupy_gpu.lora_gemm.forward``)."""
    xd = D.as_dev(x, "x", dtypes=("float32", "float16", "bfloat16"), dtype=dtype)
    if len(xd.shape) == 2 and xd.shape[0] <= MAX_M and xd.shape[1] % 32 == 0:
        return gemv_4bit(x, packed, state, A=A, B=B, scaling=scaling, bias=bias, dtype=dtype)
    from refimpl.kernels.cupy_gpu import lora_gemm

    W = _nf4.dequantize_4bit(packed, state, out_dtype=xd.dtype)
    return lora_gemm.forward(x, W, A, B, scaling, bias=bias, dtype=dtype)
