"""Device plumbing shared by the CuPy kernels: array interop, dtypes, compilation.

Arrays may be CuPy arrays or torch CUDA tensors; bfloat16 data in CuPy (which has
no bfloat16 dtype) is carried as uint16 bit patterns with ``dtype="bfloat16"``
given explicitly. Results come back in the framework of the first array argument.
Kernels take raw device pointers, so no CUDA header is needed at compile time:
fp16/bf16 conversions are single PTX ``cvt`` instructions (round to nearest even).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Element-type codes used in the kernel sources (macro DT).
DT_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _cp():
    import cupy as cp

    return cp


def f32_literal(value: float) -> str:
    """A C++17 hexadecimal float literal denoting exactly the float32 value (no decimal rounding)."""
    v = float(np.float32(value))
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"value: expected a finite float32, got {value!r}")
    return f"({v.hex()}f)"


def hex_literal(word: str) -> str:
    """The float32 with bit pattern ``word`` (8 hex digits) as an exact CUDA literal."""
    return f32_literal(struct.unpack("<f", struct.pack("<I", int(word, 16)))[0])


@dataclass(frozen=True)
class Dev:
    """A device array seen as pointer, shape, element type name, and its framework."""

    obj: Any
    ptr: int
    shape: tuple[int, ...]
    dtype: str
    framework: str  # "cupy" or "torch"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


_TORCH_NAMES = {
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.uint8": "uint8",
    "torch.int32": "int32",
    "torch.int64": "int64",
}


def as_dev(x: Any, name: str, *, dtypes: tuple[str, ...], dtype: str | None = None) -> Dev:
    """Validate a C-contiguous device array and describe it.

    ``dtype`` overrides the element type for a CuPy uint16 array holding bfloat16 bits.
    """
    mod = type(x).__module__
    if mod.startswith("torch"):
        if not getattr(x, "is_cuda", False):
            raise TypeError(f"{name}: expected a CUDA tensor or a CuPy array, got a torch tensor on {x.device}")
        if not x.is_contiguous():
            raise ValueError(f"{name}: expected a C-contiguous array, got strides {tuple(x.stride())}")
        dt = _TORCH_NAMES.get(str(x.dtype), str(x.dtype))
        if dtype is not None and dtype != dt:
            raise TypeError(f"{name}: dtype={dtype!r} given for a torch tensor of dtype {dt}")
        dev = Dev(x, int(x.data_ptr()), tuple(int(s) for s in x.shape), dt, "torch")
    elif mod.startswith("cupy"):
        if not x.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous array, got strides {x.strides}")
        dt = str(x.dtype)
        if dtype is not None:
            if dtype == "bfloat16" and dt == "uint16":
                dt = "bfloat16"
            elif dtype != dt:
                raise TypeError(f"{name}: dtype={dtype!r} does not describe a CuPy array of dtype {dt}")
        dev = Dev(x, int(x.data.ptr), tuple(int(s) for s in x.shape), dt, "cupy")
    else:
        raise TypeError(f"{name}: expected a CuPy array or a torch CUDA tensor, got {type(x).__name__}")
    if dev.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {dtypes}, got {dev.dtype}")
    if dev.ptr % 16 and dev.size:
        raise ValueError(f"{name}: expected a 16-byte aligned buffer, got address {dev.ptr:#x}")
    return dev


def empty(like: Dev, shape: tuple[int, ...], dtype: str) -> Dev:
    """Allocate an uninitialised array in the framework of ``like``."""
    if like.framework == "torch":
        import torch

        tdt = {
            "float32": torch.float32,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "uint8": torch.uint8,
            "int32": torch.int32,
        }[dtype]
        t = torch.empty(shape, dtype=tdt, device=like.obj.device)
        return Dev(t, int(t.data_ptr()), tuple(shape), dtype, "torch")
    cp = _cp()
    npdt = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "uint8": np.uint8, "int32": np.int32}[
        dtype
    ]
    a = cp.empty(shape, dtype=npdt)
    return Dev(a, int(a.data.ptr), tuple(shape), dtype, "cupy")


def ptr(p: int) -> np.uint64:
    return np.uint64(p)


def launch_stream(dev: Dev):
    """The stream to launch on: torch's current stream for torch tensors, CuPy's current one otherwise."""
    cp = _cp()
    if dev.framework == "torch":
        import torch

        return cp.cuda.ExternalStream(torch.cuda.current_stream(dev.obj.device).cuda_stream)
    return cp.cuda.get_current_stream()


#: Declarations every kernel source starts with (no headers: conversions are PTX).
PRELUDE = r"""
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
#define FLT_MAX_ __int_as_float(0x7f7fffff)
__device__ __forceinline__ float bf16_to_f(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ float f16_to_f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f_to_bf16(float f) {
  u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ u16 f_to_f16(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
// element type DT: 0 float32, 1 float16, 2 bfloat16 (16-bit types as raw u16 bits)
#if DT == 0
typedef float elem_t;
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float from_f(float v) { return v; }
#elif DT == 1
typedef u16 elem_t;
__device__ __forceinline__ float to_f(u16 v) { return f16_to_f(v); }
__device__ __forceinline__ u16 from_f(float v) { return f_to_f16(v); }
#else
typedef u16 elem_t;
__device__ __forceinline__ float to_f(u16 v) { return bf16_to_f(v); }
__device__ __forceinline__ u16 from_f(float v) { return f_to_bf16(v); }
#endif
// 8 consecutive elements from index e (e % 8 == 0), zero-padded past n
__device__ __forceinline__ void load8(const elem_t* __restrict__ p, long long e, long long n, float v[8]) {
  if (e + 8 <= n) {
#if DT == 0
    float4 a = __ldg(reinterpret_cast<const float4*>(p + e));
    float4 b = __ldg(reinterpret_cast<const float4*>(p + e) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
#else
    uint4 a = __ldg(reinterpret_cast<const uint4*>(p + e));
    u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { v[2 * i] = to_f((u16)(w[i] & 0xffffu)); v[2 * i + 1] = to_f((u16)(w[i] >> 16)); }
#endif
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = (e + j < n) ? to_f(p[e + j]) : 0.0f;
  }
}
// store 8 consecutive elements at e (e % 8 == 0), only those below n
__device__ __forceinline__ void store8(elem_t* __restrict__ p, long long e, long long n, const float v[8]) {
  if (e + 8 <= n) {
#if DT == 0
    reinterpret_cast<float4*>(p + e)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p + e)[1] = make_float4(v[4], v[5], v[6], v[7]);
#else
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = (u32)from_f(v[2 * i]) | ((u32)from_f(v[2 * i + 1]) << 16);
    reinterpret_cast<uint4*>(p + e)[0] = make_uint4(w[0], w[1], w[2], w[3]);
#endif
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) if (e + j < n) p[e + j] = from_f(v[j]);
  }
}
"""


@functools.cache
def compile_kernel(source: str, name: str, defines: tuple[tuple[str, Any], ...], options: tuple[str, ...] = ()):
    """Compile ``source`` with the given macro definitions (cached) and return the kernel ``name``."""
    cp = _cp()
    head = "".join(f"#define {k} {v}\n" for k, v in defines)
    module = cp.RawModule(code=head + PRELUDE + source, options=("-std=c++17", *options))
    return module.get_function(name)


def grid_for(total_threads: int, block: int = 256) -> tuple[int]:
    return (max(1, -(-int(total_threads) // block)),)


@functools.cache
def _sm_count(device_id: int) -> int:
    return int(_cp().cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


def sm_count() -> int:
    """Streaming multiprocessors of the current device (sizes grids that loop over their input)."""
    return _sm_count(_cp().cuda.Device().id)


def resident_blocks(kernel: Any, block: int) -> int:
    """Blocks of ``block`` threads of ``kernel`` that run at once on the current device (occupancy × SMs):
    the grid of a kernel that loops over its input, so no partial wave is left at the end."""
    occupancy = getattr(_cp().cuda.driver, "occupancyMaxActiveBlocksPerMultiprocessor", None)
    function = kernel.kernel  # a RawKernel's compiled cupy.cuda.function.Function (its CUfunction in .ptr)
    per_sm = occupancy(function.ptr, block, 0) if occupancy is not None else 2048 // block
    return max(1, int(per_sm)) * sm_count()
