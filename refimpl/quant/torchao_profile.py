"""torchao's NF4 rules (``torchao.dtypes.nf4tensor.NF4Tensor``, torchao 0.17.0 on CPU), bit for bit.

torchao quantizes a weight to NF4 with the same storage idea as QLoRA (Dettmers et al., arXiv 2305.14314,
eq. 1–2) but with its own rules at every step. In the input's dtype D (bfloat16, float16 or float32; every
arithmetic step is computed in float32 and rounded to D, as torch's CPU kernels do for the 16-bit dtypes):

    codebook   c_j   = D(NF4 level j rounded to 4 decimals)      (−1.0000, −0.6962, …, 0.7230, 1.0000)
    absmax     a_b   = max_{i ∈ b} |x_i|                          (in D; no clamp: subnormal blocks are kept)
    scaled     s_i   = D(x_i / a_b)                               (a true division, not x·(1/a))
    distance   d_ij  = |D(s_i − c_j)|                             (in D: many near-ties become exact ties)
    nibble     q_i   = min argmin_j d_ij                          (ties go to the lower code; NaN → code 0)

The block scales are always double-quantized, linearly to int8 (not with the 8-bit dynamic map):

    mean   μ   = D(mean(a))                         (torch's float32 CPU sum of the D values, / n, rounded to D)
    centred c_b = D(a_b − μ)
    per group g of ``scaler_block_size`` scales:  a2_g = max |c_b|,  f_g = D(256 / D(2·a2_g))
    codes  k_b = int8(clamp(round_half_even(D(c_b · f_g)), −128, 127))
    scale  â_b = D(D(k_b / f_g) + μ),   dequantized  x̂_i = D(c[q_i] · â_b)

An all-zero block has a_b = 0, so s = 0/0 = NaN and every nibble is code 0 (−1.0): torchao's bug, not part
of this profile. ``quantize`` applies the rule the format intends (s = 0 → the zero code) unless
``zero_block="nan"`` asks for torchao's actual behaviour (the reproducer and the tests use both).

A torchao NF4 tensor is written as a refimpl ``QuantState`` (``as_quant_state``): ``absmax`` holds the int8
codes k viewed as uint8, ``nested_absmax`` the float32 values of the factors f_g, ``offset`` μ,
``nested_code`` the int8 value of each uint8 index (so the record is complete and lossless), and
``nested_blocksize`` the scaler block size. That record follows torchao's scale rule, not
``QuantState.block_absmax``'s: use ``block_scales`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from refimpl import _checks
from refimpl.quant import nested
from refimpl.quant.blockwise import pack_nibbles, unpack_nibbles
from refimpl.quant.operands import float_input_array
from refimpl.quant.state import QuantState

#: torchao's NF4 table as written in nf4tensor.py (4 decimals), index = nibble.
CODEBOOK_4DP = (
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
)
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
#: the int8 value of each uint8 index (the ``nested_code`` of a torchao state)
INT8_OF_UINT8 = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32)


def _in(dtype: np.dtype, v: Any) -> np.ndarray:
    """Round float32 (or float64) values to D, back as float32 (what the next step computes with)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(v).astype(dtype).astype(np.float32)


def codebook(dtype: str = "bfloat16") -> npt.NDArray[np.float32]:
    """torchao's 16 NF4 levels in ``dtype`` (as float32 values)."""
    return _in(DTYPES[_checks.choice(dtype, "dtype", tuple(DTYPES))], np.array(CODEBOOK_4DP, dtype=np.float64))


def nearest_code(s: npt.NDArray[np.float32], code: npt.NDArray[np.float32], dtype: np.dtype) -> npt.NDArray[np.uint8]:
    """argmin_j |D(s − c_j)| with the first (lowest) index among ties; NaN distances pick index 0
    (torch's ``min(dim).indices`` returns the first NaN)."""
    with np.errstate(invalid="ignore"):
        d = np.abs(_in(dtype, s[:, None] - code[None, :]))
    d = np.where(np.isnan(d), -np.inf, d)  # a NaN is the minimum torch returns: index of the first one
    return np.argmin(d, axis=1).astype(np.uint8)


def mean_of_scales(a: npt.NDArray[np.float32], dtype: np.dtype) -> np.float32:
    """torch.mean on CPU: the float32 cascade sum of the (upcast) values, divided by n, rounded to D."""
    total = nested.torch_cpu_sum_float32(a.astype(np.float32))
    return np.float32(_in(dtype, np.float32(total / np.float32(a.size))))


@dataclass(frozen=True)
class ScaleCodes:
    """torchao's int8 double quantization of the block scales."""

    codes: np.ndarray  #: int8 per block
    factor: np.ndarray  #: float32 values (in D) per scaler block: f = 256 / (2·a2)
    mean: np.float32


def quantize_scales(absmax: npt.NDArray[np.float32], dtype: np.dtype, scaler_block_size: int) -> ScaleCodes:
    """The int8 linear quantization of the block scales (module docstring)."""
    mu = mean_of_scales(absmax, dtype)
    centred = _in(dtype, absmax - mu)
    groups = centred.reshape(-1, scaler_block_size)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a2 = np.abs(groups).max(axis=1)
        factor = _in(dtype, np.float32(256) / _in(dtype, np.float32(2) * a2))
        q = np.round(_in(dtype, groups * factor[:, None]))  # round half to even, as torch.round
        q = np.clip(q, -128, 127)
        # torch's float → int8 conversion of a NaN (0·inf when every scale equals the mean) gives 0 on x86
        codes = np.where(np.isnan(q), 0, q).astype(np.int8).reshape(-1)
    return ScaleCodes(codes=codes, factor=factor.astype(np.float32), mean=mu)


def dequantize_scales(sc: ScaleCodes, dtype: np.dtype, scaler_block_size: int) -> npt.NDArray[np.float32]:
    """â_b = D(D(k_b / f_g) + μ) as float32 values."""
    k = sc.codes.astype(np.float32).reshape(-1, scaler_block_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _in(dtype, _in(dtype, k / sc.factor[:, None]).reshape(-1) + sc.mean)


def default_scaler_block_size(n_blocks: int) -> int:
    """The scaler block size the refimpl adapter passes to torchao (which needs it to divide the number of
    blocks): 256 where it divides, else the largest divisor of n_blocks below 256."""
    return max(d for d in range(1, min(256, n_blocks) + 1) if n_blocks % d == 0)


def unsupported(shape: tuple[int, ...], blocksize: int) -> str | None:
    """Why torchao's NF4Tensor.from_tensor does not take a tensor of this shape, or None."""
    n = int(np.prod(shape))
    if len(shape) > 2:
        return "NF4Tensor.from_tensor asserts dim <= 2"
    if n % blocksize:
        return "NF4Tensor.from_tensor asserts numel % block_size == 0 (no tail block)"
    return None


def quantize(
    x: npt.ArrayLike, blocksize: int = 64, scaler_block_size: int | None = None, *, zero_block: str = "zero"
) -> tuple[npt.NDArray[np.uint8], QuantState]:
    """torchao's ``to_nf4(x, blocksize, scaler_block_size)`` as (packed, QuantState) (module docstring).

    zero_block: "zero" (an all-zero block gets the zero code, as the format intends) or "nan" (torchao 0.17's
    0/0 = NaN, code 0 = −1.0).
    """
    arr = float_input_array(x, "x")
    name = {np.dtype(v): k for k, v in DTYPES.items()}.get(np.dtype(arr.dtype))
    if name is None:
        raise TypeError(f"x: torchao quantizes bfloat16, float16 or float32, got {_checks.describe(arr)}")
    zero_block = _checks.choice(zero_block, "zero_block", ("zero", "nan"))
    shape = tuple(int(s) for s in arr.shape)
    why = unsupported(shape, blocksize)
    if why:
        raise ValueError(f"x: {why}, got shape {shape} with blocksize {blocksize}")
    dt = DTYPES[name]
    flat = arr.reshape(-1).astype(np.float32)
    n_blocks = flat.size // blocksize
    sbs = (
        default_scaler_block_size(n_blocks)
        if scaler_block_size is None
        else _checks.integer(scaler_block_size, "scaler_block_size", low=1)
    )
    if n_blocks % sbs:
        raise ValueError(f"scaler_block_size: expected a divisor of the {n_blocks} blocks, got {sbs}")
    blocks = flat.reshape(n_blocks, blocksize)
    with np.errstate(invalid="ignore"):
        absmax = np.abs(blocks).max(axis=1)  # NaN propagates, as torch's max does
    with np.errstate(divide="ignore", invalid="ignore"):
        s = _in(dt, blocks / absmax[:, None]).reshape(-1)
    if zero_block == "zero":
        s = np.where(np.repeat(absmax == 0, blocksize), np.float32(0), s).astype(np.float32)
    code = codebook(name)
    packed = pack_nibbles(nearest_code(s, code, dt))
    sc = quantize_scales(absmax, dt, sbs)
    return packed, as_quant_state(shape, name, blocksize, sc, sbs)


def as_quant_state(
    shape: tuple[int, ...], dtype: str, blocksize: int, sc: ScaleCodes, scaler_block_size: int
) -> QuantState:
    """A torchao NF4 tensor's metadata as a refimpl QuantState (module docstring)."""
    return QuantState(
        shape=shape,
        dtype=dtype,
        blocksize=blocksize,
        quant_type="nf4",
        absmax=sc.codes.view(np.uint8),
        code=codebook(dtype),
        offset=sc.mean,
        nested_absmax=sc.factor,
        nested_code=INT8_OF_UINT8,
        nested_blocksize=scaler_block_size,
    )


def scale_codes(state: QuantState) -> ScaleCodes:
    """The int8 scale codes of a torchao state (``as_quant_state``)."""
    if state.nested_absmax is None or state.offset is None:
        raise ValueError("state: expected a torchao (double-quantized) state, got one with plain scales")
    return ScaleCodes(codes=state.absmax.view(np.int8), factor=state.nested_absmax, mean=np.float32(state.offset))


def block_scales(state: QuantState) -> npt.NDArray[np.float32]:
    """The per-block scales â_b of a torchao state, by torchao's rule (float32 values of D)."""
    return dequantize_scales(scale_codes(state), DTYPES[state.dtype], state.nested_blocksize)


def dequantize(packed: npt.ArrayLike, state: QuantState) -> npt.NDArray[Any]:
    """torchao's ``NF4Tensor.get_original_weight``: x̂_i = D(c[q_i] · â_b), shape and dtype of the input."""
    dt = DTYPES[state.dtype]
    nib = unpack_nibbles(np.asarray(packed, dtype=np.uint8), state.n)
    scale = np.repeat(block_scales(state), state.blocksize)
    with np.errstate(invalid="ignore", over="ignore"):
        return (np.asarray(state.code, np.float32)[nib] * scale).astype(dt).reshape(state.shape)
