"""NF4/FP4 blockwise 4-bit quantization on the CPU with numba (QLoRA, arXiv 2305.14314, §3).

Same rules, same bytes as the ``bitsandbytes-cpu`` profile of ``refimpl.quant`` (spec/nf4.md):
codes, absmax, nested state (offset, 8-bit codes, second-level absmax) and the dequantized bits
are identical for float32, float16 and bfloat16 (``ml_dtypes.bfloat16``) inputs and every
blocksize 32 … 4096. The per-element work is in ``_quant_kernels``; this module validates the
arguments with the reference's checks (``refimpl.quant.operands``, same errors) and builds the arrays.

    s_i   = clamp(x_i · f32(1/absmax_b), −1, 1)        (tail block: x_i / absmax_b)
    nib_i = #{ j : m_j < s_i }                          (float32 midpoints m_j; FP4 remapped)
    x̂_i  = RNE_dtype(f32(code[nib_i] · absmax_b))

Nested statistics ("double quantization", QLoRA §3): offset = mean(absmax) with torch's CPU
summation order, c = f32(absmax − offset), 8-bit codes of c in blocks of 256 by bitsandbytes'
65,536-bin lookup table.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from refimpl import _checks
from refimpl.kernels.numba_cpu import _quant_kernels as K
from refimpl.quant import QuantState, codebooks
from refimpl.quant import blockwise as ref_blockwise
from refimpl.quant.operands import BLOCKSIZES, NESTED_BLOCKSIZE, profile_name, quant_operands, raise_nonfinite
from refimpl.quant.profiles.bitsandbytes_cpu import dynamic8_lut

__all__ = [
    "BLOCKSIZES",
    "DYNAMIC8",
    "NESTED_BLOCKSIZE",
    "PROFILES",
    "QUANT_TYPES",
    "block_scales",
    "code_table",
    "dequantize_4bit",
    "dequantize_absmax_8bit",
    "quantize_4bit",
    "quantize_absmax_8bit",
]

QUANT_TYPES = codebooks.QUANT_TYPES


def _tables(quant_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(code by nibble, the 15 float32 midpoints, nibble of each sorted position, nibble of 0.0)."""
    bounds = codebooks.midpoints(quant_type)
    order = codebooks.nibble_of_position(quant_type)
    zero_nib = int(order[int(np.count_nonzero(bounds < 0))])
    return codebooks.codebook(quant_type), bounds, order, zero_nib


_TABLES = {qt: _tables(qt) for qt in QUANT_TYPES}
#: the 8-bit dynamic map the nested statistics are decoded with (the QLoRA GEMV reads it too)
DYNAMIC8 = codebooks.codebook("dynamic8")
PROFILES = ("reference", "bitsandbytes-cpu")


# ---------------------------------------------------------------- public API


def quantize_absmax_8bit(absmax: Any, *, threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Double quantization as bitsandbytes CPU does it: (uint8 codes, float32 a2 per 256, offset).

    offset = f32(torch_sum(absmax)) / f32(n), torch's CPU cascade order on ``threads`` threads (it
    matters only above 32,768 blocks); codes by bitsandbytes' 65,536-bin lookup table.
    """
    a = np.ascontiguousarray(np.asarray(absmax, dtype=np.float32).reshape(-1))
    threads = _checks.integer(threads, "threads", low=1)
    lut = dynamic8_lut()
    offset = np.float32(K.torch_cpu_sum_f32(a, threads, 8) / np.float32(a.size))
    codes = np.empty(a.size, dtype=np.uint8)
    a2 = np.empty(-(-a.size // NESTED_BLOCKSIZE), dtype=np.float32)
    K.quantize_nested_kernel(a, offset, lut, codes, a2)
    return codes, a2, offset


def _nested_operands(codes: Any, nested_absmax: Any) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 codes, float32 a2), flat and contiguous, with one a2 per 256 codes."""
    q = np.ascontiguousarray(np.asarray(codes, dtype=np.uint8).reshape(-1))
    a2 = np.ascontiguousarray(np.asarray(nested_absmax, dtype=np.float32).reshape(-1))
    if a2.size != -(-q.size // NESTED_BLOCKSIZE):
        raise ValueError(
            f"nested_absmax: expected {-(-q.size // NESTED_BLOCKSIZE)} values for {q.size} codes, got {a2.size}"
        )
    return q, a2


def dequantize_absmax_8bit(codes: Any, nested_absmax: Any, offset: Any) -> np.ndarray:
    """â_i = f32(f32(d[q_i] · a2[i // 256]) + offset), float32."""
    q, a2 = _nested_operands(codes, nested_absmax)
    out = np.empty(q.size, dtype=np.float32)
    K.dequantize_nested_kernel(q, a2, np.float32(offset), DYNAMIC8, out)
    return out


def quantize_4bit(
    x: Any,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    *,
    profile: str = "reference",
    nonfinite: str | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, QuantState]:
    """``refimpl.quant.quantize_4bit`` compiled: same arguments, same bytes, same ``QuantState``.

    profile "reference" or "bitsandbytes-cpu" (identical 4-bit codes; they differ in nonfinite's
    default and in the nested statistics: the reference's correctly rounded offset and nearest 8-bit
    codes are computed by ``refimpl.quant`` over the n/blocksize absmax values, the bitsandbytes-cpu
    offset (torch's summation order) and LUT codes here). "bitsandbytes-cuda" is not provided.
    Returns (packed uint8 of shape ((n+1)//2, 1), QuantState).
    """
    ops = quant_operands(
        x,
        blocksize,
        quant_type,
        double_quant,
        profile=profile,
        nonfinite=nonfinite,
        threads=threads,
        profiles=PROFILES,
        check_finite=False,
    )
    kind = K.KIND_OF_DTYPE.get(ops.dtype, K.KIND_F32)  # float64 arrives rounded to float32
    flat = np.ascontiguousarray(ops.x)
    code, bounds, order, zero_nib = _TABLES[ops.quant_type]
    n = flat.size
    packed: np.ndarray = np.empty((n + 1) // 2, dtype=np.uint8)  # reshaped to (-1, 1) below
    absmax = np.empty(-(-n // ops.blocksize), dtype=np.float32)
    K.quantize_4bit_kernel(
        flat if kind == K.KIND_F32 else flat.view(np.uint16),
        kind,
        n,
        ops.blocksize,
        bounds,
        order,
        zero_nib,
        packed,
        absmax,
    )
    if ops.nonfinite == "raise" and not np.isfinite(absmax).all():  # NaN/inf make their block's absmax non-finite
        raise_nonfinite(flat, "x")
    packed = packed.reshape(-1, 1)
    fields: dict[str, Any] = dict(
        shape=ops.shape,
        dtype=ops.dtype,
        blocksize=ops.blocksize,
        quant_type=ops.quant_type,
        code=code.copy(),
        profile=ops.profile,
    )
    if not ops.double_quant:
        return packed, QuantState(absmax=absmax, **fields)
    if ops.profile == "bitsandbytes-cpu":
        codes, a2, offset = quantize_absmax_8bit(absmax, threads=ops.threads)
    else:
        offset = ref_blockwise.profile_steps(ops.profile).absmax_offset(absmax, ops.threads)
        with np.errstate(invalid="ignore", over="ignore"):
            centred = (absmax - offset).astype(np.float32)
        codes, a2 = ref_blockwise.quantize_blockwise_8bit(
            centred, NESTED_BLOCKSIZE, profile=ops.profile, nonfinite="propagate"
        )
    return packed, QuantState(absmax=codes, offset=offset, nested_absmax=a2, nested_code=DYNAMIC8.copy(), **fields)


def block_scales(state: QuantState) -> np.ndarray:
    """The float32 per-block scales of a state (rebuilt from the nested statistics if nested)."""
    if state.nested:
        if state.nested_blocksize != NESTED_BLOCKSIZE:
            return state.block_absmax()
        return dequantize_absmax_8bit(state.absmax, state.nested_absmax, state.offset)
    return np.ascontiguousarray(state.absmax, dtype=np.float32).reshape(-1)


def code_table(state: QuantState, profile: str | None = None) -> np.ndarray:
    """The 16 float32 values by nibble, with FP4 nibble 8's zero sign as ``profile`` dequantizes it."""
    return ref_blockwise.dequantization_code(state, state.profile if profile is None else profile)


def _out_array(out: Any, state: QuantState) -> np.ndarray:
    """``out`` checked: a writeable C-contiguous array of the state's shape and dtype."""
    want = np.dtype(ml_dtypes.bfloat16) if state.dtype == "bfloat16" else np.dtype(state.dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a NumPy array of dtype {want.name}, got {_checks.describe(out)}")
    if out.dtype != want or out.shape != tuple(state.shape):
        raise ValueError(f"out: expected shape {tuple(state.shape)} and dtype {want.name}, got {_checks.describe(out)}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out: expected a writeable C-contiguous array")
    return out


def dequantize_4bit(packed: Any, state: QuantState, *, profile: str | None = None, out: Any = None) -> np.ndarray:
    """``refimpl.quant.dequantize_4bit`` compiled: x̂ = RNE_dtype(f32(code[nib] · absmax)), same bits.

    ``profile`` ("reference" or "bitsandbytes-cpu") defaults to the state's; it changes the sign of FP4's zero
    nibble 8. ``out``, an
    optional array of the state's shape and dtype, receives the result (and is returned): it saves the
    allocation, whose first-touch page faults cost about as much as the decoding (bench/README.md).
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a refimpl.quant.QuantState, got {_checks.describe(state)}")
    prof = state.profile if profile is None else profile_name(profile)
    if prof == "bitsandbytes-cuda":
        raise ValueError(
            "profile: expected 'reference' or 'bitsandbytes-cpu' for the numba dequantizer, got 'bitsandbytes-cuda' "
            "(its flush of subnormal scales and products, spec/nf4.md §15.1, is refimpl.quant.dequantize_4bit's)"
        )
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise TypeError(f"packed: expected uint8 packed codes, got {_checks.describe(p)}")
    n = state.n
    if p.size != (n + 1) // 2:
        raise ValueError(
            f"packed: state describes shape {state.shape} ({n} elements, {(n + 1) // 2} bytes), got {p.size} bytes"
        )
    target = None if out is None else _out_array(out, state)
    p = np.ascontiguousarray(p).reshape(-1)
    kind = K.KIND_OF_DTYPE.get(state.dtype, K.KIND_F32)
    word = np.uint16 if kind != K.KIND_F32 else np.float32
    fresh = target is None or state.dtype == "float64"  # flat is allocated here, not a view of out
    flat = np.empty(n, dtype=word) if target is None or fresh else target.reshape(-1).view(word)
    table = code_table(state, profile)
    if state.nested and state.nested_blocksize == NESTED_BLOCKSIZE:  # the scales are decoded in the same pass
        q, a2 = _nested_operands(state.absmax, state.nested_absmax)
        nested = (a2, np.float32(state.offset), DYNAMIC8)
        K.dequantize_4bit_kernel(p, q, n, state.blocksize, table, kind, flat, nested, fresh)
    else:
        K.dequantize_4bit_kernel(p, block_scales(state), n, state.blocksize, table, kind, flat, None, fresh)
    if state.dtype == "float64":
        if target is None:
            return flat.astype(np.float64).reshape(state.shape)
        target[...] = flat.reshape(state.shape)
        return target
    if target is not None:
        return target
    if kind == K.KIND_F32:
        return flat.reshape(state.shape)
    return flat.view(np.float16 if kind == K.KIND_F16 else ml_dtypes.bfloat16).reshape(state.shape)
