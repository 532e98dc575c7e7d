"""The shared checks of the quant family (spec/nf4.md §4, §6, §8), and the constants they check against.

``refimpl.quant`` and its kernels (``refimpl.kernels.numba_cpu.quant``, ``refimpl.kernels.cupy_gpu``) validate
their arguments here, so the same bad input gets the same ValueError/TypeError from every implementation.
``quant_operands`` returns a ``QuantOperands`` record of the validated values; the smaller checks
(``valid_blocksize``, ``nonfinite_mode``, ``float_input_array``, ``raise_nonfinite``) are the pieces it is built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from refimpl import _checks
from refimpl.quant import codebooks

#: the blocksizes bitsandbytes accepts for 4-bit and 8-bit blockwise quantization
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: the block length of double quantization's 8-bit statistics (QLoRA §3)
NESTED_BLOCKSIZE = 256
#: the profiles of refimpl.quant (spec/nf4.md §6); the rules of the two peers are in ``refimpl.quant.profiles``
PROFILES = ("reference", "bitsandbytes-cpu", "bitsandbytes-cuda")
#: bitsandbytes' clamp of the scale denominator, clamp(min=1e-38): 0x006ce3ee, a subnormal float32
ABSMAX_MIN = np.float32(1e-38)
#: the input dtypes and the names a QuantState records them by
INPUT_DTYPES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float64): "float64",
}
#: the dtype of each name (dequantization rounds to it)
DTYPES_BY_NAME = {name: dtype for dtype, name in INPUT_DTYPES.items()}


def profile_name(profile: Any, profiles: tuple[str, ...] = PROFILES) -> str:
    """``profile`` checked against ``profiles`` (a kernel passes the subset it implements)."""
    return str(_checks.choice(profile, "profile", profiles))


def nonfinite_mode(nonfinite: Any, profile: str) -> str:
    """ "raise" or "propagate"; None is the profile's default: the reference raises on NaN/±inf, a peer
    profile propagates them by its peer's special-value rules (spec/nf4.md §9)."""
    if nonfinite is None:
        return "raise" if profile == "reference" else "propagate"
    return str(_checks.choice(nonfinite, "nonfinite", ("raise", "propagate")))


def valid_blocksize(value: Any, name: str = "blocksize") -> int:
    """An integer in ``BLOCKSIZES``."""
    bs = _checks.integer(value, name)
    if bs not in BLOCKSIZES:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, BLOCKSIZES))}, got {bs}")
    return bs


def float_input_array(x: Any, name: str) -> np.ndarray:
    """x as a non-empty NumPy array of dtype float32, float16, bfloat16 or float64 (not converted;
    NaN/inf are left to the profile's special-value rules, which ``_checks.float_array`` would reject)."""
    arr = _checks._to_numpy(x, name)  # refuses masked arrays and np.matrix
    if np.dtype(arr.dtype) not in INPUT_DTYPES:
        raise TypeError(
            f"{name}: expected a float32, float16 or bfloat16 array (float64: reference profile "
            f"only), got {_checks.describe(arr)}"
        )
    if arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got {_checks.describe(arr)}")
    return arr


def raise_nonfinite(flat: np.ndarray, name: str) -> None:
    """ValueError naming the first NaN/±inf of a flat float array (its float32 value and flat index)."""
    flat32 = np.asarray(flat).astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(flat32))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}: expected finite values (or nonfinite='propagate'), got {flat32[i]} at flat index {i}"
        )


@dataclass(frozen=True)
class QuantOperands:
    """The validated arguments of a blockwise quantizer.

    x: the input flattened in C order, in its own dtype (float32, float16 or bfloat16; a float64 input,
    reference profile only, already rounded once to float32); its float32 values are exact.
    dtype: the input dtype's name (what dequantization returns); shape: the input's shape.
    quant_type: "nf4" or "fp4"; "dynamic8" for the 8-bit quantizer. nonfinite: "raise" or "propagate".
    """

    x: np.ndarray
    dtype: str
    shape: tuple[int, ...]
    blocksize: int
    quant_type: str
    double_quant: bool
    profile: str
    nonfinite: str
    threads: int

    def x32(self) -> npt.NDArray[np.float32]:
        """x in float32 (exact)."""
        return self.x.astype(np.float32, copy=False)


def quant_operands(
    x: Any,
    blocksize: Any,
    quant_type: Any = None,
    double_quant: Any = False,
    *,
    profile: Any = "reference",
    nonfinite: Any = None,
    threads: Any = 1,
    profiles: tuple[str, ...] = PROFILES,
    check_finite: bool = True,
) -> QuantOperands:
    """Check the arguments of ``quantize_4bit`` (``quant_type`` given) or ``quantize_blockwise_8bit``
    (``quant_type=None``), in this order: profile, nonfinite, blocksize, quant_type, double_quant, threads, x.

    float64 x is accepted by the reference profile only (bitsandbytes refuses it) and rounded once to float32.
    With nonfinite "raise", NaN/±inf in x raise ValueError unless ``check_finite`` is false (a kernel that
    finds them from its absmax calls ``raise_nonfinite`` itself).
    """
    prof = profile_name(profile, profiles)
    mode = nonfinite_mode(nonfinite, prof)
    bs = valid_blocksize(blocksize)
    qt = "dynamic8" if quant_type is None else str(_checks.choice(quant_type, "quant_type", codebooks.QUANT_TYPES))
    dq = _checks.boolean(double_quant, "double_quant")
    n_threads = _checks.integer(threads, "threads", low=1)
    arr = float_input_array(x, "x")
    dtype_name = INPUT_DTYPES[np.dtype(arr.dtype)]
    flat = arr.reshape(-1)
    if dtype_name == "float64":
        if prof != "reference":
            raise TypeError(
                f"x: profile {prof!r} accepts float32, float16 or bfloat16 (bitsandbytes "
                f"refuses float64), got {_checks.describe(arr)}; use profile='reference', which "
                f"rounds float64 to float32 once"
            )
        flat = flat.astype(np.float32)
    if mode == "raise" and check_finite:
        raise_nonfinite(flat, "x")
    return QuantOperands(
        x=flat,
        dtype=dtype_name,
        shape=tuple(int(s) for s in arr.shape),
        blocksize=bs,
        quant_type=qt,
        double_quant=dq,
        profile=prof,
        nonfinite=mode,
        threads=n_threads,
    )
