"""TIES merging in O(n) time and O(1) extra tensors (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

    τ̂_t = trim_k(τ_t);  γ = sgn(Σ_t e_t);  m_t = [sgn(e_t) = γ];  τ_m = λ · Σ_t w_t τ̂_t m_t / D

Same options, profiles and values as ``refimpl.merging.ties`` (spec/merging.md), computed as:

1. Trim threshold per task by radix selection on the bits of |τ| (|x| of a float orders like its
   bit pattern with the sign cleared): 16-bit digits, one read-only pass per digit with a
   parallel histogram (float32: 2 passes, float64: 4). O(n), no copy, no sort.
   The selection also counts the entries strictly above the threshold and equal to it, so the
   "floor" rules (exactly k kept, ties broken by lower flat index) need a prefix count only when
   the threshold value is tied and not every tie fits.
2. (``zero_sign="global_majority"`` or ``"global_majority_zero"`` only) one pass for G = sgn(Σ_p γ_p);
   (``rescale="l1"`` only) one pass for ‖τ_t‖₁ and ‖τ̂_t‖₁.
3. One fused pass over all tasks: trim, weight, elect, select, disjoint mean, λ, store.

Extra memory: the output (one tensor; in the inputs' dtype unless ``out_dtype`` says otherwise)
plus histograms. Arithmetic per element is float64 in the reference's order, rounded once to
the output dtype; with float64 output the values equal the reference's except for the L1
rescale factor (a different summation order of ‖·‖₁).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
from numba import carray, get_num_threads, njit, types
from numba.extending import intrinsic

from refimpl import _checks
from refimpl.kernels.numba_cpu._parallel import parallel_ranges
from refimpl.merging import operands
from refimpl.merging.profiles import ties_rules
from refimpl.merging.sparsify import L1_EPS

_DIGIT = 16
_NBINS = 1 << _DIGIT


@njit(cache=True)
def _histogram_chunk(bits, lo, hi, abs_mask, exp_mask, shift, prefix, pmask, hist):
    """Add the digits of keys in [lo, hi) to hist (4 interleaved copies, so that runs of equal
    digits do not serialise on one counter); returns the count of non-finite keys."""
    local = np.zeros((4, _NBINS), dtype=np.int64)
    nbad = 0
    for i in range(lo, hi):
        key = np.uint64(bits[i]) & abs_mask
        nbad += (key & exp_mask) == exp_mask
        if (key & pmask) == prefix:
            local[i & 3, (key >> shift) & np.uint64(0xFFFF)] += 1
    for k in range(_NBINS):
        hist[k] = local[0, k] + local[1, k] + local[2, k] + local[3, k]
    return nbad


@njit(cache=True, nogil=True)
def _histogram_chunks(bits, abs_mask, exp_mask, shift, prefix, pmask, nchunks, hist, bad, c_lo, c_hi):
    """Chunks [c_lo, c_hi) of ``_histogram``."""
    n = bits.size
    for c in range(c_lo, c_hi):
        bad[c] = _histogram_chunk(
            bits, c * n // nchunks, (c + 1) * n // nchunks, abs_mask, exp_mask, shift, prefix, pmask, hist[c]
        )


def _histogram(bits, abs_mask, exp_mask, shift, prefix, pmask, nchunks) -> tuple[np.ndarray, int]:
    """Counts of digit (key >> shift) & 0xFFFF over keys with (key & pmask) == prefix,
    key = bits & abs_mask (|x|); also counts non-finite keys (exponent all ones)."""
    hist = np.zeros((nchunks, _NBINS), dtype=np.int64)
    bad = np.zeros(nchunks, dtype=np.int64)
    parallel_ranges(_histogram_chunks, nchunks, bits, abs_mask, exp_mask, shift, prefix, pmask, nchunks, hist, bad)
    return hist.sum(axis=0), int(bad.sum())


def _select_desc(bits: np.ndarray, j: int, nbits: int) -> tuple[int, int, int]:
    """The key of the j-th largest |x| (1-based), with counts (strictly greater, equal)."""
    abs_mask = np.uint64((1 << (nbits - 1)) - 1)
    exp_mask = np.uint64(0x7F800000 if nbits == 32 else 0x7FF0000000000000)
    nchunks = max(1, min(get_num_threads() * 2, bits.size // 65536 + 1))
    prefix, pmask, greater = 0, 0, 0
    hist: np.ndarray  # set by the first pass of the loop (nbits > _DIGIT)
    for shift in range(nbits - _DIGIT, -1, -_DIGIT):
        hist, bad = _histogram(bits, abs_mask, exp_mask, np.uint64(shift), np.uint64(prefix), np.uint64(pmask), nchunks)
        if bad:
            raise ValueError("task_vectors: expected finite values, got NaN or inf")
        above = np.cumsum(hist[::-1])  # above[i] = count in the top i+1 bins
        i = int(np.searchsorted(above, j))  # first top-run reaching j
        digit = _NBINS - 1 - i
        higher = int(above[i - 1]) if i > 0 else 0
        greater += higher
        j -= higher
        prefix |= digit << shift
        pmask |= 0xFFFF << shift
    return prefix, greater, int(hist[prefix & 0xFFFF])


@njit(cache=True, nogil=True)
def _tie_counts(bits, abs_mask, thr, nchunks, out, c_lo, c_hi):
    """Chunks [c_lo, c_hi) of ``_tie_prefix``."""
    n = bits.size
    for c in range(c_lo, c_hi):
        cnt = 0
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            cnt += (np.uint64(bits[i]) & abs_mask) == thr
        out[c] = cnt


def _tie_prefix(bits, abs_mask, thr, nchunks):
    """Per-chunk counts of keys equal to thr (for the lower-flat-index tie rule)."""
    out = np.zeros(nchunks, dtype=np.int64)
    parallel_ranges(_tie_counts, nchunks, bits, abs_mask, thr, nchunks, out)
    return out


@njit(cache=True, inline="always")
def _kept(key, thr, strict, tie_budget, ties_seen):
    """Whether an entry survives the trim: key > thr, or key == thr while ties remain."""
    if key > thr:
        return True
    if key == thr:
        return (not strict) or ties_seen < tie_budget
    return False


_BLOCK = 2048  # elements per inner block: T rows of trimmed values stay in L1/L2


@intrinsic
def _pointer_like(typingctx, address, like):
    """A pointer to the element type of array ``like`` at an integer address.

    The fused pass takes its T task vectors as an array of addresses: a tuple of arrays would
    compile once per task count T (about 3 s each, cold), an address array compiles once."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, like), codegen


@njit(cache=True, fastmath=False)
def _merge_chunk(
    addrs,
    tau_like,
    bits_like,
    lo,
    hi,
    abs_mask,
    exp_mask,
    thr,
    strict,
    seen,
    tie_budget,
    all_keep,
    scale,
    w,
    before,
    by_count,
    zero_pos,
    gmaj,
    divisor,
    lam,
    out,
    want_gamma_sum,
):
    """The fused pass over elements [lo, hi) (one thread's share); returns (non-finite, Σ sgn).

    Task t is the 1-D C-order array at address addrs[t], of tau_like's dtype (values) and
    bits_like's dtype (the same memory as unsigned integers)."""
    T = addrs.size
    hat = np.empty((T, _BLOCK), dtype=np.float64)
    score = np.empty(_BLOCK, dtype=np.float64)
    nbad = 0
    ngamma = 0
    for blo in range(lo, hi, _BLOCK):
        m = min(_BLOCK, hi - blo)
        score[:m] = 0.0
        for t in range(T):
            x = carray(_pointer_like(addrs[t] + blo * tau_like.itemsize, tau_like), m)
            xb = carray(_pointer_like(addrs[t] + blo * bits_like.itemsize, bits_like), m)
            ht = hat[t]
            wt, st, thr_t, strict_t, budget_t, keep_all = w[t], scale[t], thr[t], strict[t], tie_budget[t], all_keep[t]
            seen_t = seen[t]
            if not strict_t and not before and not by_count:
                # every tie at the threshold is kept: keep = |τ| ≥ thr, branch-free and vectorisable
                for j in range(m):
                    key = np.uint64(xb[j]) & abs_mask
                    nbad += (key & exp_mask) == exp_mask
                    h = np.float64(x[j]) * st * (keep_all | (key >= thr_t))
                    ht[j] = h
                    score[j] += h
                continue
            for j in range(m):
                key = np.uint64(xb[j]) & abs_mask
                nbad += (key & exp_mask) == exp_mask
                tie = key == thr_t
                # branch-free trim: the keep decision is data-dependent and would mispredict
                keep = keep_all | (key > thr_t) | (tie & ((not strict_t) | (seen_t < budget_t)))
                seen_t += tie
                h = np.float64(x[j]) * st * keep
                ht[j] = h
                e = wt * h if before else h
                if by_count:
                    score[j] += np.float64(e > 0) - np.float64(e < 0)
                else:
                    score[j] += e
            seen[t] = seen_t
        if want_gamma_sum:
            for j in range(m):
                ngamma += np.int64(score[j] > 0) - np.int64(score[j] < 0)
            continue
        # γ for a zero score: +1, or the caller's global majority (−1 for a 0 majority under
        # "global_majority": γ ≤ 0 selects negative entries; 0 under "global_majority_zero": selects nothing)
        g0 = 1.0 if zero_pos else gmaj
        if not before and divisor == 0 and lam == 1.0:
            # the common case (PEFT and paper profiles): unweighted election, count divisor; the loops
            # are branch-free so they vectorise
            for j in range(m):
                sc = score[j]
                g = 1.0 if sc > 0 else (-1.0 if sc < 0 else g0)
                num = 0.0
                den = 0.0
                for t in range(T):
                    h = hat[t, j]
                    sel = np.float64(h * g > 0)
                    num += (h * w[t]) * sel
                    den += sel
                out[blo + j] = num / max(den, 1.0)
            continue
        for j in range(m):
            sc = score[j]
            g = 1.0 if sc > 0 else (-1.0 if sc < 0 else g0)
            num = 0.0
            den = 0.0
            for t in range(T):
                h = hat[t, j]
                e = w[t] * h if before else h
                sel = np.float64(e * g > 0)
                num += (h * w[t]) * sel
                den += sel if divisor == 0 else w[t] * sel
            if divisor == 0:
                num /= max(den, 1.0)
            elif divisor == 1:
                num /= den if den != 0.0 else 1.0
            if lam != 1.0:
                num *= lam
            out[blo + j] = num
    return nbad, ngamma


@njit(cache=True, nogil=True, fastmath=False)
def _merge_chunks(
    addrs,
    tau_like,
    bits_like,
    abs_mask,
    exp_mask,
    thr,
    strict,
    tie_start,
    tie_budget,
    all_keep,
    scale,
    w,
    before,
    by_count,
    zero_pos,
    gmaj,
    divisor,
    lam,
    nchunks,
    out,
    want_gamma_sum,
    gsum,
    bad,
    c_lo,
    c_hi,
):
    """Chunks [c_lo, c_hi) of ``_merge_pass``."""
    n = tau_like.size
    for c in range(c_lo, c_hi):
        seen = tie_start[:, c].copy()
        nb, ng = _merge_chunk(
            addrs,
            tau_like,
            bits_like,
            c * n // nchunks,
            (c + 1) * n // nchunks,
            abs_mask,
            exp_mask,
            thr,
            strict,
            seen,
            tie_budget,
            all_keep,
            scale,
            w,
            before,
            by_count,
            zero_pos,
            gmaj,
            divisor,
            lam,
            out,
            want_gamma_sum,
        )
        bad[c] = nb
        gsum[c] = ng


def _merge_pass(
    taus,
    bits,
    abs_mask,
    exp_mask,
    thr,
    strict,
    tie_start,
    tie_budget,
    all_keep,
    scale,
    w,
    before,
    by_count,
    zero_pos,
    gmaj,
    divisor,
    lam,
    nchunks,
    out,
    want_gamma_sum,
):
    """One fused pass: trim, weight, elect, select, disjoint mean (see module docstring).

    taus/bits: the T task vectors and their bit views (1-D, C order), passed to the kernel as
    one array of addresses (``_pointer_like``) and read block by block; one compiled kernel per
    input dtype serves every task count. divisor: 0 count, 1 weight_sum, 2 none. With
    want_gamma_sum only Σ_p sgn(score_p) is computed (the global-majority pre-pass) and out is
    untouched. Returns (Σ sgn, non-finite count).
    """
    gsum = np.zeros(nchunks, dtype=np.int64)
    bad = np.zeros(nchunks, dtype=np.int64)
    addrs = np.array([t.ctypes.data for t in taus], dtype=np.int64)  # taus stay referenced for the call
    parallel_ranges(
        _merge_chunks,
        nchunks,
        addrs,
        taus[0],
        bits[0],
        abs_mask,
        exp_mask,
        thr,
        strict,
        tie_start,
        tie_budget,
        all_keep,
        scale,
        w,
        before,
        by_count,
        zero_pos,
        gmaj,
        divisor,
        lam,
        nchunks,
        out,
        want_gamma_sum,
        gsum,
        bad,
    )
    return int(gsum.sum()), int(bad.sum())


@njit(cache=True, nogil=True)
def _l1_chunks(x, xb, abs_mask, thr, strict, tie_start, tie_budget, all_keep, nchunks, acc, c_lo, c_hi):
    """Chunks [c_lo, c_hi) of ``_l1_norms``: acc[c] = (Σ|τ|, Σ|τ̂|) over chunk c."""
    n = x.size
    for c in range(c_lo, c_hi):
        seen = tie_start[c]
        total = 0.0
        kept = 0.0
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            a = abs(np.float64(x[i]))
            key = np.uint64(xb[i]) & abs_mask
            total += a
            if all_keep or _kept(key, thr, strict, tie_budget, seen):
                kept += a
            if key == thr:
                seen += 1
        acc[c, 0] = total
        acc[c, 1] = kept


def _l1_norms(x, xb, abs_mask, thr, strict, tie_start, tie_budget, all_keep, nchunks):
    """(‖τ‖₁, ‖τ̂‖₁) of one task in float64 (for mergekit's L1 rescale): per-chunk sums, then the
    chunk sums added in chunk order."""
    acc = np.zeros((nchunks, 2), dtype=np.float64)
    parallel_ranges(_l1_chunks, nchunks, x, xb, abs_mask, thr, strict, tie_start, tie_budget, all_keep, nchunks, acc)
    before = after = 0.0
    for c in range(nchunks):
        before += float(acc[c, 0])
        after += float(acc[c, 1])
    return before, after


def _stack(task_vectors: Any) -> tuple[list[np.ndarray], tuple[int, ...]]:
    """Check T same-shape, same-dtype float tensors (``operands.task_sequence``, ``same_as_first``); return
    them as 1-D C-order views (float32 copies of float16/bfloat16 inputs, exact) and the common shape.
    Finiteness is checked in the merge pass, not here."""
    arrs: list[np.ndarray] = []
    first: np.ndarray | None = None
    for i, t in enumerate(operands.task_sequence(task_vectors)):
        a = t if isinstance(t, np.ndarray) else np.asarray(t)
        if a.dtype not in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
            a = operands.as_float(t, f"task_vectors[{i}]")[0]
        if a.size == 0:
            raise ValueError(f"task_vectors[{i}]: expected a non-empty array, got {_checks.describe(a)}")
        if first is None:
            first = a
        else:
            operands.same_as_first(i, a.shape, operands.input_dtype(a), first.shape, operands.input_dtype(first))
        arrs.append(np.ascontiguousarray(a, dtype=np.float32 if a.itemsize == 2 else a.dtype).reshape(-1))
    return arrs, tuple(np.shape(task_vectors[0]))


def ties(
    task_vectors: Sequence[Any],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    profile: str = "paper",
    k_rule: str | None = None,
    elect: str | None = None,
    zero_sign: str | None = None,
    weight_stage: str | None = None,
    divisor: str | None = None,
    rescale: str | None = None,
    lam: float = 1.0,
    out_dtype: Any = None,
) -> np.ndarray:
    """``refimpl.merging.ties`` in O(n) with one output tensor of extra memory.

    Same arguments and profiles; ``out_dtype`` (default: the inputs' dtype, float32 for
    float16/bfloat16 inputs) sets the output dtype; each value is computed in float64 and rounded
    once. Pass ``out_dtype=np.float64`` for the reference's output dtype.
    """
    taus, shape = _stack(task_vectors)
    T, n = len(taus), taus[0].size
    w = operands.weight_vector(weights, T)
    d = operands.densities(density, T)
    lam = _checks.real(lam, "lam")
    rules = ties_rules(
        profile,
        k_rule=k_rule,
        elect=elect,
        zero_sign=zero_sign,
        weight_stage=weight_stage,
        divisor=divisor,
        rescale=rescale,
    )
    odt = np.dtype(taus[0].dtype if out_dtype is None else out_dtype)
    if odt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"out_dtype: expected float32 or float64, got {odt}")

    nbits = 8 * taus[0].itemsize
    bits = [t.view(np.uint32 if nbits == 32 else np.uint64) for t in taus]
    abs_mask = np.uint64((1 << (nbits - 1)) - 1)
    nchunks = max(1, min(get_num_threads() * 4, n // 4096 + 1))
    thr = np.zeros(T, dtype=np.uint64)
    strict = np.zeros(T, dtype=np.bool_)
    all_keep = np.zeros(T, dtype=np.bool_)
    tie_budget = np.zeros(T, dtype=np.int64)
    tie_start = np.zeros((T, nchunks), dtype=np.int64)
    for t in range(T):
        if d[t] >= 1.0:
            all_keep[t] = True
            continue
        k = int(d[t] * n)
        rule = rules.k_rule
        if rule == "mask_rate":  # MergeLM: keep |τ| ≥ the m-th smallest, m = int(n·(1 − d))
            drop = int(n * (1.0 - d[t]))
            if drop == 0:
                all_keep[t] = True
                continue
            key, _, _ = _select_desc(bits[t], n - drop + 1, nbits)
            thr[t] = key
            continue
        if rule == "threshold":  # keep |τ| ≥ the (k+1)-th largest
            key, _, _ = _select_desc(bits[t], k + 1, nbits)
            thr[t] = key
            continue
        if rule == "floor_min1":
            k = max(1, k)
        if k >= n:
            all_keep[t] = True
            continue
        if k == 0:  # keep nothing: a threshold above every finite key
            thr[t] = abs_mask
            strict[t] = True
            continue
        key, greater, equal = _select_desc(bits[t], k, nbits)
        thr[t] = key
        if greater + equal > k:  # only some ties fit: lower flat index first
            strict[t] = True
            tie_budget[t] = k - greater
            counts = _tie_prefix(bits[t], abs_mask, np.uint64(key), nchunks)
            tie_start[t, 1:] = np.cumsum(counts)[:-1]
        # else every tie is kept: key >= thr
    scale = np.ones(T, dtype=np.float64)
    if rules.rescale == "l1":
        for t in range(T):
            before, after = _l1_norms(
                taus[t], bits[t], abs_mask, thr[t], strict[t], tie_start[t], tie_budget[t], all_keep[t], nchunks
            )
            if before >= L1_EPS and after >= L1_EPS:
                scale[t] = before / after
    div = {"count": 0, "weight_sum": 1, "none": 2}[rules.divisor]
    exp_mask = np.uint64(0x7F800000 if nbits == 32 else 0x7FF0000000000000)
    args = (
        tuple(taus),
        tuple(bits),
        abs_mask,
        exp_mask,
        thr,
        strict,
        tie_start,
        tie_budget,
        all_keep,
        scale,
        w,
        rules.weight_stage == "before_election",
        rules.elect == "count",
    )
    out = np.empty(n, dtype=odt)
    gmaj = 0.0
    zero_pos = rules.zero_sign == "positive"
    if not zero_pos:
        gsum, _ = _merge_pass(*args, zero_pos, 0.0, div, lam, nchunks, out, True)
        gmaj = float(np.sign(gsum))
        if gmaj == 0.0 and rules.zero_sign == "global_majority":
            gmaj = -1.0
    _, bad = _merge_pass(*args, zero_pos, gmaj, div, lam, nchunks, out, False)
    if bad:
        raise ValueError("task_vectors: expected finite values, got NaN or inf")
    return out.reshape(shape)
