"""Many LoRA adapters in one batch on the GPU (the serving op), as one cuBLAS GEMM over K = d + n·r_max.

    y_t = x_t Wᵀ + b + s_i · (x_t A_iᵀ) B_iᵀ,     i = adapter_index[t]  (−1: no adapter)

The gather form (Punica's BGMV, vLLM's stacked LoRA buffers; spec/lora.md §11) gives every adapter a slot of
r_max rank columns, zero-padded past its own rank r_i. Here the slots sit side by side:

    A_cat = [A_0; A_1; …]  (n·r_max, d),        weight = [W | B_0 | B_1 | … | b | 0]  (out, k_pad)

and a forward is three launches, with no sort and no per-adapter loop:

1. u = x A_catᵀ (T, n·r_max), a skinny GEMM into a float32 scratch (every token against every adapter);
2. ``mask_scale``: u[t, j] ← s_i · u[t, j] if j lies in the slot of i = adapter_index[t], else 0, rounded once
   to the input dtype and written into the workspace next to x (a token with index −1 keeps only zeros);
3. y = [x | u | 1] · weightᵀ, one GEMM over K = d + n·r_max (+1 for the bias), as ``lora_gemm`` does for one
   adapter (K = d + r).

Over the base GEMM this adds (n·r_max)/out + (n·r_max)/d of its FLOPs (8 adapters of rank 16 at d = out =
4096: 6 %), independent of how the tokens are spread over the adapters. The cost grows with n·r_max, so for
hundreds of adapters the segment form (sort tokens by adapter, one GEMM pair per segment) is the better
kernel; ``pack_batched`` refuses n·r_max above ``MAX_SLOTS``.

Rounding: u accumulates in float32 and s_i·u is rounded once to the input dtype; the GEMMs accumulate in
float32 (``CUBLAS_COMPUTE_32F``). The weight side is packed once per set of adapters (``pack_batched``);
``workspace`` holds x in its first d columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from refimpl._linear_operands import batched_operands
from refimpl.kernels.cupy_gpu import _device as D
from refimpl.kernels.cupy_gpu import lora_gemm

#: the largest n·r_max packed (beyond it the masked gather form wastes more than it saves)
MAX_SLOTS = 4096

#: bit patterns of 1.0 for the bias column of the workspace, per element type
_ONE_BITS = {"float32": np.float32(1.0), "float16": np.float16(1.0), "bfloat16": np.uint16(0x3F80)}
#: the CuPy dtype holding each element type (bfloat16 as its uint16 bits)
_RAW = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}

_MASK_SRC = r"""
// xbuf[t, d + j] = s[a] * u[t, j] where a = j / R is the adapter of slot column j and idx[t] == a, else 0
extern "C" __global__ void mask_scale(const float* __restrict__ u, const long long* __restrict__ idx,
                                      const float* __restrict__ s, elem_t* __restrict__ xbuf,
                                      long long T, int NR, int R, int kp, int d) {
  long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= T * NR) return;
  long long t = e / NR;
  int j = (int)(e - t * NR);
  int a = j / R;
  xbuf[t * kp + d + j] = from_f(idx[t] == a ? s[a] * u[e] : 0.0f);
}
"""


@dataclass(frozen=True)
class PackedBatch:
    """Weight side of the batched forward: ``weight`` (out, k_pad) = [W | B_0 | … | B_{n−1} | b | 0] with each
    B_i zero-padded to r_max columns; ``A`` (n·r_max, d) the stacked, zero-padded A_i; ``scalings`` (n,) float32."""

    weight: Any
    A: Any
    scalings: Any
    d: int
    n_adapters: int
    r_max: int
    k_pad: int
    out_features: int
    has_bias: bool
    dtype: str

    @property
    def slots(self) -> int:
        return self.n_adapters * self.r_max


def _raw(a: Any, dtype: str) -> Any:
    """A CuPy view of a device array (bfloat16 as its uint16 bits)."""
    cp = D._cp()
    if type(a).__module__.startswith("torch"):
        import torch

        a = a.view(torch.int16) if dtype == "bfloat16" else a
    return cp.asarray(a).view(_RAW[dtype])


def pack_batched(W: Any, adapters: Sequence[tuple[Any, Any, float]], *, bias: Any = None, dtype: str | None = None):
    """Pack W (out, d), the adapters (A_i (r_i, d), B_i (out, r_i), s_i) and the bias once (device arrays of one
    dtype: float32, float16, or bfloat16 as torch tensors or CuPy uint16 with ``dtype="bfloat16"``)."""
    cp = D._cp()
    wd = D.as_dev(W, "W", dtypes=("float32", "float16", "bfloat16"), dtype=dtype)
    if len(wd.shape) != 2:
        raise ValueError(f"W: expected shape (out, in), got {wd.shape}")
    out_f, d = wd.shape
    dt = wd.dtype
    ranks = []
    for i, (A, B, s) in enumerate(adapters):
        ad = D.as_dev(A, f"adapters[{i}] A", dtypes=(dt,), dtype=dtype)
        bd = D.as_dev(B, f"adapters[{i}] B", dtypes=(dt,), dtype=dtype)
        if len(ad.shape) != 2 or ad.shape[1] != d or bd.shape != (out_f, ad.shape[0]):
            raise ValueError(f"adapters[{i}]: expected A (r, {d}) and B ({out_f}, r), got {ad.shape} and {bd.shape}")
        if isinstance(s, bool) or not isinstance(s, (int, float, np.floating, np.integer)) or not np.isfinite(s):
            raise TypeError(f"adapters[{i}] scaling: expected a finite real number, got {s!r}")
        ranks.append(ad.shape[0])
    n, r_max = len(ranks), max(ranks, default=0)
    if n * r_max > MAX_SLOTS:
        raise ValueError(f"adapters: n·r_max = {n * r_max} slots exceed {MAX_SLOTS}; use the segment form")
    has_bias = bias is not None
    k = d + n * r_max + int(has_bias)
    kp = -(-k // lora_gemm.K_ALIGN) * lora_gemm.K_ALIGN
    weight = cp.zeros((out_f, kp), dtype=_RAW[dt])
    a_cat = cp.zeros((max(n * r_max, 1), d), dtype=_RAW[dt])
    weight[:, :d] = _raw(W, dt)
    for i, ((A, B, _), r) in enumerate(zip(adapters, ranks, strict=True)):
        a_cat[i * r_max : i * r_max + r] = _raw(A, dt)
        weight[:, d + i * r_max : d + i * r_max + r] = _raw(B, dt)
    if has_bias:
        bd = D.as_dev(bias, "bias", dtypes=(dt,), dtype=dtype)
        if bd.shape != (out_f,):
            raise ValueError(f"bias: expected shape ({out_f},), got {bd.shape}")
        weight[:, d + n * r_max] = _raw(bias, dt)
    scalings = cp.asarray(np.array([float(s) for _, _, s in adapters] or [0.0], dtype=np.float32))
    return PackedBatch(weight, a_cat, scalings, d, n, r_max, kp, out_f, has_bias, dt)


def workspace(packed: PackedBatch, T: int) -> Any:
    """Input buffer (T, k_pad) (CuPy, of the packed dtype; bfloat16 as uint16 bits), zero except the ones column
    of the bias; write x into its first d columns."""
    cp = D._cp()
    buf = cp.zeros((int(T), packed.k_pad), dtype=_RAW[packed.dtype])
    if packed.has_bias:
        buf[:, packed.d + packed.slots] = _ONE_BITS[packed.dtype]
    return buf


def forward_batched_packed(packed: PackedBatch, xbuf: Any, adapter_index: Any, *, out: Any = None) -> Any:
    """y (T, out) = [x | mask(s ⊙ x A_catᵀ) | 1] · weightᵀ; ``adapter_index`` a CuPy int64 array (T,) in [−1, n)."""
    cp = D._cp()
    T = int(xbuf.shape[0])
    if xbuf.shape != (T, packed.k_pad) or xbuf.dtype != _RAW[packed.dtype]:
        raise ValueError(f"xbuf: expected the workspace (T, {packed.k_pad}) of workspace(), got {xbuf.shape}")
    idx = cp.asarray(adapter_index, dtype=cp.int64)
    if idx.shape != (T,):
        raise ValueError(f"adapter_index: expected shape ({T},), got {idx.shape}")
    y = cp.empty((T, packed.out_features), dtype=_RAW[packed.dtype]) if out is None else out
    h = cp.cuda.device.get_cublas_handle()
    nr = packed.slots
    if nr:
        u = cp.empty((T, nr), dtype=cp.float32)
        lora_gemm.gemm_rowmajor(
            h, T, nr, packed.d, 1.0, xbuf.data.ptr, packed.k_pad, packed.A.data.ptr, packed.d, 0.0,
            u.data.ptr, nr, packed.dtype, c_dtype="float32",
        )  # fmt: skip
        D.compile_kernel(_MASK_SRC, "mask_scale", (("DT", D.DT_CODE[packed.dtype]),))(
            D.grid_for(T * nr),
            (256,),
            (
                u,
                idx,
                packed.scalings,
                xbuf,
                np.int64(T),
                np.int32(nr),
                np.int32(packed.r_max),
                np.int32(packed.k_pad),
                np.int32(packed.d),
            ),
        )
    lora_gemm.gemm_rowmajor(
        h, T, packed.out_features, packed.k_pad, 1.0, xbuf.data.ptr, packed.k_pad, packed.weight.data.ptr,
        packed.k_pad, 0.0, y.data.ptr, packed.out_features, packed.dtype,
    )  # fmt: skip
    return y


def forward_batched(
    x: Any,
    W: Any,
    adapters: Sequence[tuple[Any, Any, float]],
    adapter_index: Any,
    *,
    bias: Any = None,
    fan_in_fan_out: bool = False,
) -> np.ndarray:
    """``refimpl.lora.forward_batched`` on the GPU (NumPy in, NumPy out): the reference's checks, operands rounded
    once to float32, the masked gather GEMM above, float32 result."""
    ops = batched_operands(x, W, adapters, adapter_index, bias=bias, fan_in_fan_out=fan_in_fan_out)
    cp = D._cp()

    def dev(a: np.ndarray) -> Any:
        return cp.asarray(np.ascontiguousarray(a, dtype=np.float32))

    packed = pack_batched(
        dev(ops.W),
        [(dev(ad.A), dev(ad.B), ad.scaling) for ad in ops.adapters],
        bias=None if ops.bias is None else dev(ops.bias),
    )
    buf = workspace(packed, ops.x.shape[0])
    buf[:, : packed.d] = dev(ops.x)
    return forward_batched_packed(packed, buf, cp.asarray(ops.adapter_index)).get()
