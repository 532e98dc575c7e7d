"""NF4/FP4 blockwise 4-bit quantization on the GPU, byte-compatible with bitsandbytes' CUDA kernels.

QLoRA (Dettmers et al., arXiv 2305.14314, §3): for block b of ``blocksize`` consecutive elements of the
flattened input, absmax_b = max |x|, s = x · (1 / absmax_b), nibble = the code whose float32 midpoint
interval holds s (ties to the lower code), two nibbles a byte, the first element in the high nibble.

The kernels reproduce bitsandbytes 0.50.2's CUDA rules (``csrc/kernels.cu`` kQuantizeBlockwise, spec/nf4.md):
absmax by ``fmaxf`` from −FLT_MAX (NaN ignored), the reciprocal ``rcp.approx.ftz.f32`` (bitsandbytes is
built with ``--use_fast_math``), NF4 by comparisons ``s > t`` against the float32 midpoints, FP4 by the
CUDA literals on |s| with the sign from ``s < 0``. On finite data this is the ``bitsandbytes-cuda``
profile of ``refimpl.quant``; NF4 bytes equal the CPU reference except within ~1 ulp of a threshold.

Double quantization (QLoRA §3, "Double Quantization"): absmax − offset, blockwise 8-bit with the dynamic
map, blocksize 256, codes by bitsandbytes' CUDA binary search (``dQuantize<0>``); dequantized absmax =
f32(f32(d[q] · a2) + offset), products and sums never fused.

Quantization: each thread handles 8 consecutive elements (one 16-byte load for 16-bit inputs) of
QUANT_SLOTS blocks; a 4-bit block is handled by min(blocksize/8, 32) lanes of one warp that reduce absmax
with shuffles; the code is one shared-memory lookup keyed by the high bits of s and one comparison
(``code_cells``: the threshold count as 15 comparisons made the kernel issue-bound at 39 % of the copy
bandwidth on the H200). The grid is a few blocks per SM that loop over the input.
Dequantization: each thread writes 8 consecutive outputs (one 16-byte store) of DEQUANT_SLOTS groups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from refimpl.kernels.cupy_gpu import _device as D
from refimpl.kernels.cupy_gpu import code_cells
from refimpl.quant import codebooks as cb
from refimpl.quant.operands import BLOCKSIZES, NESTED_BLOCKSIZE

__all__ = [
    "BLOCKSIZES",
    "DEQUANT_SLOTS",
    "NESTED_BLOCKSIZE",
    "QUANT_SLOTS",
    "QUANT_TYPES",
    "GpuQuantState",
    "dequantize_4bit",
    "quantize_4bit",
    "quantize_absmax",
]

QUANT_TYPES = cb.QUANT_TYPES
_QT = {"nf4": 0, "fp4": 1}
#: quant blocks per thread (blocksize ≤ 256) and 16-element groups per thread in dequantization:
#: independent loads in flight per thread, the lever for bandwidth (PERFORMANCE.md)
QUANT_SLOTS = 1
DEQUANT_SLOTS = 2
#: the quantize grid is QUANT_WAVES × the blocks of 256 threads resident at once, each copying the 8 KB code
#: table once and looping over the input; QUANT_MIN_BLOCKS is the kernel's __launch_bounds__ minimum of
#: resident blocks per SM. H200, 2^28 bf16 elements, one quant block a thread (bench/gpu_bench.py, one run):
#: 1 wave 296 µs, 2 waves 277, 4 waves 269; prefetching the next block's load in registers instead: 336 µs
#: (more registers, fewer resident warps)
QUANT_MIN_BLOCKS = 1
QUANT_WAVES = 4


def _code_table(quant_type: str) -> list[str]:
    """Dequantization table in nibble order as CUDA literals; FP4 nibble 8 is −0.0 as in CUDA."""
    words = list(cb.NF4_HEX if quant_type == "nf4" else cb.FP4_HEX)
    if quant_type == "fp4":
        words[8] = "80000000"
    return [D.hex_literal(w) for w in words]


_QUANT_SRC = (
    f"#define CELL_SHIFT {32 - code_cells.CELL_BITS}\n#define CELLS {1 << code_cells.CELL_BITS}\n"
    + r"""
__device__ __forceinline__ u32 code4(const u32* __restrict__ cells, float s) {
  // one lookup keyed by the high bits of s (code_cells.py): e = thr << 11 | hi << 4 | lo
  u32 k = __float_as_uint(s);
#if QT == 0
  k ^= ((u32)((int)k >> 31) >> 1) ^ 0x80000000u;   // NF4 orders by s: flip the magnitude bits of negatives
#endif
  const u32 e = cells[k >> CELL_SHIFT];
  return (e >> (((k << (32 - CELL_SHIFT)) > e) ? 4u : 0u)) & 15u;
}
__device__ __forceinline__ float rcp_approx(float a) {
  float r; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a)); return r;
}
__device__ __forceinline__ float mul_ftz(float a, float b) {
  float r; asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
}

#define GROUP ((BS / 8) < 32 ? (BS / 8) : 32)
#define CH (BS / (8 * GROUP))
// quant blocks per thread: U slots at a stride of one grid, every load issued before the first use
#define U (CH == 1 ? QU : 1)

__device__ __forceinline__ void store_codes(const u32* __restrict__ cells, u8* __restrict__ out, long long e,
                                            long long nbytes, const float* v, float r) {
  u32 word = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    u32 byte = (code4(cells, mul_ftz(v[2 * k], r)) << 4) | code4(cells, mul_ftz(v[2 * k + 1], r));
    word |= byte << (8 * k);
  }
  long long ob = e / 2;
  if (ob + 4 <= nbytes) {
    *reinterpret_cast<u32*>(out + ob) = word;
  } else {
    for (int k = 0; k < 4; ++k) if (ob + k < nbytes) out[ob + k] = (u8)(word >> (8 * k));
  }
}

extern "C" __global__ void __launch_bounds__(256, QMINB) quantize4(const elem_t* __restrict__ x, u8* __restrict__ out,
                                     float* __restrict__ absmax, const u32* __restrict__ cells_g, long long n,
                                     long long nblocks) {
  // a grid of a few blocks per SM loops over the input, so the code table is copied to shared memory once
  __shared__ u32 cells[CELLS];
  for (int i = threadIdx.x; i < CELLS; i += blockDim.x) cells[i] = cells_g[i];
  __syncthreads();
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x / GROUP;   // quant blocks per grid layer
  const int g = (int)(tid % GROUP);
  const u32 lane = threadIdx.x & 31u;
  const u32 gmask = (GROUP == 32) ? 0xffffffffu : (((1u << GROUP) - 1u) << (lane & ~(u32)(GROUP - 1)));
  const long long nbytes = (n + 1) / 2;
  for (long long qb0 = tid / GROUP; qb0 < nblocks; qb0 += U * stride) {   // a group's lanes loop together
    float v[U][8];
    float m[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      long long qb = qb0 + u * stride;
      m[u] = -FLT_MAX_;
      if (qb < nblocks) {
#pragma unroll
        for (int c = 0; c < CH; ++c) {
          load8(x, qb * BS + (long long)(c * GROUP + g) * 8, n, v[u]);
#pragma unroll
          for (int j = 0; j < 8; ++j) m[u] = fmaxf(m[u], fabsf(v[u][j]));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      long long qb = qb0 + u * stride;
      if (qb >= nblocks) break;                  // a whole group leaves together (GROUP divides 32)
      float mu = m[u];
#pragma unroll
      for (int off = GROUP / 2; off > 0; off >>= 1) mu = fmaxf(mu, __shfl_xor_sync(gmask, mu, off));
      if (g == 0) absmax[qb] = mu;
      float r = rcp_approx(mu);
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        long long e = qb * BS + (long long)(c * GROUP + g) * 8;
        if (CH > 1) load8(x, e, n, v[u]);        // reload (L1/L2) rather than hold bs/32 values per lane
        store_codes(cells, out, e, nbytes, v[u], r);
      }
    }
  }
}

// 8-bit blockwise quantization of (absmax - offset) with the dynamic map (bitsandbytes dQuantize<0>)
__device__ __forceinline__ u32 dyn8_code(const float* smem_code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = smem_code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) { lower_pivot = pivot; lower = val; pivot += i; }
    else { upper_pivot = pivot; upper = val; pivot -= i; }
    val = smem_code[pivot];
  }
  if (upper_pivot == 255) upper = smem_code[upper_pivot];
  if (lower_pivot == 0) lower = smem_code[lower_pivot];
  if (x > val) {
    float mid = __fmul_rn(__fadd_rn(upper, val), 0.5f);
    return x > mid ? upper_pivot : pivot;
  } else {
    float mid = __fmul_rn(__fadd_rn(lower, val), 0.5f);
    return x < mid ? lower_pivot : pivot;
  }
}

extern "C" __global__ void quantize_absmax8(const float* __restrict__ absmax, const float* __restrict__ offset,
                                            const float* __restrict__ dyn, u8* __restrict__ codes,
                                            float* __restrict__ absmax2, long long nb) {
  // one thread block of 256 threads per nested block of 256 absmax values
  __shared__ float smem_code[256];
  __shared__ float red[8];
  smem_code[threadIdx.x] = dyn[threadIdx.x];
  long long i = (long long)blockIdx.x * 256 + threadIdx.x;
  float c = (i < nb) ? __fsub_rn(absmax[i], offset[0]) : 0.0f;
  float m = fabsf(c);
  if (i >= nb) m = -FLT_MAX_;
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  m = red[0];
  for (int w = 1; w < 8; ++w) m = fmaxf(m, red[w]);
  if (threadIdx.x == 0) absmax2[blockIdx.x] = m;
  float r = rcp_approx(m);
  if (i < nb) codes[i] = (u8)dyn8_code(smem_code, mul_ftz(c, r));
}
"""
)

_DEQUANT_SRC = r"""
__device__ __forceinline__ float block_scale(const void* __restrict__ absmax, const float* __restrict__ absmax2,
                                             const float* __restrict__ dyn, float offset, long long b) {
#if NESTED
  // as bitsandbytes: d · a2 in a fast-math kernel (subnormals flushed), then torch's add of the offset, which
  // keeps subnormals: a plain add.rn.f32 (no .ftz) in PTX
  float p = __fmul_rn(__ldg(dyn + __ldg(reinterpret_cast<const u8*>(absmax) + b)), __ldg(absmax2 + b / 256));
  float a;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(a) : "f"(p), "f"(offset));
  return a;
#else
  return __ldg(reinterpret_cast<const float*>(absmax) + b);
#endif
}

extern "C" __global__ void dequantize4(const u8* __restrict__ q, const void* __restrict__ absmax,
                                       const float* __restrict__ absmax2, const float* __restrict__ dyn,
                                       const float* __restrict__ offset_p, elem_t* __restrict__ out,
                                       long long n) {
  // a thread owns groups of 8 elements (4 code bytes in, one 16-byte store out for 16-bit types), DU groups
  // a grid apart, so a warp's loads and stores are each one contiguous run
  const float lut_init[16] = LUT_INIT;
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = lut_init[threadIdx.x];
  __syncthreads();
  const float offset = NESTED ? offset_p[0] : 0.0f;
  const long long stride = (long long)gridDim.x * blockDim.x * 8;
  const long long e0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  const long long nbytes = (n + 1) / 2;
  u32 w[DU];
  float a[DU];
#pragma unroll
  for (int u = 0; u < DU; ++u) {                  // all loads of DU groups first
    long long e = e0 + u * stride;
    w[u] = 0;
    a[u] = 0.0f;
    if (e < n) {
      a[u] = block_scale(absmax, absmax2, dyn, offset, e / BS);   // 8 | BS: one block per group
      if (e / 2 + 4 <= nbytes) {
        w[u] = __ldg(reinterpret_cast<const u32*>(q + e / 2));
      } else {
        for (int k = 0; k < 4; ++k) if (e / 2 + k < nbytes) w[u] |= (u32)q[e / 2 + k] << (8 * k);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < DU; ++u) {
    long long e = e0 + u * stride;
    if (e >= n) break;
    float v[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      u32 byte = (w[u] >> (8 * k)) & 0xffu;
      v[2 * k] = __fmul_rn(lut[byte >> 4], a[u]);
      v[2 * k + 1] = __fmul_rn(lut[byte & 15u], a[u]);
    }
    store8(out, e, n, v);
  }
}
"""


def _lut_define(quant_type: str) -> str:
    return "{" + ",".join(_code_table(quant_type)) + "}"


@dataclass(frozen=True)
class GpuQuantState:
    """Device-side 4-bit state, the fields of bitsandbytes' ``QuantState``.

    Without double quantization ``absmax`` is float32 (one per block); with it ``absmax`` holds the
    uint8 codes and ``absmax2`` (float32, one per 256 blocks) and ``offset`` (float32, shape (1,)) the
    nested statistics.
    """

    absmax: Any
    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    quant_type: str
    absmax2: Any = None
    offset: Any = None

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


def _check_common(blocksize: Any, quant_type: Any) -> tuple[int, str]:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or int(blocksize) not in BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {BLOCKSIZES}, got {blocksize!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}")
    return int(blocksize), str(quant_type)


def _quant_kernel(dt: str, bs: int, qt: str):
    return D.compile_kernel(
        _QUANT_SRC,
        "quantize4",
        (
            ("DT", D.DT_CODE[dt]),
            ("BS", bs),
            ("QT", _QT[qt]),
            ("QU", QUANT_SLOTS),
            ("QMINB", QUANT_MIN_BLOCKS),
        ),
        ("--use_fast_math",),
    )


def _absmax8_kernel():
    return D.compile_kernel(
        _QUANT_SRC,
        "quantize_absmax8",
        (("DT", 0), ("BS", 64), ("QT", 0), ("QU", 1), ("QMINB", 1)),
        ("--use_fast_math",),
    )


def _dequant_kernel(dt: str, bs: int, qt: str, nested: bool):
    return D.compile_kernel(
        _DEQUANT_SRC,
        "dequantize4",
        (
            ("DT", D.DT_CODE[dt]),
            ("BS", bs),
            ("NESTED", int(nested)),
            ("DU", DEQUANT_SLOTS),
            ("LUT_INIT", _lut_define(qt)),
        ),
        ("--use_fast_math",),
    )


@functools.cache
def _cells_device_cached(quant_type: str, device_id: int) -> Any:
    return D._cp().asarray(code_cells.cell_table(quant_type))


def _cells_device(quant_type: str) -> Any:
    """The code table of ``code_cells`` on the current device (built and copied once per device)."""
    return _cells_device_cached(quant_type, D._cp().cuda.Device().id)


def _dynamic_map_device():
    cp = D._cp()
    return cp.asarray(cb.from_hex(cb.DYNAMIC8_HEX).astype(np.float32))


def quantize_4bit(
    x: Any,
    blocksize: int = 64,
    quant_type: str = "nf4",
    *,
    double_quant: bool = False,
    offset: Any = None,
    dtype: str | None = None,
) -> tuple[Any, GpuQuantState]:
    """Blockwise 4-bit quantization on the GPU: (packed uint8 of shape ((n+1)//2, 1), state).

    ``x``: CuPy array or torch CUDA tensor, float32/float16/bfloat16 (bfloat16 in CuPy: uint16 bits with
    ``dtype="bfloat16"``). ``double_quant`` quantizes absmax as in QLoRA; ``offset`` (a float32 device
    scalar) replaces the mean of absmax, e.g. to take bitsandbytes' own offset when comparing bytes.
    """
    bs, qt = _check_common(blocksize, quant_type)
    xd = D.as_dev(x, "x", dtypes=("float32", "float16", "bfloat16"), dtype=dtype)
    n = xd.size
    if n == 0:
        raise ValueError("x: expected a non-empty array, got 0 elements")
    nblocks = -(-n // bs)
    packed = D.empty(xd, ((n + 1) // 2, 1), "uint8")
    absmax = D.empty(xd, (nblocks,), "float32")
    group = min(bs // 8, 32)
    slots = QUANT_SLOTS if bs <= 256 else 1
    kern = _quant_kernel(xd.dtype, bs, qt)
    cells = _cells_device(qt)
    threads = -(-nblocks // slots) * group
    args = (D.ptr(xd.ptr), D.ptr(packed.ptr), D.ptr(absmax.ptr), D.ptr(cells.data.ptr), np.int64(n), np.int64(nblocks))
    with D.launch_stream(xd):
        kern((min(D.grid_for(threads)[0], QUANT_WAVES * D.resident_blocks(kern, 256)),), (256,), args)
    if not double_quant:
        return packed.obj, GpuQuantState(absmax.obj, xd.shape, xd.dtype, bs, qt)
    codes, absmax2, off = quantize_absmax(absmax.obj, offset=offset)
    return packed.obj, GpuQuantState(codes, xd.shape, xd.dtype, bs, qt, absmax2, off)


def quantize_absmax(absmax: Any, *, offset: Any = None) -> tuple[Any, Any, Any]:
    """Double quantization of a float32 absmax vector: (uint8 codes, float32 absmax2, float32 offset).

    offset = mean(absmax) unless given (a float32 device array of one element); codes from the
    bitsandbytes CUDA binary search over the 256-entry dynamic map, blocks of 256.
    """
    ad = D.as_dev(absmax, "absmax", dtypes=("float32",))
    nb = ad.size
    if nb == 0:
        raise ValueError("absmax: expected a non-empty array, got 0 elements")
    if offset is None:
        off = ad.obj.mean(dtype=ad.obj.dtype).reshape(1)
    else:
        off = offset.reshape(1)
    od = D.as_dev(off, "offset", dtypes=("float32",))
    if od.size != 1:
        raise ValueError(f"offset: expected one float32 value, got shape {od.shape}")
    codes = D.empty(ad, (nb,), "uint8")
    absmax2 = D.empty(ad, (-(-nb // NESTED_BLOCKSIZE),), "float32")
    dyn = _dynamic_map_device()
    with D.launch_stream(ad):
        _absmax8_kernel()(
            (absmax2.size,),
            (256,),
            (D.ptr(ad.ptr), D.ptr(od.ptr), D.ptr(dyn.data.ptr), D.ptr(codes.ptr), D.ptr(absmax2.ptr), np.int64(nb)),
        )
    return codes.obj, absmax2.obj, off


def dequantize_4bit(packed: Any, state: GpuQuantState, *, out_dtype: str | None = None) -> Any:
    """out = dtype(f32(code[nibble] · absmax_block)), shape ``state.shape``; nested absmax rebuilt on the fly."""
    pd = D.as_dev(packed, "packed", dtypes=("uint8",))
    if not isinstance(state, GpuQuantState):
        raise TypeError(f"state: expected a GpuQuantState, got {type(state).__name__}")
    bs, qt = _check_common(state.blocksize, state.quant_type)
    n = int(np.prod(state.shape, dtype=np.int64))
    if pd.size != (n + 1) // 2:
        raise ValueError(f"packed: expected {(n + 1) // 2} bytes for shape {state.shape}, got {pd.size}")
    dt = out_dtype or state.dtype
    if dt not in D.DT_CODE:
        raise ValueError(f"out_dtype: expected one of {tuple(D.DT_CODE)}, got {dt!r}")
    nblocks = -(-n // bs)
    cp = D._cp()
    if state.nested:
        ad = D.as_dev(state.absmax, "state.absmax", dtypes=("uint8",))
        a2 = D.as_dev(state.absmax2, "state.absmax2", dtypes=("float32",))
        od = D.as_dev(state.offset.reshape(1), "state.offset", dtypes=("float32",))
        dyn = _dynamic_map_device()
        args_extra = (D.ptr(a2.ptr), D.ptr(dyn.data.ptr), D.ptr(od.ptr))
    else:
        ad = D.as_dev(state.absmax, "state.absmax", dtypes=("float32",))
        args_extra = (np.uint64(0), np.uint64(0), np.uint64(0))
    if ad.size != nblocks:
        raise ValueError(f"state.absmax: expected {nblocks} values for {n} elements at blocksize {bs}, got {ad.size}")
    out = D.empty(pd, tuple(state.shape), dt)
    kern = _dequant_kernel(dt, bs, qt, state.nested)
    with D.launch_stream(pd):
        kern(
            D.grid_for(-(-n // (8 * DEQUANT_SLOTS))),
            (256,),
            (D.ptr(pd.ptr), D.ptr(ad.ptr), *args_extra, D.ptr(out.ptr), np.int64(n)),
        )
    del cp
    return out.obj
