"""Blockwise 4-bit (NF4/FP4) and 8-bit quantization, nibble packing (spec/nf4.md §4–§8).

QLoRA (Dettmers et al., arXiv 2305.14314, eq. 1–2) stores a weight tensor X as
4-bit codes plus one float32 scale per block of ``blocksize`` consecutive
elements of the flattened tensor:

    a_b   = max_{i ∈ b} |x_i|                          (absmax, float32)
    s_i   = clamp(x_i · f32(1 / a_b), −1, 1)           (full blocks; the tail block divides)
    q_i   = #{ j : m_j < s_i }                          (m = float32 midpoints of the sorted codebook)
    nib_i = q_i (NF4)  or  FP4_ORDER[q_i] (FP4)
    x̂_i  = RNE_dtype( f32(code[nib_i] · a_b) )         (dequantization)

All arithmetic is IEEE float32, as NF4 is defined. The section "core" below is these formulas with the
reference rules, one function per step; a profile (spec/nf4.md §6) is the same core with some steps
replaced by its peer's (``refimpl.quant.profiles``):

* ``reference``: the rules above (bitsandbytes ≥ 0.50 CPU rules for finite data); NaN/±inf
  raise unless ``nonfinite="propagate"``; float64 input is rounded once to float32.
* ``bitsandbytes-cpu``: bitsandbytes 0.50.2 on CPU, bit for bit, special values included.
* ``bitsandbytes-cuda``: the CUDA kernels' rules where they differ (NaN-ignoring absmax,
  flush-to-zero, the fast-math reciprocal rcp.approx.ftz.f32 (``cuda_rcp``), NaN → nibble 0,
  FP4 literal thresholds and zero sign, the 8-bit bisection).

The arguments are checked by ``refimpl.quant.operands``, which the kernels share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks
from refimpl.quant import codebooks, nested, profiles
from refimpl.quant.operands import (
    ABSMAX_MIN,
    DTYPES_BY_NAME,
    NESTED_BLOCKSIZE,
    profile_name,
    quant_operands,
    valid_blocksize,
)
from refimpl.quant.state import QuantState

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


# ---------------------------------------------------------------------------------------------------
# core: the formulas (spec/nf4.md §4, §5, §7, §8)


def _quantize_4bit_core(x: F32, bs: int, quant_type: str, steps: Steps) -> tuple[U8, F32]:
    """QLoRA eq. 1 over the flattened float32 x (spec §4): the packed 4-bit codes and the block absmax."""
    absmax = steps.block_absmax(x, bs)  # a_b = max_{i ∈ b} |x_i|  (§4.2)
    s = steps.scaled(x, absmax, bs)  # s_i = clamp(x_i · f32(1 / a_b), −1, 1)  (§4.3)
    if x.size % 2:
        s = np.append(s, steps.pad_scaled(absmax))  # an odd n is padded with one element  (§4.5)
    nibbles = steps.nibbles(s, quant_type)  # q_i = #{ j : m_j < s_i }  (§4.4)
    return pack_nibbles(nibbles), absmax  # byte_k = 16 · nib_2k + nib_2k+1  (§4.6)


def _double_quantize_core(absmax: F32, threads: int, steps: Steps) -> tuple[np.float32, U8, F32]:
    """QLoRA §3 "Double Quantization" (spec §7): the offset, the 8-bit codes of the centred absmax and
    their per-256 absmax a2."""
    offset = steps.absmax_offset(absmax, threads)  # offset = mean(a)
    codes, a2 = _quantize_8bit_core(absmax - offset, NESTED_BLOCKSIZE, steps)  # c = f32(a − offset)
    return offset, codes, a2


def _quantize_8bit_core(x: F32, bs: int, steps: Steps) -> tuple[U8, F32]:
    """8-bit blockwise quantization with the dynamic map d (spec §8): the flat codes and the block absmax."""
    blocks = np.zeros((-(-x.size // bs), bs), dtype=np.float32)  # the tail block zero-padded
    blocks.reshape(-1)[: x.size] = x
    absmax = steps.absmax_8bit(blocks)  # a_k = max |x| per block
    v = steps.scaled_8bit(blocks, absmax)  # v = clamp(f32(x · f32(1 / a_k)), −1, 1)
    codes = steps.codes_8bit(v, absmax)  # q = #{ j : m_j < v }
    return codes.reshape(-1)[: x.size], absmax


def _dequantize_4bit_core(
    nibbles: U8, code: F32, absmax: F32, bs: int, dtype: str, shape: tuple[int, ...], steps: Steps
) -> npt.NDArray[Any]:
    """x̂_i = RNE_dtype(f32(code[nib_i] · a_{i // bs})) (spec §5), with the input's shape."""
    values = steps.scaled_codes(code[nibbles], np.repeat(absmax, bs)[: nibbles.size])
    return steps.cast_output(values, dtype, shape).reshape(shape)


# The reference's steps.


def _block_absmax(x: F32, bs: int) -> F32:
    """a_b = max |x_i| over each block, float32, stored as is (0 possible); the tail block's is clamped
    to f32(1e-38) and stored clamped (§4.2). NaN propagates."""
    n_full = x.size - x.size % bs
    absmax = np.abs(x[:n_full].reshape(-1, bs)).max(axis=1)
    if n_full < x.size:
        absmax = np.append(absmax, np.maximum(np.abs(x[n_full:]).max(), ABSMAX_MIN))
    return absmax.astype(np.float32)


def _scaled(x: F32, absmax: F32, bs: int) -> F32:
    """Full blocks: s = clamp(x · f32(1 / max(a, 1e-38)), −1, 1), a float32 reciprocal, then a product.
    The tail block: s = clamp(x / a, −1, 1), a true float32 division (§4.3)."""
    n_full = x.size - x.size % bs
    inv = np.float32(1) / np.maximum(absmax[: n_full // bs], ABSMAX_MIN)
    full = x[:n_full].reshape(-1, bs) * inv[:, None]
    tail = x[n_full:] / absmax[n_full // bs :]
    return np.clip(np.concatenate([full.reshape(-1), tail]), np.float32(-1), np.float32(1)).astype(np.float32)


def _pad_scaled(absmax: F32) -> np.float32:
    """The padding element of an odd n has s = 0 (§4.5)."""
    return np.float32(0)


def _nibbles(s: F32, quant_type: str) -> U8:
    """q = #{ j : m_j < s } over the 15 float32 midpoints m of the sorted codebook: ties go to the lower
    code, NaN sorts last (q = 15). NF4: nib = q; FP4: nib = FP4_ORDER[q] (§4.4)."""
    q = np.searchsorted(codebooks.midpoints(quant_type), s, side="left")
    return codebooks.nibble_of_position(quant_type)[q]


def _absmax_offset(absmax: F32, threads: int) -> np.float32:
    """offset = f32(mean(a)), correctly rounded (§7); ``threads`` only matters to bitsandbytes-cpu."""
    return nested.correctly_rounded_mean(absmax)


def _absmax_8bit(blocks: F32) -> F32:
    """a_k = max |x| over each zero-padded block, from 0: NaN is skipped, as bitsandbytes' C++ loop does (§8)."""
    return np.fmax.reduce(np.abs(blocks), axis=1, initial=np.float32(0)).astype(np.float32)


def _scaled_8bit(blocks: F32, absmax: F32) -> F32:
    """v = clamp(f32(x · f32(1 / a_k)), −1, 1) (§8)."""
    inv = (np.float32(1) / absmax).astype(np.float32)
    return np.clip(blocks * inv[:, None], np.float32(-1), np.float32(1)).astype(np.float32)


def _codes_8bit(v: F32, absmax: F32) -> U8:
    """q = #{ j : m_j < v } over the float32 midpoints of the dynamic map (nearest, ties low); a block with
    a_k = 0 gets code 0 (§7.3, §8)."""
    q = np.searchsorted(_DYNAMIC8_MIDPOINTS, v, side="left").clip(0, 255)
    return np.where(absmax[:, None] == 0, 0, q).astype(np.uint8)


def _scaled_codes(codes: F32, scales: F32) -> F32:
    """f32(code · a): one float32 product per element, subnormals kept (§5)."""
    return (codes * scales).astype(np.float32)


def _fp4_zero_is_negative(shape: tuple[int, ...]) -> bool:
    """FP4's nibble 8 dequantizes to +0.0, as in torch's table (the paper's value set) (§5)."""
    return False


def _cast_output(values: F32, dtype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """Round the float32 values once to the input's dtype, to nearest even (float64: exact) (§5)."""
    return values.astype(DTYPES_BY_NAME[dtype])


_DYNAMIC8_MIDPOINTS = codebooks.float32_midpoints(codebooks.codebook("dynamic8"))


@dataclass(frozen=True)
class Steps:
    """The steps of one profile: the reference's, except those its peer replaces (``profiles.PROFILES``)."""

    block_absmax: Callable[[F32, int], F32] = _block_absmax
    scaled: Callable[[F32, F32, int], F32] = _scaled
    pad_scaled: Callable[[F32], np.float32] = _pad_scaled
    nibbles: Callable[[F32, str], U8] = _nibbles
    absmax_offset: Callable[[F32, int], np.float32] = _absmax_offset
    absmax_8bit: Callable[[F32], F32] = _absmax_8bit
    scaled_8bit: Callable[[F32, F32], F32] = _scaled_8bit
    codes_8bit: Callable[[F32, F32], U8] = _codes_8bit
    fp4_zero_is_negative: Callable[[tuple[int, ...]], bool] = _fp4_zero_is_negative
    scaled_codes: Callable[[F32, F32], F32] = _scaled_codes
    nested_scales: nested.NestedRule = nested.nested_scales  # â = f32(f32(d[q] · a2) + offset) (§7)
    cast_output: Callable[[F32, str, tuple[int, ...]], npt.NDArray[Any]] = _cast_output


_STEPS = {name: Steps(**replaced) for name, replaced in profiles.PROFILES.items()}


def profile_steps(profile: str) -> Steps:
    """The steps ``profile`` quantizes with (e.g. ``profile_steps("bitsandbytes-cuda").block_absmax``)."""
    return _STEPS[profile_name(profile)]


# ---------------------------------------------------------------------------------------------------
# packing


def pack_nibbles(nibbles: npt.ArrayLike, pad: int = 0) -> npt.NDArray[np.uint8]:
    """Pack 4-bit codes two per byte, the first element in the high nibble:
    byte_k = 16·nib_{2k} + nib_{2k+1}. An odd count is padded with ``pad``.
    Returns uint8 of shape ((n + 1)//2, 1), bitsandbytes' storage layout."""
    nib = _checks._to_numpy(nibbles, "nibbles")
    if nib.dtype.kind not in "iu":
        raise TypeError(f"nibbles: expected an integer array of 4-bit codes, got {_checks.describe(nib)}")
    nib = nib.reshape(-1)
    if nib.size == 0:
        raise ValueError(f"nibbles: expected a non-empty array, got {_checks.describe(nib)}")
    if nib.min() < 0 or nib.max() > 15:
        raise ValueError(f"nibbles: expected codes in [0, 15], got values in [{nib.min()}, {nib.max()}]")
    pad = _checks.integer(pad, "pad", low=0, high=15)
    nib = nib.astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(pad))
    return ((nib[0::2] << 4) | nib[1::2]).astype(np.uint8).reshape(-1, 1)


def unpack_nibbles(packed: npt.ArrayLike, n: int) -> npt.NDArray[np.uint8]:
    """Inverse of ``pack_nibbles``: the first ``n`` 4-bit codes (uint8) of packed bytes."""
    p = _checks._to_numpy(packed, "packed")
    if p.dtype != np.uint8:
        raise TypeError(f"packed: expected a uint8 array, got {_checks.describe(p)}")
    n = _checks.integer(n, "n", low=1)
    p = p.reshape(-1)
    if p.size != (n + 1) // 2:
        raise ValueError(f"packed: expected (n + 1)//2 = {(n + 1) // 2} bytes for n = {n}, got {p.size}")
    out = np.empty(2 * p.size, dtype=np.uint8)
    out[0::2] = p >> 4
    out[1::2] = p & 0x0F
    return out[:n]


# ---------------------------------------------------------------------------------------------------
# the public functions: checks, then the core with the profile's steps


def quantize_4bit(
    x: npt.ArrayLike,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    *,
    profile: str = "reference",
    nonfinite: str | None = None,
    threads: int = 1,
) -> tuple[npt.NDArray[np.uint8], QuantState]:
    """Blockwise NF4/FP4 quantization (QLoRA eq. 1; spec/nf4.md §4–§7).

    x: float32, float16 or bfloat16 array of any shape (float64 only in the reference profile,
    rounded to float32 first); blocks run over the flattened (C order) tensor.
    double_quant: store the absmax as 8-bit codes (QLoRA "double quantization", spec §7).
    threads: torch's CPU thread count, for the bitsandbytes-cpu offset of nested states with more
    than 32,768 blocks (torch.get_num_threads() where bitsandbytes ran).
    Returns (packed uint8 of shape ((n+1)//2, 1), QuantState).
    """
    ops = quant_operands(x, blocksize, quant_type, double_quant, profile=profile, nonfinite=nonfinite, threads=threads)
    steps = _STEPS[ops.profile]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        packed, absmax = _quantize_4bit_core(ops.x32(), ops.blocksize, ops.quant_type, steps)
        fields: dict[str, Any] = dict(
            shape=ops.shape,
            dtype=ops.dtype,
            blocksize=ops.blocksize,
            quant_type=ops.quant_type,
            code=codebooks.codebook(ops.quant_type),
            profile=ops.profile,
        )
        if not ops.double_quant:
            return packed, QuantState(absmax=absmax, **fields)
        offset, codes, a2 = _double_quantize_core(absmax, ops.threads, steps)
    return packed, QuantState(
        absmax=codes, offset=offset, nested_absmax=a2, nested_code=codebooks.codebook("dynamic8"), **fields
    )


def dequantize_4bit(packed: npt.ArrayLike, state: QuantState, *, profile: str | None = None) -> npt.NDArray[Any]:
    """x̂_i = RNE_dtype(f32(code[nib_i] · a_{i // bs})) with the shape and dtype of the quantized
    input (spec/nf4.md §6). For a nested state a_b is first rebuilt from its 8-bit codes (§7).
    ``profile`` defaults to the state's; it changes the sign of FP4's zero nibble 8, and bitsandbytes-cuda
    flushes subnormal scales and products to signed zeros (§15.1)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a refimpl.quant.QuantState, got {_checks.describe(state)}")
    prof = state.profile if profile is None else profile_name(profile)
    n = state.n
    p = _checks._to_numpy(packed, "packed")
    if p.dtype != np.uint8:
        raise TypeError(f"packed: expected uint8 packed codes, got {_checks.describe(p)}")
    if p.size != (n + 1) // 2:
        raise ValueError(
            f"packed: state describes shape {state.shape} ({n} elements, {(n + 1) // 2} bytes), got {p.size} bytes"
        )
    with np.errstate(invalid="ignore", over="ignore"):
        return _dequantize_4bit_core(
            unpack_nibbles(p, n),
            dequantization_code(state, prof),
            block_scales(state, prof),
            state.blocksize,
            state.dtype,
            state.shape,
            _STEPS[prof],
        )


def block_scales(state: QuantState, profile: str | None = None) -> npt.NDArray[np.float32]:
    """The float32 scale of each block as ``profile`` dequantizes it: stored, or rebuilt from the nested
    statistics by the profile's ``nested_scales`` (§7; bitsandbytes' CUDA kernels flush subnormals, §15.1)."""
    if not state.nested:
        return np.asarray(state.absmax, dtype=np.float32).reshape(-1).copy()
    nested_absmax, nested_code, offset = state._nested_parts()
    rule = _STEPS[state.profile if profile is None else profile_name(profile)].nested_scales
    return nested.dequantize_nested_absmax(
        state.absmax, nested_absmax, nested_code, offset, state.nested_blocksize, rule=rule
    )


def quantize_blockwise_8bit(
    x: npt.ArrayLike, blocksize: int = 256, *, profile: str = "reference", nonfinite: str | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """8-bit blockwise quantization with the dynamic map d (arXiv 1511.04561; spec/nf4.md §8).

    a_k = max |x| per block (float32; NaN is skipped, as bitsandbytes' C++ and CUDA loops do),
    v = clamp(f32(x · f32(1/a_k)), −1, 1), then the code of v:
    reference: the number of float32 midpoints of d strictly below v (nearest, ties low);
    bitsandbytes-cpu: the 65,536-bin lookup table (not nearest; spec §8.2);
    bitsandbytes-cuda: the kernel's bisection (nearest, ties depend on the side).
    A block with a_k = 0 gets code 0 on CPU.
    Returns (codes uint8 with x's shape, absmax float32 of shape (⌈n/blocksize⌉,)).
    """
    ops = quant_operands(x, blocksize, profile=profile, nonfinite=nonfinite)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        codes, absmax = _quantize_8bit_core(ops.x32(), ops.blocksize, _STEPS[ops.profile])
    return codes.reshape(ops.shape), absmax


def dequantize_blockwise_8bit(
    codes: npt.ArrayLike, absmax: npt.ArrayLike, blocksize: int = 256
) -> npt.NDArray[np.float32]:
    """x̂_i = f32(d[q_i] · a_{i // blocksize}) with the dynamic map d; float32 with the codes' shape."""
    q = _checks._to_numpy(codes, "codes")
    if q.dtype != np.uint8:
        raise TypeError(f"codes: expected a uint8 array, got {_checks.describe(q)}")
    bs = valid_blocksize(blocksize)
    a = _checks._to_numpy(absmax, "absmax")
    if a.dtype != np.float32:
        raise TypeError(f"absmax: expected a float32 array, got {_checks.describe(a)}")
    nblocks = -(-q.size // bs)
    if a.size != nblocks:
        raise ValueError(f"absmax: expected {nblocks} values for {q.size} codes at blocksize {bs}, got {a.size}")
    scale = np.repeat(a.reshape(-1), bs)[: q.size]
    with np.errstate(invalid="ignore", over="ignore"):
        return (codebooks.codebook("dynamic8")[q.reshape(-1)] * scale).astype(np.float32).reshape(q.shape)


def storage_bits_per_parameter(
    blocksize: int = 64, double_quant: bool = False, nested_blocksize: int = NESTED_BLOCKSIZE
) -> float:
    """Bits stored per weight: 4 + 32/blocksize, or with double quantization
    4 + 8/blocksize + 32/(blocksize · nested_blocksize) (QLoRA §3: 0.5 vs 0.127 bits of overhead
    at blocksize 64); the one float32 offset per tensor is not counted."""
    bs = valid_blocksize(blocksize)
    if not _checks.boolean(double_quant, "double_quant"):
        return 4 + 32 / bs
    nbs = _checks.integer(nested_blocksize, "nested_blocksize", low=1)
    return 4 + 8 / bs + 32 / (bs * nbs)


# ---------------------------------------------------------------------------------------------------
# one step of a profile, for the kernels, the checker and the tests


def nibbles_of_scaled(s: npt.ArrayLike, quant_type: str, profile: str = "reference") -> npt.NDArray[np.uint8]:
    """The 4-bit code of each scaled value s (float32) under ``profile``: the number of float32 midpoints
    strictly below s (ties to the lower code), mapped to the nibble; NaN → position 15 (CPU rules) or
    nibble 0 (CUDA's decision trees, which compare with the kernels' float literals)."""
    return profile_steps(profile).nibbles(np.asarray(s, dtype=np.float32), quant_type)


def fp4_zero_is_negative(profile: str, shape: tuple[int, ...]) -> bool:
    """Sign of FP4 nibble 8 on dequantization: +0.0 in the reference (torch table); bitsandbytes CPU
    (AVX2) uses its C++ scalar table (−0.0) unless shape[-1] is odd (torch fallback, +0.0); CUDA −0.0."""
    return profile_steps(profile).fp4_zero_is_negative(shape)


def dequantization_code(state: QuantState, profile: str) -> npt.NDArray[np.float32]:
    """The 16 float32 values by nibble that ``profile`` dequantizes ``state`` with: ``state.code``, with FP4's
    nibble 8 as −0.0 where the profile's table holds it."""
    code = np.asarray(state.code, dtype=np.float32).copy()
    if state.quant_type == "fp4" and fp4_zero_is_negative(profile, state.shape):
        code[8] = np.float32(-0.0)
    return code
