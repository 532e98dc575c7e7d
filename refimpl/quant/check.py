"""Classify the 4-bit codes of an implementation under test against the reference (spec/nf4.md §11).

For each element whose nibble differs from the nibble the chosen profile gives:

* ``zero_sign``: FP4 nibbles 0 and 8 (+0 and −0): the same value, a sign-of-zero convention.
* ``special``: the element's block holds NaN/±inf, or its absmax is 0 or subnormal: the result
  is a convention of the special-value table, not arithmetic.
* ``admissible``: the two codes are neighbours in value order and the exact scaled value
  x/a lies within ``ulps`` float32 ulps of the exact midpoint t between them,

      |x/a − t| ≤ ulps · ulp_f32(t),

  i.e. a different but legitimate float32 evaluation of s = x·(1/a) (a reciprocal, a product,
  a float32 threshold: about one rounding each, hence the default 3) lands on the other side.
  With ``profile="bitsandbytes-cuda"``, t is the CUDA kernel's float32 literal threshold (FP4:
  0.00260417f … 0.8333333f on |s|; NF4: the 15 literals of dQuantizeNF4), which is what that
  profile decides against.
* ``wrong``: anything else: a bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from refimpl import _checks
from refimpl.quant import blockwise, codebooks
from refimpl.quant.operands import float_input_array
from refimpl.quant.state import QuantState


@dataclass(frozen=True)
class Check4bitReport:
    """Counts of compared nibbles by class, and where the first wrong one is."""

    n_elements: int
    n_equal: int
    n_admissible: int
    n_zero_sign: int
    n_special: int
    n_wrong: int
    first_wrong_index: int | None  #: flat index of the first wrong nibble
    first_wrong: tuple[int, int] | None  #: (nibble under test, reference nibble) there
    n_absmax_mismatch: int  #: blocks whose float32 scale differs bitwise (NaN equals NaN)
    first_absmax_mismatch: int | None

    @property
    def passed(self) -> bool:
        """No wrong nibble and identical block scales (admissible and ±0 differences are allowed)."""
        return self.n_wrong == 0 and self.n_special == 0 and self.n_absmax_mismatch == 0

    def __str__(self) -> str:
        s = (f"{self.n_elements} nibbles: {self.n_equal} equal, {self.n_admissible} admissible, "
             f"{self.n_zero_sign} zero-sign, {self.n_special} special, {self.n_wrong} wrong")
        if self.first_wrong_index is not None and self.first_wrong is not None:  # set together
            s += f" (first at flat index {self.first_wrong_index}: got {self.first_wrong[0]}, " \
                 f"expected {self.first_wrong[1]})"
        return s + f"; {self.n_absmax_mismatch} block scales differ"


def _same_float32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def _ulp32(t: np.ndarray) -> np.ndarray:
    t32 = np.abs(t).astype(np.float32)
    return (np.nextafter(t32, np.float32(np.inf)) - t32).astype(np.float64)


def _fp4_cuda_boundaries() -> np.ndarray:
    """The 14 decision boundaries of CUDA's dQuantizeFP4 in value order (ranks 0..14, FP4's two zeros
    merged): boundary k separates rank k from rank k + 1; −L_6 … −L_0, L_0 … L_6 with L the float32
    literals applied to |s| (spec/nf4.md §9, §15)."""
    lit = np.array(codebooks.FP4_CUDA_THRESHOLDS, dtype=np.float32).astype(np.float64)
    return np.concatenate([-lit[::-1], lit])


def check_4bit(packed: npt.ArrayLike, state: QuantState, x: npt.ArrayLike, *, profile: str = "reference",
               ulps: float = 3, threads: int = 1) -> Check4bitReport:
    """Compare packed codes + state produced by an implementation for input ``x`` with what
    ``profile`` gives (quantize_4bit with nonfinite="propagate"), and classify each difference.

    packed: uint8 codes as bitsandbytes stores them; state: a QuantState (e.g. from
    ``QuantState.from_bnb_dict``); x: the quantized input (float32/float16/bfloat16).
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a refimpl.quant.QuantState, got {_checks.describe(state)}")
    ulps = _checks.real(ulps, "ulps", low=0)
    arr = float_input_array(x, "x")
    if tuple(arr.shape) != state.shape:
        raise ValueError(f"x: expected the state's shape {state.shape}, got shape {arr.shape}")
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.size != (state.n + 1) // 2:
        raise ValueError(f"packed: expected {(state.n + 1) // 2} uint8 bytes for the state's {state.n} "
                         f"elements, got {_checks.describe(p)}")
    ref_packed, ref_state = blockwise.quantize_4bit(
        arr, state.blocksize, state.quant_type, state.nested, profile=profile, nonfinite="propagate",
        threads=threads)
    if ref_state.dtype != state.dtype:
        raise ValueError(f"state: dtype {state.dtype!r} does not match x's dtype {ref_state.dtype!r}")

    got_scale, ref_scale = state.block_absmax(), ref_state.block_absmax()
    scale_diff = np.flatnonzero(~_same_float32(got_scale, ref_scale))

    n = state.n
    got = blockwise.unpack_nibbles(p, n)
    exp = blockwise.unpack_nibbles(ref_packed, n)
    diff = np.flatnonzero(got != exp)
    n_zero = n_special = n_adm = 0
    wrong = np.zeros(0, dtype=np.int64)
    if diff.size:
        g, e = got[diff].astype(np.int64), exp[diff].astype(np.int64)
        xs = arr.reshape(-1)[diff].astype(np.float64)
        # Scales from the reference's own per-block absmax before any nesting.
        raw_absmax = blockwise.profile_steps(profile).block_absmax(
            arr.reshape(-1).astype(np.float32), state.blocksize)
        a = raw_absmax[diff // state.blocksize].astype(np.float64)
        block_bad = ~np.isfinite(raw_absmax) | (np.abs(raw_absmax) < np.finfo(np.float32).tiny)
        x32 = arr.reshape(-1).astype(np.float32)
        nonfinite_x = ~np.isfinite(x32)
        if nonfinite_x.any():
            block_bad |= np.add.reduceat(nonfinite_x, np.arange(0, n, state.blocksize)) > 0
        special = block_bad[diff // state.blocksize]
        zero_sign = (state.quant_type == "fp4") & (np.minimum(g, e) == 0) & (np.maximum(g, e) == 8) & ~special
        # Rank in value order, with FP4's two zeros merged into one rank.
        pos = codebooks.position_of_nibble(state.quant_type)
        rank = np.where(pos > 7, pos - 1, pos) if state.quant_type == "fp4" else pos
        values = codebooks.codebook(state.quant_type).astype(np.float64)
        rg, re = rank[g], rank[e]
        t = (values[g] + values[e]) / 2.0
        if profile == "bitsandbytes-cuda":  # the kernels' literals, not the midpoints
            bounds = _fp4_cuda_boundaries() if state.quant_type == "fp4" else \
                codebooks.nf4_cuda_thresholds().astype(np.float64)
            t = bounds[np.minimum(rg, re)]
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.clip(xs / a, -1.0, 1.0)
            admissible = (np.abs(rg - re) == 1) & (np.abs(s - t) <= ulps * _ulp32(t)) & ~special & ~zero_sign
        n_zero, n_special, n_adm = int(zero_sign.sum()), int(special.sum()), int(admissible.sum())
        wrong = diff[~(zero_sign | special | admissible)]
    first = int(wrong[0]) if wrong.size else None
    return Check4bitReport(
        n_elements=n, n_equal=n - int(diff.size), n_admissible=n_adm, n_zero_sign=n_zero,
        n_special=n_special, n_wrong=int(wrong.size), first_wrong_index=first,
        first_wrong=(int(got[first]), int(exp[first])) if first is not None else None,
        n_absmax_mismatch=int(scale_diff.size),
        first_absmax_mismatch=int(scale_diff[0]) if scale_diff.size else None)
