"""CUDA's fast-math reciprocal ``rcp.approx.ftz.f32``, as bitsandbytes' quantizers use it (spec/nf4.md §15).

bitsandbytes is built with ``--use_fast_math``, so the block scale ``1.0f / absmax`` of its CUDA
quantizers (``kQuantizeBlockwise``, ``kQuantizeBlockwiseSmall`` in csrc/kernels.cu) compiles to the PTX
instruction ``rcp.approx.ftz.f32`` (one ``MUFU.RCP`` on the GPU). Its result is not the correctly rounded
1/a: for a = 2^e · m (m ∈ [1, 2) a float32 significand)

    rcp(a) = 2^(−e) · r(m),    bits(r(m)) = bits(RN(1/m)) + d(m),    d(m) ∈ {−1, 0, +1},

with subnormal inputs and results flushed to (signed) zero. The hardware's interpolation tables are not
published, so d is a measurement: ``bench/bnb_cuda_compare.py --measure-rcp`` records it for all 2^23
significands on an NVIDIA H200 (sm_90) and checks that it depends on m alone; the packed table is
``rcp_approx_ftz_sm90.npz`` beside this module (2 bits per significand). Other GPU generations may differ;
their differences then stay within one ulp of the reciprocal, which ``check_4bit`` classes as admissible.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks

TABLE_PATH = Path(__file__).with_name("rcp_approx_ftz_sm90.npz")
_SIGNIFICANDS = 1 << 23
_FLT_MIN = np.float32(np.finfo(np.float32).tiny)


@functools.cache
def _delta_table() -> np.ndarray:
    """d(m) for m = 0 .. 2^23 − 1 as int8, from the measured table shipped with the package."""
    if not TABLE_PATH.exists():  # never fall back silently: the profile would no longer be bitsandbytes-cuda
        raise FileNotFoundError(f"{TABLE_PATH}: the measured rcp.approx.ftz table is missing; reinstall refimpl")
    with np.load(TABLE_PATH, allow_pickle=False) as z:
        packed = np.asarray(z["delta2"], dtype=np.uint8)
    if packed.size * 4 != _SIGNIFICANDS:
        raise ValueError(f"{TABLE_PATH.name}: expected {_SIGNIFICANDS // 4} packed bytes, got {packed.size}")
    two = np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1).reshape(-1)
    if (two == 2).any():
        raise ValueError(f"{TABLE_PATH.name}: 2-bit code 2 is not a valid ulp offset (0, +1 = 1, −1 = 3)")
    return np.where(two == 3, np.int8(-1), two.astype(np.int8)).astype(np.int8)


def table_info() -> dict[str, Any]:
    """Which reciprocal the bitsandbytes-cuda profile uses, with the table's counts of +1 and −1 ulp offsets."""
    d = _delta_table()
    return {
        "table": TABLE_PATH.name,
        "rule": "RN(1/a) + d(significand) ulp, flush-to-zero",
        "plus_one_ulp": int((d == 1).sum()),
        "minus_one_ulp": int((d == -1).sum()),
    }


def rcp_approx_ftz(a: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """float32 rcp.approx.ftz.f32(a) elementwise: RN(1/a) moved by d(m) ulps (module docstring).

    Subnormal a is flushed to ±0 first (→ ±inf), a subnormal result to ±0; ±0 → ±inf, ±inf → ±0,
    NaN → NaN.
    """
    arr = np.asarray(a)
    if arr.dtype != np.float32:
        raise TypeError(f"a: expected float32 values (the kernel's absmax), got {_checks.describe(arr)}")
    a = arr
    flushed = np.where(np.abs(a) < _FLT_MIN, np.copysign(np.float32(0), a), a).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = (np.float32(1) / flushed).astype(np.float32)
    d = _delta_table()
    normal = np.isfinite(inv) & (np.abs(inv) >= _FLT_MIN)
    m = (flushed.view(np.uint32) & np.uint32(_SIGNIFICANDS - 1)).astype(np.int64)
    bits = inv.view(np.uint32).astype(np.int64) + np.where(normal, d[m], 0)
    inv = bits.astype(np.uint32).view(np.float32).reshape(inv.shape)
    return np.where(np.abs(inv) < _FLT_MIN, np.copysign(np.float32(0), inv), inv).astype(np.float32)
