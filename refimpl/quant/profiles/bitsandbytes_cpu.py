"""The ``bitsandbytes-cpu`` profile: the steps where bitsandbytes 0.50.2 on CPU departs from the reference.

Its 4-bit codes are the reference's (the reference is bitsandbytes' CPU rules for finite data, spec/nf4.md §6);
it differs in what the reference does not define the same way:

* a tail block whose max is NaN stores the all-ones NaN 0xFFFFFFFF (torch's vectorized ``clamp``), §9;
* the nested offset is ``torch.mean`` on CPU: torch's cascade float32 sum, then a float32 division, §7;
* the 8-bit codes of the nested statistics come from a 65,536-bin lookup table, not the nearest code, §8;
* dequantization: FP4's nibble 8 is −0.0 and bfloat16 is rounded by the C++ ``float_to_bf16`` on the C++
  path (an even last dimension), §5, §5.1.

Each function replaces the reference step of the same name in ``refimpl.quant.blockwise`` (section "core").
"""

from __future__ import annotations

import functools
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from refimpl.quant import codebooks, nested
from refimpl.quant.operands import ABSMAX_MIN, DTYPES_BY_NAME

#: what torch's vectorized clamp returns for a NaN: the float32 with every bit set
ALL_ONES_NAN = np.array(0xFFFFFFFF, dtype=np.uint32).view(np.float32)


def block_absmax(x: npt.NDArray[np.float32], bs: int) -> npt.NDArray[np.float32]:
    """The reference's a_b (max |x| per block, the tail's clamped to 1e-38), except that a NaN tail max is
    stored as ``ALL_ONES_NAN``, as torch's vectorized ``clamp(min=1e-38)`` returns it."""
    n_full = x.size - x.size % bs
    absmax = np.abs(x[:n_full].reshape(-1, bs)).max(axis=1)
    if n_full < x.size:
        tail = np.maximum(np.abs(x[n_full:]).max(), ABSMAX_MIN)
        absmax = np.append(absmax, ALL_ONES_NAN if np.isnan(tail) else tail)
    return absmax.astype(np.float32)


def absmax_offset(absmax: npt.NDArray[np.float32], threads: int) -> np.float32:
    """offset = f32(torch_sum(a) / n): torch.mean on CPU is ``sum().div_(n)``, the sum in torch's cascade
    order on ``threads`` threads (``nested.torch_cpu_sum_float32``)."""
    return np.float32(nested.torch_cpu_sum_float32(absmax, threads) / np.float32(absmax.size))


@functools.cache
def dynamic8_lut() -> npt.NDArray[np.uint8]:
    """bitsandbytes' CPU 8-bit table over v ∈ [−1, 1]: LUT[i] = #{ j : m_j < f32(−1 + f32(f32(2i) / 65535)) }
    with m the float32 midpoints of the dynamic map (65,536 entries, built once)."""
    i = np.arange(65536, dtype=np.float32)
    grid = (np.float32(-1) + (np.float32(2) * i) / np.float32(65535)).astype(np.float32)
    mids = codebooks.float32_midpoints(codebooks.codebook("dynamic8"))
    lut = np.searchsorted(mids, grid, side="left").astype(np.uint8)
    lut.flags.writeable = False
    return lut


def lut_index(v: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """trunc(f32(f32(f32(v + 1) · 0.5) · 65535) + 0.5), NaN → 0, clipped to the table."""
    t = ((v + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5)).astype(np.float32)
    return np.clip(np.nan_to_num(t, nan=0.0).astype(np.int64), 0, 65535)


def codes_8bit(v: npt.NDArray[np.float32], absmax: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """q = LUT[index(v)] (not always the nearest code: spec/nf4.md §8.2); a block with a = 0 gets code 0."""
    q = dynamic8_lut()[lut_index(v)]
    return np.where(absmax[:, None] == 0, np.uint8(0), q).astype(np.uint8)


def cpp_path(shape: tuple[int, ...]) -> bool:
    """bitsandbytes' CPU dequantizer runs its C++ loop for an even last dimension, else torch (§5.1)."""
    return len(shape) > 0 and shape[-1] % 2 == 0


def fp4_zero_is_negative(shape: tuple[int, ...]) -> bool:
    """FP4 nibble 8 is −0.0 in the C++ scalar table, +0.0 in torch's."""
    return cpp_path(shape)


def bf16_cpp(values: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
    """bitsandbytes' C++ float_to_bf16: (bits + 0x7FFF + lsb) >> 16 in uint32 arithmetic. Round to
    nearest even for numbers; a NaN whose bits are ≥ 0xFFFF8000 wraps around to +0.0 (spec §5)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFFFFFF
    return (rounded >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)


def cast_output(values: npt.NDArray[np.float32], dtype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """bfloat16 on the C++ path by ``bf16_cpp``; every other case rounds to nearest even, as the reference."""
    if dtype == "bfloat16" and cpp_path(shape):
        return bf16_cpp(values)
    return values.astype(DTYPES_BY_NAME[dtype])
