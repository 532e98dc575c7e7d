"""The ``bitsandbytes-cuda`` profile: the steps where bitsandbytes 0.50.2's CUDA kernels depart from the reference.

bitsandbytes builds csrc/kernels.cu with ``--use_fast_math`` (spec/nf4.md §6, §9, §15.1):

* absmax: ``fmaxf`` over |x| from −FLT_MAX (NaN ignored; the tail's zero padding takes part), no 1e-38
  clamp, float32 subnormals flushed to zero (FTZ);
* scale: ``x · rcp.approx.ftz.f32(a)`` in every block, tail included, without a clamp (``cuda_rcp``);
* codes: NF4 by comparisons with the kernel's float literals, FP4 by its literals on |s| with the sign
  bit from s < 0; NaN → nibble 0; the odd-n pad element is 0 · rcp(a_tail);
* 8-bit codes (nested statistics): the kernel's 7-step bisection over the dynamic map;
* dequantization: FP4's nibble 8 is −0.0; the product code · absmax flushes a subnormal absmax and a
  subnormal result to a signed zero; a nested absmax is ``dequantize_blockwise`` (a fast-math kernel: the
  product d[q] · a2 flushed the same way) followed by ``absmax += offset``, a torch add that keeps
  subnormals. Measured on the H200 against bitsandbytes 0.50.2 CUDA (bench/bnb_cuda_subnormal_probe.py,
  bench/results/bnb-cuda-subnormal-probe.json): every one of 620 subnormal products came back as zero.

The nested offset is the reference's correctly rounded mean: CUDA's reduction order is not emulated (§7).
Each function replaces the reference step of the same name in ``refimpl.quant.blockwise`` (section "core").
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from refimpl.quant import codebooks, cuda_rcp

_FLT_MIN = np.float32(np.finfo(np.float32).tiny)
_FLT_MAX = np.float32(np.finfo(np.float32).max)


def ftz(v: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """CUDA --use_fast_math flushes float32 subnormals to (signed) zero."""
    return np.where(np.abs(v) < _FLT_MIN, np.copysign(np.float32(0), v), v).astype(np.float32)


def block_absmax(x: npt.NDArray[np.float32], bs: int) -> npt.NDArray[np.float32]:
    """a_b = fmaxf over ftz(|x_i|) from −FLT_MAX (full blocks) or from the tail's zero padding (tail block)."""
    n_full = x.size - x.size % bs
    ax = ftz(np.abs(x))
    absmax = np.fmax.reduce(ax[:n_full].reshape(-1, bs), axis=1, initial=-_FLT_MAX).astype(np.float32)
    if n_full < x.size:
        absmax = np.append(absmax, np.fmax.reduce(ax[n_full:], initial=np.float32(0)))
    return absmax.astype(np.float32)


def scaled(x: npt.NDArray[np.float32], absmax: npt.NDArray[np.float32], bs: int) -> npt.NDArray[np.float32]:
    """s_i = ftz(x_i) · rcp.approx.ftz(a_b) (``1.0f / absmax`` under fast math; spec §15), no clamp."""
    return (ftz(x) * np.repeat(cuda_rcp.rcp_approx_ftz(absmax), bs)[: x.size]).astype(np.float32)


def pad_scaled(absmax: npt.NDArray[np.float32]) -> np.float32:
    """The zero-padded load of an odd n is scaled like its block: 0 · rcp(a_tail) (NaN when a_tail = 0)."""
    return np.float32(np.float32(0) * cuda_rcp.rcp_approx_ftz(absmax[-1:])[0])


def nibbles(s: npt.NDArray[np.float32], quant_type: str) -> npt.NDArray[np.uint8]:
    """The decision trees of dQuantizeNF4 / dQuantizeFP4 with the kernel's float literals; NaN → nibble 0.

    NF4: ``s > t`` for the 15 literals (``codebooks.nf4_cuda_thresholds``, 4 of them 1 ulp off the
    midpoints). FP4: the magnitude code from the 7 literals on |s| (ties toward zero magnitude), the sign
    bit 8 when s < 0."""
    if quant_type == "fp4":
        thresholds = np.array(codebooks.FP4_CUDA_THRESHOLDS, dtype=np.float32)
        mag = np.searchsorted(thresholds, np.abs(s), side="left")
        mag = np.where(np.isnan(s), 0, mag)
        codes = np.array(codebooks.FP4_CUDA_MAGNITUDE_CODES, dtype=np.uint8)[mag]
        return (codes | np.where(s < 0, np.uint8(8), np.uint8(0))).astype(np.uint8)
    nib = np.searchsorted(codebooks.nf4_cuda_thresholds(), s, side="left").astype(np.uint8)
    return np.where(np.isnan(s), np.uint8(0), nib).astype(np.uint8)


def absmax_8bit(blocks: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """a_k = fmaxf over ftz(|x|) of each (zero-padded) block from −FLT_MAX: NaN ignored."""
    return np.fmax.reduce(ftz(np.abs(blocks)), axis=1, initial=-_FLT_MAX).astype(np.float32)


def scaled_8bit(blocks: npt.NDArray[np.float32], absmax: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """v = ftz(x) · rcp.approx.ftz(a_k), no clamp."""
    return (ftz(blocks) * cuda_rcp.rcp_approx_ftz(absmax)[:, None]).astype(np.float32)


def codes_8bit(v: npt.NDArray[np.float32], absmax: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """CUDA dQuantize<0>: 7 bisection steps from pivot 127 (comparisons v > code[pivot]) leave the
    final pivot p and the last compared pivots below (l) and above (h); the result is h if
    v > f32((code[h] + code[p])/2) (when v > code[p]), l if v < f32((code[l] + code[p])/2)
    (otherwise), else p. All in float32; an exact tie keeps p. A block with a = 0 has no rule of its own."""
    code = codebooks.codebook("dynamic8")
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
    q = np.where(v > val, np.where(v > up_mid, upper, pivot), np.where(v < low_mid, lower, pivot))
    return q.astype(np.uint8)


def fp4_zero_is_negative(shape: tuple[int, ...]) -> bool:
    """The CUDA dequantization table holds −0.0 at FP4 nibble 8."""
    return True


def scaled_codes(codes: npt.NDArray[np.float32], scales: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """ftz(code · ftz(a)): ``mul.rn.ftz.f32`` in the dequantize kernel."""
    return ftz(codes * ftz(scales))


def nested_scales(
    dq: npt.NDArray[np.float32], nested_absmax: npt.NDArray[np.float32], offset: np.float32
) -> npt.NDArray[np.float32]:
    """f32(ftz(d[q] · ftz(a2)) + offset): the fast-math 8-bit dequantize kernel, then torch's exact-rounding add."""
    return (ftz(dq * ftz(nested_absmax)) + np.float32(offset)).astype(np.float32)
