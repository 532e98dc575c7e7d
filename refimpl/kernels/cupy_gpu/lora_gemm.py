"""LoRA and DoRA forward as one cuBLAS GEMM over K = d + r (+1 for a bias), through CuPy.

LoRA (Hu et al., arXiv 2106.09685, eq. 3):  y = x Wᵀ + s·(x Aᵀ) Bᵀ + b
                                             = [x | s·x Aᵀ | 1] · [W | B | b]ᵀ
DoRA eval form (Liu et al., arXiv 2402.09353, eq. 5):  y = f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b,
    f = m / ‖W + s·B A‖_row                     = [x | s·x Aᵀ | 1] · [f⊙W | f⊙B | b]ᵀ

The weight side [W | B | b] (DoRA: [f⊙W | f⊙B | b]) is packed once per weight version (``pack``);
the input side lives in a workspace of shape (m, K_pad) whose first d columns hold x
(``workspace``; a producer can write x there directly). A forward is then a skinny GEMM
u = s·x Aᵀ written into the workspace's next r columns, and one GEMM over K_pad. The extra work over
the base GEMM is (r + 1)/d of its FLOPs plus one read of x for u; ``chunks`` > 1 splits the rows so
that u of chunk c + 1 runs on a side stream while the main GEMM of chunk c runs.

Measured on the H200 (bf16, T = d = out = 4096, r = 16; bench/README.md, GPU section): the forward takes
1.079× the base GEMM (185.6 against 172.1 µs), the main GEMM over K_pad = 4160 alone 1.013× (one more
64-wide K step of cuBLAS's kernel), u 9.4 µs. Sequentially the floor is ≈ 1.059× (u cannot read x faster
than the copy bandwidth), and ``chunks`` > 1 is slower (2 chunks: 198.6 µs), since splitting the GEMM
costs more than the u it hides.

Rounding: u is rounded once to the input dtype; DoRA's f⊙W and f⊙B are rounded once to the input
dtype (exact product in float64, round-to-odd to float32, then to nearest-even); the GEMMs accumulate
in float32 (``CUBLAS_COMPUTE_32F``).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from refimpl.kernels.cupy_gpu import _device as D

_CUDA_DT = {"float32": 0, "float16": 2, "bfloat16": 14}
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1
_OP_N, _OP_T = 0, 1

_PACK_SRC = r"""
__device__ __forceinline__ elem_t round_once(double p) {
#if DT == 0
  return (float)p;
#else
  float t = __double2float_rz(p);                  // round to odd in float32, then to nearest even:
  if ((double)t != p) t = __uint_as_float(__float_as_uint(t) | 1u);   // one correct rounding overall
  return from_f(t);
#endif
}

// f[o] = m[o] / || W[o, :] + s * B[o, :] A ||_2, accumulated in float64; one block of 256 threads per row
extern "C" __global__ void dora_factor(const elem_t* __restrict__ W, const elem_t* __restrict__ A,
                                       const elem_t* __restrict__ B, const float* __restrict__ mag,
                                       float* __restrict__ f, double* __restrict__ norm, int d, int r, double s) {
  __shared__ double brow[256];
  __shared__ double red[8];
  const int o = blockIdx.x;
  // s·B exact in float64
  for (int j = threadIdx.x; j < r; j += blockDim.x) brow[j] = s * (double)to_f(B[(long long)o * r + j]);
  __syncthreads();
  double acc = 0.0;
  for (int k = threadIdx.x; k < d; k += blockDim.x) {
    double v = (double)to_f(W[(long long)o * d + k]);
    for (int j = 0; j < r; ++j) v += brow[j] * (double)to_f(A[(long long)j * d + k]);
    acc += v * v;
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += red[w];
    double nrm = sqrt(t);
    norm[o] = nrm;
    f[o] = (float)((double)mag[o] / nrm);
  }
}

// packed[o, :] = [f⊙W[o] | f⊙B[o] | bias[o] | 0 ...] (f = 1 without DoRA)
extern "C" __global__ void pack_weight(const elem_t* __restrict__ W, const elem_t* __restrict__ B,
                                       const elem_t* __restrict__ bias, const float* __restrict__ f,
                                       elem_t* __restrict__ out, int d, int r, int kp, int has_bias) {
  const int o = blockIdx.y;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= kp) return;
  double fo = f ? (double)f[o] : 1.0;
  elem_t v;
  if (c < d) v = f ? round_once(fo * (double)to_f(W[(long long)o * d + c])) : W[(long long)o * d + c];
  else if (c < d + r) {
    const elem_t b = B[(long long)o * r + (c - d)];
    v = f ? round_once(fo * (double)to_f(b)) : b;
  }
  else if (c == d + r && has_bias) v = bias[o];
  else v = from_f(0.0f);
  out[(long long)o * kp + c] = v;
}

extern "C" __global__ void fill_ones(elem_t* __restrict__ xbuf, long long m, int kp, int col) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < m) xbuf[i * kp + col] = from_f(1.0f);
}
"""


def _kernel(name: str, dt: str):
    return D.compile_kernel(_PACK_SRC, name, (("DT", D.DT_CODE[dt]),))


@dataclass(frozen=True)
class PackedLinear:
    """Weight side of the one-GEMM forward: ``weight`` (out, k_pad) = [W | B | b | 0] or DoRA's
    [f⊙W | f⊙B | b | 0]; ``A`` (r, d); ``factor`` the DoRA f (float32, out) or None."""

    weight: Any
    A: Any
    scaling: float
    d: int
    r: int
    k_pad: int
    out_features: int
    has_bias: bool
    dtype: str
    factor: Any = None


#: the packed K is rounded up to a multiple of this: 64, cuBLAS's K tile on the H200 (K = 4112 ran 4 % slower
#: than K = 4096; K = 4160 only 2 %, bench/results/gpu-h200-bench.json)
K_ALIGN = 64


def _k_pad(d: int, r: int, has_bias: bool) -> int:
    k = d + r + (1 if has_bias else 0)
    return -(-k // K_ALIGN) * K_ALIGN


def pack(
    W: Any, A: Any, B: Any, scaling: float, *, bias: Any = None, magnitude: Any = None, dtype: str | None = None
) -> PackedLinear:
    """Pack the weight side once per weight version (LoRA, or DoRA when ``magnitude`` is given)."""
    wd = D.as_dev(W, "W", dtypes=("float32", "float16", "bfloat16"), dtype=dtype)
    if len(wd.shape) != 2:
        raise ValueError(f"W: expected shape (out, in), got {wd.shape}")
    out_f, d = wd.shape
    ad = D.as_dev(A, "A", dtypes=(wd.dtype,), dtype=dtype)
    if len(ad.shape) != 2 or ad.shape[1] != d:
        raise ValueError(f"A: expected shape (r, {d}), got {ad.shape}")
    r = ad.shape[0]
    if not 1 <= r <= 256:
        raise ValueError(f"A: expected a rank r in 1..256, got r = {r}")
    bd = D.as_dev(B, "B", dtypes=(wd.dtype,), dtype=dtype)
    if bd.shape != (out_f, r):
        raise ValueError(f"B: expected shape ({out_f}, {r}), got {bd.shape}")
    if (
        isinstance(scaling, bool)
        or not isinstance(scaling, (int, float, np.floating, np.integer))
        or not np.isfinite(scaling)
    ):
        raise TypeError(f"scaling: expected a finite real number, got {scaling!r}")
    has_bias = bias is not None
    b_ptr = np.uint64(0)
    if has_bias:
        bb = D.as_dev(bias, "bias", dtypes=(wd.dtype,), dtype=dtype)
        if bb.shape != (out_f,):
            raise ValueError(f"bias: expected shape ({out_f},), got {bb.shape}")
        b_ptr = D.ptr(bb.ptr)
    kp = _k_pad(d, r, has_bias)
    packed = D.empty(wd, (out_f, kp), wd.dtype)
    f_ptr = np.uint64(0)
    factor = None
    with D.launch_stream(wd):
        if magnitude is not None:
            md = D.as_dev(magnitude, "magnitude", dtypes=("float32",))
            if md.shape != (out_f,):
                raise ValueError(f"magnitude: expected float32 of shape ({out_f},), got {md.shape}")
            fac = D.empty(wd, (out_f,), "float32")
            cp = D._cp()
            norm = cp.empty((out_f,), dtype=np.float64)
            _kernel("dora_factor", wd.dtype)(
                (out_f,),
                (256,),
                (
                    D.ptr(wd.ptr),
                    D.ptr(ad.ptr),
                    D.ptr(bd.ptr),
                    D.ptr(md.ptr),
                    D.ptr(fac.ptr),
                    D.ptr(norm.data.ptr),
                    np.int32(d),
                    np.int32(r),
                    np.float64(scaling),
                ),
            )
            if bool((norm == 0).any()):
                raise ValueError("W + s·B·A: a row has zero norm, so the DoRA factor m / ‖·‖ is undefined")
            f_ptr = D.ptr(fac.ptr)
            factor = fac.obj
        _kernel("pack_weight", wd.dtype)(
            (-(-kp // 256), out_f),
            (256,),
            (
                D.ptr(wd.ptr),
                D.ptr(bd.ptr),
                b_ptr,
                f_ptr,
                D.ptr(packed.ptr),
                np.int32(d),
                np.int32(r),
                np.int32(kp),
                np.int32(int(has_bias)),
            ),
        )
    return PackedLinear(packed.obj, A, float(scaling), d, r, kp, out_f, has_bias, wd.dtype, factor)


def workspace(packed: PackedLinear, m: int) -> Any:
    """Input buffer (m, k_pad) of the packed layer's dtype, zero except the ones column of the bias;
    write x into its first d columns (``buf[:, :d]``)."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"m: expected a positive row count, got {m!r}")
    like = D.as_dev(packed.weight, "packed.weight", dtypes=(packed.dtype,), dtype=packed.dtype)
    buf = D.empty(like, (int(m), packed.k_pad), packed.dtype)
    if buf.framework == "torch":
        buf.obj.zero_()
    else:
        buf.obj.fill(0)
    if packed.has_bias:
        with D.launch_stream(buf):
            _kernel("fill_ones", packed.dtype)(
                D.grid_for(m),
                (256,),
                (D.ptr(buf.ptr), np.int64(m), np.int32(packed.k_pad), np.int32(packed.d + packed.r)),
            )
    return buf.obj


def _handle():
    return D._cp().cuda.device.get_cublas_handle()


@functools.cache
def _side(device_id: int):
    """A second stream and cuBLAS handle (its own workspace) for the u = s·x Aᵀ GEMMs."""
    cp = D._cp()
    from cupy_backends.cuda.libs import cublas

    with cp.cuda.Device(device_id):
        return cp.cuda.Stream(non_blocking=True), cublas.create()


def gemm_rowmajor(
    handle: int,
    m: int,
    n: int,
    k: int,
    alpha: float,
    a_ptr: int,
    lda: int,
    b_ptr: int,
    ldb: int,
    beta: float,
    c_ptr: int,
    ldc: int,
    dtype: str,
    c_dtype: str | None = None,
) -> None:
    """C (m, n, row stride ldc) = alpha · A (m, k, row stride lda) · B(n, k, row stride ldb)ᵀ + beta · C.

    Row-major C = A Bᵀ is column-major Cᵀ = B Aᵀ: cuBLAS gets (op(B) = T over ldb, op(A) = N over lda).
    """
    from cupy_backends.cuda.libs import cublas

    al = np.array([alpha], dtype=np.float32)
    be = np.array([beta], dtype=np.float32)
    cublas.gemmEx(
        handle,
        _OP_T,
        _OP_N,
        n,
        m,
        k,
        al.ctypes.data,
        b_ptr,
        _CUDA_DT[dtype],
        ldb,
        a_ptr,
        _CUDA_DT[dtype],
        lda,
        be.ctypes.data,
        c_ptr,
        _CUDA_DT[c_dtype or dtype],
        ldc,
        _COMPUTE_32F,
        _GEMM_DEFAULT,
    )


def forward_packed(packed: PackedLinear, xbuf: Any, *, chunks: int = 1, out: Any = None) -> Any:
    """y (m, out) = xbuf · packed.weightᵀ after writing u = s·x Aᵀ into xbuf[:, d:d+r]."""
    if not isinstance(packed, PackedLinear):
        raise TypeError(f"packed: expected a PackedLinear, got {type(packed).__name__}")
    xd = D.as_dev(xbuf, "xbuf", dtypes=(packed.dtype,), dtype=packed.dtype)
    if len(xd.shape) != 2 or xd.shape[1] != packed.k_pad:
        raise ValueError(f"xbuf: expected shape (m, {packed.k_pad}) from workspace(), got {xd.shape}")
    if isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1:
        raise ValueError(f"chunks: expected a positive integer, got {chunks!r}")
    m = xd.shape[0]
    it = D.ITEMSIZE[packed.dtype]
    wd = D.as_dev(packed.weight, "packed.weight", dtypes=(packed.dtype,), dtype=packed.dtype)
    ad = D.as_dev(packed.A, "packed.A", dtypes=(packed.dtype,), dtype=packed.dtype)
    if out is None:
        yd = D.empty(xd, (m, packed.out_features), packed.dtype)
    else:
        yd = D.as_dev(out, "out", dtypes=(packed.dtype,), dtype=packed.dtype)
        if yd.shape != (m, packed.out_features):
            raise ValueError(f"out: expected shape ({m}, {packed.out_features}), got {yd.shape}")
    main = D.launch_stream(xd)
    kp, d, r, n_out = packed.k_pad, packed.d, packed.r, packed.out_features
    bounds = np.linspace(0, m, min(int(chunks), m) + 1).astype(int)
    if len(bounds) == 2:
        with main:
            h = _handle()
            gemm_rowmajor(h, m, r, d, packed.scaling, xd.ptr, kp, ad.ptr, d, 0.0, xd.ptr + d * it, kp, packed.dtype)
            gemm_rowmajor(h, m, n_out, kp, 1.0, xd.ptr, kp, wd.ptr, kp, 0.0, yd.ptr, n_out, packed.dtype)
        return yd.obj
    cp = D._cp()
    side, side_handle = _side(cp.cuda.Device().id)
    side.wait_event(main.record())
    for lo, hi in itertools.pairwise(bounds):
        rows = int(hi - lo)
        if rows == 0:
            continue
        x_lo = xd.ptr + int(lo) * kp * it
        with side:
            gemm_rowmajor(
                side_handle, rows, r, d, packed.scaling, x_lo, kp, ad.ptr, d, 0.0, x_lo + d * it, kp, packed.dtype
            )
            ev = side.record()
        main.wait_event(ev)
        with main:
            gemm_rowmajor(
                _handle(),
                rows,
                n_out,
                kp,
                1.0,
                x_lo,
                kp,
                wd.ptr,
                kp,
                0.0,
                yd.ptr + int(lo) * n_out * it,
                n_out,
                packed.dtype,
            )
    return yd.obj


def _fill_input(buf: Any, x: Any, d: int) -> None:
    if type(buf).__module__.startswith("torch"):
        buf[:, :d].copy_(x)
    else:
        buf[:, :d] = x


def forward(
    x: Any, W: Any, A: Any, B: Any, scaling: float, *, bias: Any = None, dtype: str | None = None, chunks: int = 1
) -> Any:
    """LoRA forward y = x Wᵀ + s·(x Aᵀ) Bᵀ + b for x (m, d): packs, copies x into a workspace, runs."""
    xd = D.as_dev(x, "x", dtypes=("float32", "float16", "bfloat16"), dtype=dtype)
    if len(xd.shape) != 2:
        raise ValueError(f"x: expected shape (m, in), got {xd.shape}")
    p = pack(W, A, B, scaling, bias=bias, dtype=dtype)
    if xd.shape[1] != p.d or xd.dtype != p.dtype:
        raise ValueError(f"x: expected shape (m, {p.d}) of dtype {p.dtype}, got {xd.shape} {xd.dtype}")
    buf = workspace(p, xd.shape[0])
    _fill_input(buf, x, p.d)
    return forward_packed(p, buf, chunks=chunks)


def dora_forward(
    x: Any,
    W: Any,
    A: Any,
    B: Any,
    magnitude: Any,
    scaling: float,
    *,
    bias: Any = None,
    dtype: str | None = None,
    chunks: int = 1,
) -> Any:
    """DoRA eval forward y = f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b, f = m / ‖W + s·B A‖_row (float32 m)."""
    xd = D.as_dev(x, "x", dtypes=("float32", "float16", "bfloat16"), dtype=dtype)
    if len(xd.shape) != 2:
        raise ValueError(f"x: expected shape (m, in), got {xd.shape}")
    p = pack(W, A, B, scaling, bias=bias, magnitude=magnitude, dtype=dtype)
    if xd.shape[1] != p.d or xd.dtype != p.dtype:
        raise ValueError(f"x: expected shape (m, {p.d}) of dtype {p.dtype}, got {xd.shape} {xd.dtype}")
    buf = workspace(p, xd.shape[0])
    _fill_input(buf, x, p.d)
    return forward_packed(p, buf, chunks=chunks)
