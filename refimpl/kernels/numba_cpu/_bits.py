"""Bit-level helpers shared by the numba kernels: float32 <-> bits, and the
fp16/bf16 conversions with IEEE round-to-nearest-even (the rounding NumPy,
ml_dtypes, F16C ``vcvtps2ph`` and bitsandbytes' ``float_to_bf16`` all use).

Reinterpreting a scalar's bits is an LLVM ``bitcast`` (a register move), so the
kernels convert element by element without scratch buffers.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def f32_bits(typingctx, x):
    """The uint32 bit pattern of a float32 scalar."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, b):
    """The float32 scalar whose bit pattern is the low 32 bits of an integer."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if b.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif b.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(b), codegen


@njit(cache=True, inline="always")
def bf16_to_f32(h):
    """bfloat16 bits (uint16) -> float32, exact."""
    return bits_f32(np.uint32(h) << np.uint32(16))


@njit(cache=True, inline="always")
def f16_to_f32(h):
    """IEEE binary16 bits (uint16) -> float32, exact (subnormals, inf and NaN included)."""
    hb = np.uint32(h)
    sign = (hb & np.uint32(0x8000)) << np.uint32(16)
    e = (hb >> np.uint32(10)) & np.uint32(0x1F)
    m = hb & np.uint32(0x3FF)
    if e == 0x1F:
        return bits_f32(sign | np.uint32(0x7F800000) | (m << np.uint32(13)))
    if e != 0:
        return bits_f32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))
    if m == 0:
        return bits_f32(sign)
    e2 = np.uint32(113)
    while (m & np.uint32(0x400)) == 0:
        m <<= np.uint32(1)
        e2 -= np.uint32(1)
    return bits_f32(sign | (e2 << np.uint32(23)) | ((m & np.uint32(0x3FF)) << np.uint32(13)))


@njit(cache=True, inline="always")
def f32_to_bf16(v):
    """float32 -> bfloat16 bits with round-to-nearest-even; NaN stays a quiet NaN."""
    b = f32_bits(v)
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
    b = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
    return np.uint16(b >> np.uint32(16))


@njit(cache=True, inline="always")
def f32_to_f16(v):
    """float32 -> IEEE binary16 bits with round-to-nearest-even (overflow to inf)."""
    b = f32_bits(v)
    sign = np.uint32((b >> np.uint32(16)) & np.uint32(0x8000))
    a = b & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):
        if a > np.uint32(0x7F800000):
            return np.uint16(sign | np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF)))
        return np.uint16(sign | np.uint32(0x7C00))
    if a >= np.uint32(0x477FF000):  # >= 65520 rounds to inf
        return np.uint16(sign | np.uint32(0x7C00))
    if a >= np.uint32(0x38800000):  # normal binary16 range: rebias the exponent, round 13 bits away
        m = a - np.uint32(0x38000000)
        r = (m + np.uint32(0x0FFF) + ((m >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        return np.uint16(sign | r)
    if a < np.uint32(0x33000000):  # below 2^-25 (half of the smallest subnormal): rounds to ±0
        return np.uint16(sign)
    e = a >> np.uint32(23)
    mant = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    shift = np.uint32(126) - e  # value in units of 2^-24 is mant >> shift
    r = mant >> shift
    rem = mant & ((np.uint32(1) << shift) - np.uint32(1))
    half = np.uint32(1) << (shift - np.uint32(1))
    if rem > half or (rem == half and (r & np.uint32(1)) == 1):
        r += np.uint32(1)
    return np.uint16(sign | r)
