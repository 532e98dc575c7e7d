"""TIES merging on the GPU (Yadav et al., NeurIPS 2023, arXiv 2306.01708, Algorithm 1), one fused pass.

    τ̂_t = τ_t ⊙ keep_t              (magnitude trim: k = ⌊d·n⌋ per task, rule as ``refimpl.merging``)
    e_t = w_t τ̂_t or τ̂_t            (``weight_stage``)
    γ = sgn(Σ_t e_t) or sgn(Σ_t sgn e_t), 0 → +1 or the global majority sgn(Σ_p γ_p)
    sel_t = (γ > 0 ∧ e_t > 0) ∨ (γ ≤ 0 ∧ e_t < 0)
    τ_m = λ · Σ_t w_t τ̂_t sel_t / D,  D = max(Σ_t sel_t, 1) | Σ_t w_t sel_t (0 → 1) | 1

The trim thresholds are found by a radix select on the float32 bits of |τ| (three histogram passes over
all tasks at once, no sort and no copy); the merge then reads each task vector once and writes the result
once (PEFT's torch TIES materialises ~17 tensors). The arithmetic is float64 in the reference's order
(sums over t in task order, no fused multiply-add), so the result equals ``refimpl.merging.ties`` rounded
once to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from refimpl.kernels.cupy_gpu import _device as D

MAX_TASKS = 16
K_RULES = ("threshold", "floor", "floor_min1")
_ELECT = {"sum": 0, "count": 1}
_ZERO = ("positive", "global_majority")
_STAGE = {"after_election": 0, "before_election": 1}
_DIV = {"count": 0, "weight_sum": 1, "none": 2}

_HIST_SRC = r"""
// histogram of NBITS bits at SHIFT of |x|'s bit pattern (ordered like |x|), over elements whose bits under
// mask[t] equal prefix[t]: one radix-select pass for every task t = blockIdx.y at once
extern "C" __global__ void radix_hist(const u64* __restrict__ taus, long long n, const u32* __restrict__ prefix,
                                      const u32* __restrict__ mask, int shift, u32* __restrict__ hist) {
  __shared__ u32 h[4][1 << NBITS];                 // 4 copies (2 warps each): less atomic contention
  for (int i = threadIdx.x; i < 4 * (1 << NBITS); i += blockDim.x) (&h[0][0])[i] = 0;
  __syncthreads();
  const int t = blockIdx.y;
  const float* __restrict__ x = reinterpret_cast<const float*>(taus[t]);
  const u32 pre = prefix[t], msk = mask[t];
  u32* hw = h[(threadIdx.x >> 6) & 3];
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i * 4 < n; i += stride) {
    float v[4];
    if (i * 4 + 4 <= n) {
      float4 q = __ldg(reinterpret_cast<const float4*>(x) + i);
      v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
      for (int j = 0; j < 4; ++j) v[j] = (i * 4 + j < n) ? x[i * 4 + j] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      u32 b = __float_as_uint(v[j]) & 0x7fffffffu;
      if (i * 4 + j < n && (b & msk) == pre) atomicAdd(&hw[(b >> shift) & ((1u << NBITS) - 1u)], 1u);
    }
  }
  __syncthreads();
  u32* out = hist + (long long)t * (1 << NBITS);
  for (int i = threadIdx.x; i < (1 << NBITS); i += blockDim.x) {
    u32 c = h[0][i] + h[1][i] + h[2][i] + h[3][i];
    if (c) atomicAdd(&out[i], c);
  }
}
"""

_RADIX_PASSES = ((21, 11), (10, 11), (0, 10))


def _kth_largest_abs(ptrs: Any, n: int, ks: list[int]) -> list[tuple[int, int, int]]:
    """Radix select on the float32 bits of |τ_t| for every task at once (three histogram passes of 11, 11
    and 10 bits; no sort, no copy). ``ks[t]`` ≥ 1 is the rank wanted in task t (0: skip the task).

    Returns per task (bits of the k-th largest |τ|, how many are strictly larger, how many equal it).
    """
    cp = D._cp()
    T = len(ks)
    prefix = np.zeros(T, dtype=np.uint32)
    mask = np.zeros(T, dtype=np.uint32)
    remaining = np.array(ks, dtype=np.int64)
    n_gt = np.zeros(T, dtype=np.int64)
    n_eq = np.zeros(T, dtype=np.int64)
    for shift, nbits in _RADIX_PASSES:
        hist = cp.zeros((T, 1 << nbits), dtype=np.uint32)
        kern = D.compile_kernel(_HIST_SRC, "radix_hist", (("DT", 0), ("NBITS", nbits)))
        blocks = min(132 * 4, max(1, -(-n // (4 * 256))))
        pd, md = cp.asarray(prefix), cp.asarray(mask)
        kern(
            (blocks, T),
            (256,),
            (
                D.ptr(ptrs.data.ptr),
                np.int64(n),
                D.ptr(pd.data.ptr),
                D.ptr(md.data.ptr),
                np.int32(shift),
                D.ptr(hist.data.ptr),
            ),
        )
        hh = hist.get().astype(np.int64)
        for t in range(T):
            if ks[t] <= 0:
                continue
            h = hh[t, ::-1]  # descending bins
            cum = np.cumsum(h)
            idx = int(np.searchsorted(cum, remaining[t]))  # first bin where the running count reaches k
            above = int(cum[idx - 1]) if idx > 0 else 0
            n_gt[t] += above
            remaining[t] -= above
            n_eq[t] = int(h[idx])
            prefix[t] |= np.uint32(((1 << nbits) - 1 - idx) << shift)
            mask[t] |= np.uint32(((1 << nbits) - 1) << shift)
    return [(int(prefix[t]), int(n_gt[t]), int(n_eq[t])) for t in range(T)]


_TIES_SRC = r"""
__device__ __forceinline__ double sgn(double v) { return (double)((v > 0.0) - (v < 0.0)); }

extern "C" __global__ void ties_merge(const u64* __restrict__ taus, const double* __restrict__ w,
                                      const float* __restrict__ thr, const long long* __restrict__ cut,
                                      const long long* __restrict__ gsum, double lam, OUT_T* __restrict__ out,
                                      long long* __restrict__ sign_total, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  double tt[T], e[T];
  double score = 0.0;
  if (i < n) {
#pragma unroll
    for (int t = 0; t < T; ++t) {
      float v = __ldg(reinterpret_cast<const float*>(taus[t]) + i);
      float a = fabsf(v);
      bool keep = (a > thr[t]) || (a == thr[t] && i < cut[t]);
      tt[t] = keep ? (double)v : 0.0;
      e[t] = STAGE ? tt[t] * w[t] : tt[t];
      score += ELECT ? sgn(e[t]) : e[t];
    }
  }
  double g = sgn(score);
#if PASS == 1
  // global majority: sum of sgn(score) over all coordinates
  long long c = (i < n) ? (long long)g : 0;
  for (int off = 16; off > 0; off >>= 1) c += __shfl_xor_sync(0xffffffffu, c, off);
  if ((threadIdx.x & 31) == 0 && c != 0) atomicAdd(reinterpret_cast<unsigned long long*>(sign_total),
                                                  (unsigned long long)c);
#else
  if (i >= n) return;
  if (g == 0.0) g = ZERO_GLOBAL ? sgn((double)gsum[0]) : 1.0;
  double num = 0.0, den = 0.0;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    bool sel = (g > 0.0 && e[t] > 0.0) || (g <= 0.0 && e[t] < 0.0);
    num += sel ? tt[t] * w[t] : 0.0 * (tt[t] * w[t]);
    den += DIV == 0 ? (sel ? 1.0 : 0.0) : (sel ? w[t] : 0.0);
  }
  double merged;
  if (DIV == 0) merged = num / fmax(den, 1.0);
  else if (DIV == 1) merged = num / (den == 0.0 ? 1.0 : den);
  else merged = num;
  out[i] = (OUT_T)(lam * merged);
#endif
}
"""


def _thresholds(devs: list, ptrs: Any, n: int, dens: np.ndarray, k_rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Per task (threshold, tie cut) such that keep = |τ| > thr or (|τ| == thr and index < cut).

    threshold rule: keep |τ| ≥ the (n − k)-th smallest = the (k + 1)-th largest; floor rules: exactly k,
    ties at the k-th largest broken by lower flat index (the reference's rule). k = ⌊fl(d·n)⌋.
    """
    cp = D._cp()
    T = len(devs)
    thr = np.full(T, -1.0, dtype=np.float32)  # keep everything
    cut = np.full(T, n, dtype=np.int64)
    ranks = [0] * T
    for t in range(T):
        if dens[t] >= 1.0:
            continue
        k = int(float(dens[t]) * n)
        if k_rule == "threshold":
            ranks[t] = k + 1
            continue
        if k_rule == "floor_min1":
            k = max(1, k)
        if k == 0:
            thr[t], cut[t] = np.inf, 0
        elif k < n:
            ranks[t] = k
    if any(ranks):
        for t, (bits, n_gt, n_eq) in enumerate(_kth_largest_abs(ptrs, n, ranks)):
            if ranks[t] == 0:
                continue
            thr[t] = np.array([bits], dtype=np.uint32).view(np.float32)[0]
            if k_rule != "threshold" and ranks[t] - n_gt < n_eq:
                # rare: several equal magnitudes straddle the cut; keep the first ones by flat index
                ties = cp.flatnonzero(cp.abs(cp.asarray(devs[t].obj).ravel()) == thr[t])
                cut[t] = int(ties[ranks[t] - n_gt])
    return thr, cut


def ties(
    task_vectors: Sequence[Any],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    k_rule: str = "threshold",
    elect: str = "sum",
    zero_sign: str = "positive",
    weight_stage: str = "after_election",
    divisor: str = "count",
    lam: float = 1.0,
    out_dtype: str = "float32",
) -> Any:
    """TIES-merged task vector λ·τ_m of float32 task vectors (CuPy arrays or torch CUDA tensors).

    Options as ``refimpl.merging.ties`` (profiles: paper = threshold/global_majority, peft = floor/positive,
    mergekit = floor_min1/positive/before_election/weight_sum); L1 rescaling is not offered here.
    """
    if isinstance(task_vectors, (str, bytes)) or not isinstance(task_vectors, Sequence) or not task_vectors:
        raise TypeError(
            f"task_vectors: expected a non-empty sequence of device arrays, got {type(task_vectors).__name__}"
        )
    devs = [D.as_dev(t, f"task_vectors[{i}]", dtypes=("float32",)) for i, t in enumerate(task_vectors)]
    T = len(devs)
    if T > MAX_TASKS:
        raise ValueError(f"task_vectors: expected at most {MAX_TASKS} tasks, got {T}")
    shape = devs[0].shape
    for i, dv in enumerate(devs[1:], 1):
        if dv.shape != shape:
            raise ValueError(f"task_vectors[{i}]: expected shape {shape}, got {dv.shape}")
    n = devs[0].size
    if n == 0:
        raise ValueError("task_vectors: expected non-empty tensors, got 0 elements")
    w = np.ones(T) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (T,) or not np.all(np.isfinite(w)):
        raise ValueError(f"weights: expected {T} finite numbers, got {weights!r}")
    dens = (
        np.broadcast_to(np.asarray(density, dtype=np.float64), (T,))
        if np.ndim(density) == 0
        else np.asarray(density, dtype=np.float64)
    )
    if dens.shape != (T,) or not np.all((dens > 0) & (dens <= 1)):
        raise ValueError(f"density: expected one value or {T} values in (0, 1], got {density!r}")
    for name, val, allowed in (
        ("k_rule", k_rule, K_RULES),
        ("elect", elect, tuple(_ELECT)),
        ("zero_sign", zero_sign, _ZERO),
        ("weight_stage", weight_stage, tuple(_STAGE)),
        ("divisor", divisor, tuple(_DIV)),
        ("out_dtype", out_dtype, ("float32", "float64")),
    ):
        if val not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {val!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating)) or not np.isfinite(lam):
        raise TypeError(f"lam: expected a finite real number, got {lam!r}")
    cp = D._cp()
    ptrs = cp.asarray(np.array([dv.ptr for dv in devs], dtype=np.uint64))
    thr, cut = _thresholds(devs, ptrs, n, dens, k_rule)
    wd, thd, cud = cp.asarray(w), cp.asarray(thr), cp.asarray(cut)
    gsum = cp.zeros(1, dtype=np.int64)
    out = D.empty(devs[0], shape, out_dtype)
    defines = (
        ("DT", 0),
        ("T", T),
        ("ELECT", _ELECT[elect]),
        ("STAGE", _STAGE[weight_stage]),
        ("DIV", _DIV[divisor]),
        ("ZERO_GLOBAL", int(zero_sign == "global_majority")),
        ("OUT_T", "float" if out_dtype == "float32" else "double"),
    )
    args = (
        D.ptr(ptrs.data.ptr),
        D.ptr(wd.data.ptr),
        D.ptr(thd.data.ptr),
        D.ptr(cud.data.ptr),
        D.ptr(gsum.data.ptr),
        np.float64(lam),
        D.ptr(out.ptr),
        D.ptr(gsum.data.ptr),
        np.int64(n),
    )
    with D.launch_stream(devs[0]):
        if zero_sign == "global_majority":
            D.compile_kernel(_TIES_SRC, "ties_merge", (*defines, ("PASS", 1)), ("--fmad=false",))(
                D.grid_for(n), (256,), args
            )
        D.compile_kernel(_TIES_SRC, "ties_merge", (*defines, ("PASS", 2)), ("--fmad=false",))(
            D.grid_for(n), (256,), args
        )
    return out.obj
