"""Blockwise 4-bit (NF4/FP4) and 8-bit quantization, nibble packing (spec/nf4.md §4–§8).

QLoRA (Dettmers et al., arXiv 2305.14314, eq. 1–2) stores a weight tensor X as
4-bit codes plus one float32 scale per block of ``blocksize`` consecutive
elements of the flattened tensor:

    a_b   = max_{i ∈ b} |x_i|                          (absmax, float32)
    s_i   = clamp(x_i · f32(1 / a_b), −1, 1)           (full blocks; the tail block divides)
    q_i   = #{ j : m_j < s_i }                          (m = float32 midpoints of the sorted codebook)
    nib_i = q_i (NF4)  or  FP4_ORDER[q_i] (FP4)
    x̂_i  = RNE_dtype( f32(code[nib_i] · a_b) )         (dequantization)

All arithmetic is IEEE float32, as NF4 is defined. Profiles (spec/nf4.md §9):

* ``reference``: the rules above (bitsandbytes ≥ 0.50 CPU rules for finite data); NaN/±inf
  raise unless ``nonfinite="propagate"``; float64 input is rounded once to float32.
* ``bitsandbytes-cpu``: bitsandbytes 0.50.2 on CPU, bit for bit, special values included.
* ``bitsandbytes-cuda``: the CUDA kernels' rules where they differ (NaN-ignoring absmax,
  flush-to-zero, the fast-math reciprocal rcp.approx.ftz.f32 (``cuda_rcp``), NaN → nibble 0,
  FP4 literal thresholds and zero sign, the 8-bit bisection).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from refimpl import _checks
from refimpl.quant import codebooks, cuda_rcp, nested
from refimpl.quant.state import PROFILES, QuantState

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_INPUT_DTYPES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float64): "float64",
}
_TINY = np.float32(1e-38)  # bitsandbytes' clamp of the scale denominator (0x006ce3ee, subnormal)
_FLT_MIN = np.float32(np.finfo(np.float32).tiny)
_FLT_MAX = np.float32(np.finfo(np.float32).max)
_TORCH_CLAMP_NAN = np.array(0xFFFFFFFF, dtype=np.uint32).view(np.float32)


# ---------------------------------------------------------------------------------------------------
# argument handling


def _profile(profile: Any) -> str:
    return _checks.choice(profile, "profile", PROFILES)


def _nonfinite_mode(nonfinite: Any, profile: str) -> str:
    if nonfinite is None:
        return "raise" if profile == "reference" else "propagate"
    return _checks.choice(nonfinite, "nonfinite", ("raise", "propagate"))


def float_input_array(x: Any, name: str) -> np.ndarray:
    """x as a non-empty NumPy array of dtype float32, float16, bfloat16 or float64 (not converted;
    NaN/inf are left to the profile's special-value rules, which ``_checks.float_array`` would reject)."""
    arr = _checks._to_numpy(x, name)  # refuses masked arrays and np.matrix
    if np.dtype(arr.dtype) not in _INPUT_DTYPES:
        raise TypeError(f"{name}: expected a float32, float16 or bfloat16 array (float64: reference profile "
                        f"only), got {_checks.describe(arr)}")
    if arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got {_checks.describe(arr)}")
    return arr


def _float32_input(x: Any, name: str, profile: str, nonfinite: str) -> tuple[np.ndarray, str, tuple]:
    """Validate x and return (flattened float32 copy, dtype name, shape)."""
    arr = float_input_array(x, name)
    dtype_name = _INPUT_DTYPES[np.dtype(arr.dtype)]
    if dtype_name == "float64" and profile != "reference":
        raise TypeError(f"{name}: profile {profile!r} accepts float32, float16 or bfloat16 (bitsandbytes "
                        f"refuses float64), got {_checks.describe(arr)}; use profile='reference', which "
                        f"rounds float64 to float32 once")
    flat = arr.reshape(-1).astype(np.float32)
    if nonfinite == "raise":
        bad = ~np.isfinite(flat)
        if dtype_name == "float64":
            bad |= ~np.isfinite(arr.reshape(-1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}: expected finite values (or nonfinite='propagate'), got "
                             f"{flat[i]} at flat index {i}")
    return flat, dtype_name, tuple(int(s) for s in arr.shape)


def _blocksize(blocksize: Any, name: str = "blocksize") -> int:
    bs = _checks.integer(blocksize, name)
    if bs not in BLOCKSIZES:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, BLOCKSIZES))}, got {bs}")
    return bs


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
# 4-bit quantization


def _ftz(v: np.ndarray) -> np.ndarray:
    """CUDA --use_fast_math flushes float32 subnormals to (signed) zero."""
    return np.where(np.abs(v) < _FLT_MIN, np.copysign(np.float32(0), v), v).astype(np.float32)


def _block_absmax_and_scaled(x: np.ndarray, bs: int, profile: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-block absmax (as stored) and the scaled values s, both float32 (padding not included)."""
    n = x.size
    full = n - n % bs
    blocks = x[:full].reshape(-1, bs)
    tail = x[full:]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if profile == "bitsandbytes-cuda":
            ax = _ftz(np.abs(x))
            absmax = np.fmax.reduce(ax[:full].reshape(-1, bs), axis=1, initial=-_FLT_MAX).astype(np.float32)
            if tail.size:
                absmax = np.append(absmax, np.fmax.reduce(ax[full:], initial=np.float32(0)))
            # 1.0f / absmax under --use_fast_math is rcp.approx.ftz.f32 (measured table, spec §15).
            inv = cuda_rcp.rcp_approx_ftz(absmax)
            scaled = (_ftz(x) * np.repeat(inv, bs)[:n]).astype(np.float32)
            return absmax, scaled
        absmax = np.abs(blocks).max(axis=1).astype(np.float32) if full else np.zeros(0, np.float32)
        inv = (np.float32(1) / np.maximum(absmax, _TINY)).astype(np.float32)
        scaled = np.clip(blocks * inv[:, None], np.float32(-1), np.float32(1)).reshape(-1)
        if tail.size:
            am = np.maximum(np.abs(tail).max(), _TINY).astype(np.float32)
            if profile == "bitsandbytes-cpu" and np.isnan(am):
                am = _TORCH_CLAMP_NAN  # torch's vectorized clamp returns an all-ones NaN
            absmax = np.append(absmax, am)
            scaled = np.concatenate([scaled, np.clip(tail / am, np.float32(-1), np.float32(1))])
    return absmax.astype(np.float32), scaled.astype(np.float32)


def nibbles_of_scaled(s: np.ndarray, quant_type: str, profile: str = "reference") -> np.ndarray:
    """The 4-bit code of each scaled value s (float32): the number of float32 midpoints strictly
    below s (ties to the lower code), mapped to the nibble. NaN → position 15 (CPU rules) or
    nibble 0 (CUDA decision trees). The CUDA profile compares with the kernels' float literals:
    NF4's 15 (``codebooks.nf4_cuda_thresholds``), FP4's 7 on |s| with the sign bit of s < 0."""
    s = np.asarray(s, dtype=np.float32)
    if profile == "bitsandbytes-cuda" and quant_type == "fp4":
        thresholds = np.array(codebooks.FP4_CUDA_THRESHOLDS, dtype=np.float32)
        mag = np.searchsorted(thresholds, np.abs(s), side="left")  # ties → lower magnitude
        mag = np.where(np.isnan(s), 0, mag)
        codes = np.array(codebooks.FP4_CUDA_MAGNITUDE_CODES, dtype=np.uint8)[mag]
        return (codes | np.where(s < 0, np.uint8(8), np.uint8(0))).astype(np.uint8)
    if profile == "bitsandbytes-cuda":  # NF4: the kernel's literals, 4 of them 1 ulp off the midpoints
        bounds = codebooks.nf4_cuda_thresholds()
    else:
        bounds = codebooks.midpoints(quant_type)
    pos = np.searchsorted(bounds, s, side="left")  # NaN sorts last → 15
    nib = codebooks.nibble_of_position(quant_type)[pos]
    if profile == "bitsandbytes-cuda":
        nib = np.where(np.isnan(s), np.uint8(0), nib).astype(np.uint8)
    return nib


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
    profile = _profile(profile)
    mode = _nonfinite_mode(nonfinite, profile)
    bs = _blocksize(blocksize)
    _checks.choice(quant_type, "quant_type", codebooks.QUANT_TYPES)
    double_quant = _checks.boolean(double_quant, "double_quant")
    threads = _checks.integer(threads, "threads", low=1)
    flat, dtype_name, shape = _float32_input(x, "x", profile, mode)

    absmax, scaled = _block_absmax_and_scaled(flat, bs, profile)
    if flat.size % 2:
        # The pad element: s = 0 on CPU; on CUDA the zero-padded load is scaled like its block.
        pad_s = np.float32(0)
        if profile == "bitsandbytes-cuda":
            with np.errstate(invalid="ignore", divide="ignore"):
                pad_s = np.float32(0) * cuda_rcp.rcp_approx_ftz(absmax[-1:])[0]
        scaled = np.append(scaled, np.float32(pad_s))
    packed = pack_nibbles(nibbles_of_scaled(scaled, quant_type, profile))

    code = codebooks.codebook(quant_type)
    if not double_quant:
        return packed, QuantState(shape=shape, dtype=dtype_name, blocksize=bs, quant_type=quant_type,
                                  absmax=absmax, code=code, profile=profile)
    offset = nested.absmax_offset(absmax, profile, threads=threads)
    with np.errstate(invalid="ignore", over="ignore"):
        centred = (absmax - offset).astype(np.float32)
    codes, a2 = quantize_blockwise_8bit(centred, NESTED_BLOCKSIZE, profile=profile, nonfinite="propagate")
    return packed, QuantState(shape=shape, dtype=dtype_name, blocksize=bs, quant_type=quant_type,
                              absmax=codes, code=code, offset=offset, nested_absmax=a2,
                              nested_code=codebooks.codebook("dynamic8"), profile=profile)


def _bf16_cpp(values: np.ndarray) -> np.ndarray:
    """bitsandbytes' C++ float_to_bf16: (bits + 0x7FFF + lsb) >> 16 in uint32 arithmetic. Round to
    nearest even for numbers; a NaN whose bits are ≥ 0xFFFF8000 wraps around to +0.0 (spec §5)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFFFFFF
    return (rounded >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)


def _cast_output(values: np.ndarray, dtype_name: str, cpp_bf16: bool = False) -> np.ndarray:
    """Round float32 values to the output dtype, round to nearest even (float64 is exact)."""
    if cpp_bf16 and dtype_name == "bfloat16":
        return _bf16_cpp(values)
    target = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(target)


def fp4_zero_is_negative(profile: str, shape: tuple[int, ...]) -> bool:
    """Sign of FP4 nibble 8 on dequantization: +0.0 in the reference (torch table); bitsandbytes CPU
    (AVX2) uses its C++ scalar table (−0.0) unless shape[-1] is odd (torch fallback, +0.0); CUDA −0.0."""
    if profile == "bitsandbytes-cuda":
        return True
    if profile == "bitsandbytes-cpu":
        return len(shape) > 0 and shape[-1] % 2 == 0
    return False


def dequantize_4bit(packed: npt.ArrayLike, state: QuantState, *, profile: str | None = None) -> npt.NDArray[Any]:
    """x̂_i = RNE_dtype(f32(code[nib_i] · a_{i // bs})) with the shape and dtype of the quantized
    input (spec/nf4.md §6). For a nested state a_b is first rebuilt from its 8-bit codes (§7).
    ``profile`` defaults to the state's; it only changes the sign of FP4's zero nibble 8."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a refimpl.quant.QuantState, got {_checks.describe(state)}")
    profile = state.profile if profile is None else _profile(profile)
    n = state.n
    p = _checks._to_numpy(packed, "packed")
    if p.dtype != np.uint8:
        raise TypeError(f"packed: expected uint8 packed codes, got {_checks.describe(p)}")
    if p.size != (n + 1) // 2:
        raise ValueError(f"packed: state describes shape {state.shape} ({n} elements, {(n + 1) // 2} bytes), "
                         f"got {p.size} bytes")
    nib = unpack_nibbles(p, n)
    code = np.asarray(state.code, dtype=np.float32).copy()
    if state.quant_type == "fp4" and fp4_zero_is_negative(profile, state.shape):
        code[8] = np.float32(-0.0)
    scale = np.repeat(state.block_absmax(), state.blocksize)[:n]
    with np.errstate(invalid="ignore", over="ignore"):
        values = (code[nib] * scale).astype(np.float32)
    cpp_path = profile == "bitsandbytes-cpu" and fp4_zero_is_negative(profile, state.shape)  # C++ kernel
    return _cast_output(values, state.dtype, cpp_path).reshape(state.shape)


# ---------------------------------------------------------------------------------------------------
# 8-bit blockwise quantization (the nested statistics)


def _dynamic_midpoints(code: np.ndarray) -> np.ndarray:
    return codebooks.float32_midpoints(code)


def _cpu_lut(code: np.ndarray) -> np.ndarray:
    """bitsandbytes CPU 8-bit rule: a 65,536-entry table over v ∈ [−1, 1];
    LUT[i] = #{ j : m_j < f32(−1 + f32(f32(2i) / 65535)) }."""
    i = np.arange(65536, dtype=np.float32)
    grid = (np.float32(-1) + (np.float32(2) * i) / np.float32(65535)).astype(np.float32)
    return np.searchsorted(_dynamic_midpoints(code), grid, side="left").astype(np.uint8)


_LUT_CACHE: dict[bytes, np.ndarray] = {}


def _cuda_binary_search(code: np.ndarray, v: np.ndarray) -> np.ndarray:
    """CUDA dQuantize<0>: 7 bisection steps from pivot 127 (comparisons x > code[pivot]) leave the
    final pivot p and the last compared pivots below (l) and above (h); the result is h if
    x > f32((code[h] + code[p])/2) (when x > code[p]), l if x < f32((code[l] + code[p])/2)
    (otherwise), else p. All in float32; an exact tie keeps p."""
    pivot = np.full(v.shape, 127, dtype=np.int64)
    upper = np.full(v.shape, 255, dtype=np.int64)
    lower = np.zeros(v.shape, dtype=np.int64)
    step = 64
    while step > 0:
        gt = v > code[pivot]
        lower = np.where(gt, pivot, lower)
        upper = np.where(gt, upper, pivot)
        pivot = np.where(gt, pivot + step, pivot - step)
        step >>= 1
    val = code[pivot]
    half = np.float32(0.5)
    up_mid = ((code[upper] + val) * half).astype(np.float32)
    low_mid = ((code[lower] + val) * half).astype(np.float32)
    above = v > val
    q = np.where(above, np.where(v > up_mid, upper, pivot), np.where(v < low_mid, lower, pivot))
    return q.astype(np.uint8)


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
    profile = _profile(profile)
    mode = _nonfinite_mode(nonfinite, profile)
    bs = _blocksize(blocksize)
    flat, _dtype_name, shape = _float32_input(x, "x", profile, mode)
    n = flat.size
    nblocks = -(-n // bs)
    padded = np.zeros(nblocks * bs, dtype=np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nblocks, bs)
    code = codebooks.codebook("dynamic8")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if profile == "bitsandbytes-cuda":
            ab = _ftz(np.abs(blocks))
            absmax = np.fmax.reduce(ab, axis=1, initial=-_FLT_MAX).astype(np.float32)
            if n % bs:  # zero padding takes part in the tail's max
                absmax[-1] = np.fmax(absmax[-1], np.float32(0))
            inv = cuda_rcp.rcp_approx_ftz(absmax)
            v = (_ftz(blocks) * inv[:, None]).astype(np.float32).reshape(-1)[:n]
            q = _cuda_binary_search(code, v)
        else:
            # The C++ loop keeps max(a, |x|) from a = 0, which skips NaN (the zero padding is harmless).
            absmax = np.fmax.reduce(np.abs(blocks), axis=1, initial=np.float32(0)).astype(np.float32)
            inv = (np.float32(1) / absmax).astype(np.float32)
            v = np.clip(blocks * inv[:, None], np.float32(-1), np.float32(1)).astype(np.float32)
            v = v.reshape(-1)[:n]
            if profile == "bitsandbytes-cpu":
                key = code.tobytes()
                if key not in _LUT_CACHE:
                    _LUT_CACHE[key] = _cpu_lut(code)
                t = ((v + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5))
                idx = np.nan_to_num(t.astype(np.float32), nan=0.0).astype(np.int64)
                q = _LUT_CACHE[key][np.clip(idx, 0, 65535)]
            else:
                q = np.searchsorted(_dynamic_midpoints(code), v, side="left").clip(0, 255).astype(np.uint8)
            q = np.where(np.repeat(absmax == 0, bs)[:n], np.uint8(0), q).astype(np.uint8)
    return q.reshape(shape), absmax


def dequantize_blockwise_8bit(codes: npt.ArrayLike, absmax: npt.ArrayLike,
                              blocksize: int = 256) -> npt.NDArray[np.float32]:
    """x̂_i = f32(d[q_i] · a_{i // blocksize}) with the dynamic map d; float32 with the codes' shape."""
    q = _checks._to_numpy(codes, "codes")
    if q.dtype != np.uint8:
        raise TypeError(f"codes: expected a uint8 array, got {_checks.describe(q)}")
    bs = _blocksize(blocksize)
    a = _checks._to_numpy(absmax, "absmax")
    if a.dtype != np.float32:
        raise TypeError(f"absmax: expected a float32 array, got {_checks.describe(a)}")
    nblocks = -(-q.size // bs)
    if a.size != nblocks:
        raise ValueError(f"absmax: expected {nblocks} values for {q.size} codes at blocksize {bs}, got {a.size}")
    scale = np.repeat(a.reshape(-1), bs)[: q.size]
    with np.errstate(invalid="ignore", over="ignore"):
        return (codebooks.codebook("dynamic8")[q.reshape(-1)] * scale).astype(np.float32).reshape(q.shape)


def storage_bits_per_parameter(blocksize: int = 64, double_quant: bool = False,
                               nested_blocksize: int = NESTED_BLOCKSIZE) -> float:
    """Bits stored per weight: 4 + 32/blocksize, or with double quantization
    4 + 8/blocksize + 32/(blocksize · nested_blocksize) (QLoRA §3: 0.5 vs 0.127 bits of overhead
    at blocksize 64); the one float32 offset per tensor is not counted."""
    bs = _blocksize(blocksize)
    if not _checks.boolean(double_quant, "double_quant"):
        return 4 + 32 / bs
    nbs = _checks.integer(nested_blocksize, "nested_blocksize", low=1)
    return 4 + 8 / bs + 32 / (bs * nbs)
