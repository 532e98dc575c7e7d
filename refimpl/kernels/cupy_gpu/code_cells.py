"""The 4-bit code of a scaled value s as one table lookup keyed by the high bits of s (GPU quantization).

bitsandbytes' CUDA rule (the ``bitsandbytes-cuda`` profile, spec/nf4.md §4.4 and §15) counts the
thresholds below s: NF4 has 15 (``s > t``), FP4 7 on |s| plus the sign. Done as comparisons that is
15–30 instructions an element, and the quantize kernel becomes issue-bound. Instead:

* a float's bits, made order-preserving (the key k: NF4 orders by s, so negative values have their
  magnitude bits flipped; FP4 orders by |s| within a sign, so the raw bits serve), are cut into
  2^CELL_BITS cells by their top CELL_BITS bits (sign, exponent, top two mantissa bits);
* no cell holds more than one threshold (checked when the table is built), so within a cell the code
  takes at most two values: ``lo`` below the cell's threshold and ``hi`` above it;
* entry = thr << 11 | hi << 4 | lo, where thr is the key's low 21 bits at the last value still coded
  ``lo``, and the code is ``(e >> (k << 11 > e ? 4 : 0)) & 15``: the comparison of the shifted key with
  the whole entry is the comparison of the low bits with thr, because lo and hi sit below bit 11.

The table is derived from ``refimpl.quant.profiles.bitsandbytes_cuda.nibbles`` by bisection over each
cell, so the lookup is that rule by construction, for every float32 but ±inf: the cells of exponent 255
hold NaN's code (0). In the kernel s = ftz(x) · rcp.approx(absmax) with |x| ≤ absmax, so s is never
infinite (a zero or subnormal absmax makes every s = 0 · inf = NaN; an infinite absmax makes s = 0 or NaN).
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from refimpl.quant import codebooks
from refimpl.quant.profiles import bitsandbytes_cuda

#: sign + 8 exponent bits + the top 2 mantissa bits: the fewest for which no cell holds two NF4 thresholds
CELL_BITS = 11
_LOW = 32 - CELL_BITS
_LOW_MASK = np.uint32((1 << _LOW) - 1)
_SIGN = np.uint32(0x80000000)


def key_of_bits(bits: npt.NDArray[np.uint32], quant_type: str) -> npt.NDArray[np.uint32]:
    """The cell key of float32 bit patterns: NF4 by the order of s (unsigned, monotone), FP4 the raw bits."""
    bits = np.asarray(bits, dtype=np.uint32)
    if quant_type != "nf4":
        return bits
    flip = (bits.view(np.int32) >> 31).view(np.uint32) >> np.uint32(1)
    return bits ^ flip ^ _SIGN


def _bits_of_key(key: npt.NDArray[np.uint32], quant_type: str) -> npt.NDArray[np.uint32]:
    if quant_type != "nf4":
        return key
    b = key ^ _SIGN
    return b ^ ((b.view(np.int32) >> 31).view(np.uint32) >> np.uint32(1))


def _codes(key: npt.NDArray[np.uint32], quant_type: str) -> npt.NDArray[np.int64]:
    s = _bits_of_key(key, quant_type).view(np.float32)
    with np.errstate(invalid="ignore"):
        return bitsandbytes_cuda.nibbles(s, quant_type).astype(np.int64)


def _rank(key: npt.NDArray[np.uint32], quant_type: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(magnitude rank, sign rank), each non-decreasing in the key within a cell; their steps are the code's.

    NF4: (the code, 0). FP4: (the number of literals below |s|, s < 0): the sign step is −0 → the negative
    subnormals, where the magnitude rank is constant."""
    if quant_type == "nf4":
        return _codes(key, quant_type), np.zeros(key.size, dtype=np.int64)
    s = key.view(np.float32)
    with np.errstate(invalid="ignore"):
        mag = np.searchsorted(np.array(codebooks.FP4_CUDA_THRESHOLDS, dtype=np.float32), np.abs(s), side="left")
        return mag.astype(np.int64), (s < 0).astype(np.int64)


@functools.cache
def cell_table(quant_type: str) -> npt.NDArray[np.uint32]:
    """The 2^CELL_BITS entries thr << 11 | hi << 4 | lo (module docstring); raises if a cell holds two steps."""
    lo_key = np.arange(1 << CELL_BITS, dtype=np.uint32) << np.uint32(_LOW)
    hi_key = lo_key | _LOW_MASK
    special = ((_bits_of_key(lo_key, quant_type) >> np.uint32(23)) & np.uint32(0xFF)) == 0xFF
    (m_lo, n_lo), (m_hi, n_hi) = _rank(lo_key, quant_type), _rank(hi_key, quant_type)
    steps = (m_hi - m_lo) + (n_hi - n_lo)
    if np.any(~special & ((m_hi < m_lo) | (n_hi < n_lo) | (steps > 1))):
        raise AssertionError(f"{quant_type}: a cell of {CELL_BITS} key bits holds more than one threshold")
    r_lo, r_hi = 2 * m_lo + n_lo, 2 * m_hi + n_hi
    # bisection for the first low value L whose rank exceeds the cell's lowest: below[L - 1], above[L]
    below = np.zeros(lo_key.size, dtype=np.int64)
    above = np.full(lo_key.size, 1 << _LOW, dtype=np.int64)
    while np.any(above - below > 1):
        mid = (below + above) // 2
        m_mid, n_mid = _rank(lo_key | np.minimum(mid, int(_LOW_MASK)).astype(np.uint32), quant_type)
        up = 2 * m_mid + n_mid > r_lo
        above, below = np.where(up, mid, above), np.where(up, below, mid)
    thr = np.where(r_hi > r_lo, above - 1, int(_LOW_MASK)).astype(np.uint32)
    lo_code, hi_code = _codes(lo_key, quant_type), _codes(hi_key, quant_type)
    nan_code = int(bitsandbytes_cuda.nibbles(np.array([np.nan], dtype=np.float32), quant_type)[0])
    thr = np.where(special, _LOW_MASK, thr)
    lo_code = np.where(special, nan_code, lo_code)
    hi_code = np.where(special | (r_hi == r_lo), lo_code, hi_code)
    return ((thr << np.uint32(11)) | (hi_code.astype(np.uint32) << np.uint32(4)) | lo_code.astype(np.uint32)).astype(
        np.uint32
    )


def code_by_cells(s: npt.NDArray[np.float32], quant_type: str) -> npt.NDArray[np.uint8]:
    """What the kernel computes, in NumPy: e = table[k >> 21]; code = (e >> (k << 11 > e ? 4 : 0)) & 15."""
    key = key_of_bits(np.asarray(s, dtype=np.float32).view(np.uint32), quant_type)
    e = cell_table(quant_type)[key >> np.uint32(_LOW)]
    shift = np.where((key << np.uint32(11)) > e, np.uint32(4), np.uint32(0))
    return ((e >> shift) & np.uint32(15)).astype(np.uint8)
