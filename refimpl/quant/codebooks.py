"""Codebooks of the 4-bit NF4/FP4 formats and the 8-bit dynamic map (spec/nf4.md §1–§3).

NF4 (NormalFloat4) is the 4-bit data type of QLoRA (Dettmers et al., arXiv 2305.14314, §3):
its 16 levels are quantiles of N(0, 1) normalised to [−1, 1], with an exact zero.
FP4 is bitsandbytes' 1-sign/3-magnitude float (not OCP E2M1; bitsandbytes #851, #988).
The 8-bit dynamic map (Dettmers, arXiv 1511.04561) quantizes the per-block absmax
values in double quantization.

Every table is hardcoded as float32 bit patterns (hex), as bitsandbytes stores them
(``bitsandbytes/functional.py``, ``get_4bit_type``); ``derive_nf4`` regenerates NF4 from the normal quantile function so
a test can check the table against its definition bit for bit.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from refimpl import _checks

QUANT_TYPES = ("nf4", "fp4")

#: NF4 levels, index = nibble (already sorted ascending).
NF4_HEX = (
    "bf800000",
    "bf3239b1",
    "bf066b30",
    "beca32a0",
    "be91a24d",
    "be3d353f",
    "bdba7871",
    "00000000",
    "3da2faff",
    "3e24cae3",
    "3e7c04dd",
    "3ead033a",
    "3ee1a4b8",
    "3f1007ab",
    "3f3913b3",
    "3f800000",
)

#: FP4 levels, index = nibble (sign bit 3, magnitude bits 2..0). Nibble 8 is +0.0 here, as in
#: bitsandbytes' torch table; its C++ scalar and CUDA tables hold −0.0 (spec/nf4.md §9).
FP4_HEX = (
    "00000000",
    "3baaaaab",
    "3f2aaaab",
    "3f800000",
    "3eaaaaab",
    "3f000000",
    "3e2aaaab",
    "3e800000",
    "00000000",
    "bbaaaaab",
    "bf2aaaab",
    "bf800000",
    "beaaaaab",
    "bf000000",
    "be2aaaab",
    "be800000",
)

#: float32 midpoints f32((c_j + c_{j+1}) / 2) of the sorted codebooks: the 15 decision thresholds.
NF4_MIDPOINT_HEX = (
    "bf591cd8",
    "bf1c5270",
    "beeb8480",
    "beadea76",
    "be703cec",
    "be0d38bc",
    "bd3a7871",
    "3d22faff",
    "3df64862",
    "3e5067e0",
    "3e9582d4",
    "3ec753f9",
    "3f006d04",
    "3f248daf",
    "3f5c89da",
)
FP4_MIDPOINT_HEX = (
    "bf555556",
    "bf155556",
    "bed55556",
    "be955556",
    "be555556",
    "bdb00000",
    "bb2aaaab",
    "00000000",
    "3b2aaaab",
    "3db00000",
    "3e555556",
    "3e955556",
    "3ed55556",
    "3f155556",
    "3f555556",
)

#: FP4 nibble of each sorted position: nibble = FP4_ORDER[number of midpoints strictly below s].
#: (A stable argsort of the FP4 table; the tie between nibbles 0 and 8 at zero goes to nibble 0.)
FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

#: CUDA's FP4 decision thresholds (float literals of ``dQuantizeFP4`` in csrc/kernels.cu), applied to
#: |s| with ties toward zero magnitude; the magnitude code returned above each threshold.
FP4_CUDA_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_CUDA_MAGNITUDE_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)

#: CUDA's NF4 decision thresholds: the float literals of ``dQuantizeNF4`` (csrc/kernels.cu) as written, in
#: ascending order, and their correctly rounded float32 values (how the CUDA compiler reads ``…f``). Each
#: literal is a 16–17 digit decimal of a float32 midpoint, which lies halfway between two float32 numbers, so
#: its last digit picks the neighbour: four of the 15 (j = 0, 8, 12, 14) are one ulp away from the float32
#: midpoints ``NF4_MIDPOINT_HEX`` of the CPU rule (spec/nf4.md §15).
NF4_CUDA_THRESHOLD_LITERALS = (
    "-0.8480964004993439",
    "-0.6106329262256622",
    "-0.4599952697753906",
    "-0.33967943489551544",
    "-0.23460740596055984",
    "-0.13791173323988914",
    "-0.045525018125772476",
    "0.03979014977812767",
    "0.1202552504837513",
    "0.2035212516784668",
    "0.2920137718319893",
    "0.3893125355243683",
    "0.5016634166240692",
    "0.6427869200706482",
    "0.8614784181118011",
)
NF4_CUDA_THRESHOLD_HEX = (
    "bf591cd9",
    "bf1c5270",
    "beeb8480",
    "beadea76",
    "be703cec",
    "be0d38bc",
    "bd3a7871",
    "3d22faff",
    "3df64863",
    "3e5067e0",
    "3e9582d4",
    "3ec753f9",
    "3f006d03",
    "3f248daf",
    "3f5c89d9",
)

#: The 256-entry signed dynamic map (create_dynamic_map(signed=True, max_exponent_bits=7)).
DYNAMIC8_HEX = tuple(
    """
bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000 bf616666 bf5dcccd bf5a3333 bf56999a
bf530000 bf4f6666 bf4bcccd bf483333 bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666
bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a bf0b0000 bf076666 bf03cccc bf003333
bef93332 bef20000 beeacccc bee3999a bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000
bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd be526666 be440000 be35999a be273333
be18cccd be0a6666 bdf80000 bddb3334 bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a
bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d bd5b851f bd500000 bd447ae1 bd38f5c3
bd2d70a3 bd21eb85 bd166667 bd0ae148 bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148
bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4 bbab020d bb989374 bb8624dd bb676c8a
bb428f5c bb1db22d baf1a9fc baa7ef9d ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b
b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000 3513a3b7 365a1a94 370205ff 37b24206
38378034 388aefb3 38ba1f4b 3923d70b 398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d
3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581
3c0ccccd 3c160418 3c1f3b64 3c3ae148 3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148
3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d 3d728f5d 3d7e147b 3d84cccd 3d8a8f5d
3d9051eb 3d96147b 3d9bd70a 3da1999a 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334
3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd 3e6f3333 3e7d9999 3e860000 3e8d3334
3e946666 3e9b999a 3ea2cccc 3eaa0000 3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a
3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a 3f123334 3f15cccd 3f196666 3f1d0000
3f20999a 3f243334 3f27cccd 3f2b6666 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333
3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 3f68999a 3f6c3333 3f6fcccd 3f736666
3f770000 3f7a999a 3f7e3333 3f800000
""".split()
)

#: The offset of QLoRA's NF4 construction: 0.9677083 ≈ 1 − (1/30 + 1/32)/2 (an observation, not stated upstream).
NF4_OFFSET = 0.9677083


def from_hex(words: tuple[str, ...]) -> npt.NDArray[np.float32]:
    """float32 array from big-endian hex bit patterns."""
    return np.array([int(w, 16) for w in words], dtype=np.uint32).view(np.float32)


_TABLES = {
    "nf4": from_hex(NF4_HEX),
    "fp4": from_hex(FP4_HEX),
    "dynamic8": from_hex(DYNAMIC8_HEX),
}
_MIDPOINTS = {"nf4": from_hex(NF4_MIDPOINT_HEX), "fp4": from_hex(FP4_MIDPOINT_HEX)}
_NF4_CUDA_THRESHOLDS = from_hex(NF4_CUDA_THRESHOLD_HEX)


def codebook(name: str = "nf4") -> npt.NDArray[np.float32]:
    """The float32 code values of ``name`` ("nf4", "fp4" or "dynamic8"), index = code.

    NF4 and FP4 are indexed by nibble; FP4 is therefore not sorted (spec/nf4.md §2).
    Returns a fresh copy.
    """
    _checks.choice(name, "name", tuple(_TABLES))
    return _TABLES[name].copy()


def sorted_codebook(quant_type: str) -> npt.NDArray[np.float32]:
    """The 16 code values of ``quant_type`` in ascending order (float32)."""
    _checks.choice(quant_type, "quant_type", QUANT_TYPES)
    table = _TABLES[quant_type]
    return table.copy() if quant_type == "nf4" else table[list(FP4_ORDER)]


def nibble_of_position(quant_type: str) -> npt.NDArray[np.uint8]:
    """uint8 map from sorted position (0..15) to nibble: identity for NF4, FP4_ORDER for FP4."""
    _checks.choice(quant_type, "quant_type", QUANT_TYPES)
    return np.arange(16, dtype=np.uint8) if quant_type == "nf4" else np.array(FP4_ORDER, dtype=np.uint8)


def position_of_nibble(quant_type: str) -> npt.NDArray[np.int64]:
    """Inverse of ``nibble_of_position``: the sorted position of each nibble."""
    inv = np.empty(16, dtype=np.int64)
    inv[nibble_of_position(quant_type)] = np.arange(16)
    return inv


def midpoints(quant_type: str) -> npt.NDArray[np.float32]:
    """The 15 float32 thresholds f32((c_j + c_{j+1})/2) between consecutive sorted codes."""
    _checks.choice(quant_type, "quant_type", QUANT_TYPES)
    return _MIDPOINTS[quant_type].copy()


def nf4_cuda_thresholds() -> npt.NDArray[np.float32]:
    """The 15 float32 thresholds of CUDA's dQuantizeNF4 (``x > t`` picks the upper code), ascending."""
    return _NF4_CUDA_THRESHOLDS.copy()


def float32_midpoints(values: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """f32((c_j + c_{j+1}) · 0.5) in float32 arithmetic over an ascending float32 table."""
    c = np.asarray(values, dtype=np.float32)
    return ((c[:-1] + c[1:]) * np.float32(0.5)).astype(np.float32)


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace for float32 on CPU: step = f32((end − start)/(steps − 1)); the first half
    counts up from start, the second half down from end (aten RangeFactoriesKernel)."""
    s, e = np.float32(start), np.float32(end)
    step = np.float32((e - s) / np.float32(steps - 1))
    idx = np.arange(steps)
    halfway = steps // 2
    up = s + step * idx.astype(np.float32)
    down = e - step * (steps - idx - 1).astype(np.float32)
    return np.where(idx < halfway, up, down).astype(np.float32)


def derive_nf4(offset: float = NF4_OFFSET) -> npt.NDArray[np.float32]:
    """Derive the NF4 codebook from the standard normal quantile function Φ⁻¹ (QLoRA §3), as
    bitsandbytes' ``create_normal_map`` does (not QLoRA's eq. 4 as written, which is −∞ at i = 0:
    artidoro/qlora#94; spec/nf4.md §1).

    q⁺_i = Φ⁻¹(p_i) for the first 8 of 9 points p of linspace(offset, 0.5) (float32, torch's rule),
    q⁻_i = −Φ⁻¹(p_i) for the first 7 of 8 points of linspace(offset, 0.5); with an exact zero the
    16 values are rounded to float32, sorted and divided (float32) by their maximum. The asymmetry
    (8 positive, 7 negative levels) gives NF4 an exact zero.
    """
    offset = _checks.real(offset, "offset", low=0.5, high=1.0, low_inclusive=False, high_inclusive=False)
    inv_cdf = NormalDist().inv_cdf
    pos = [inv_cdf(float(p)) for p in _torch_linspace_float32(offset, 0.5, 9)[:-1]]
    neg = [-inv_cdf(float(p)) for p in _torch_linspace_float32(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array([*pos, 0.0, *neg], dtype=np.float64).astype(np.float32))
    return (values / values.max()).astype(np.float32)
