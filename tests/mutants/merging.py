"""One-defect mutants of refimpl.merging: each is the reference op with one bug a merge-kernel author could ship.

Written from the causes (``tests/mutants/__init__.py``): the k rule of a trim (ceil instead of floor, the
planted k + 1, the threshold rule's extra entry), tie breaks, the sign election (count for mass, zeros
voting, an elected 0 read as +), the disjoint mean's divisor, DARE's rescale, an option or a profile
ignored, λ applied twice or never, negative weights clipped, a vector-width tail dropped, SLERP's
fallback threshold and t ↔ 1 − t, LoRA-space scaling on the wrong factor or twice, an SVD split read
wrongly, and an ε added to a norm. Each ``fn`` takes the reference's keyword arguments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

import refimpl.merging as M
from refimpl.merging import lora_space, operands, profiles, sparsify, spherical, ties_dare
from tests.mutants import Mutant

# ----------------------------------------------------------------------------- a TIES pipeline with hooks


def _trim(
    tau: np.ndarray, d: float, rule: str, *, k_fn=None, tie_high: bool = False, smallest: bool = False
) -> np.ndarray:
    """``sparsify.trim_mask`` with one optional defect: another k, ties by higher index, or the smallest kept."""
    a = np.abs(tau).ravel()
    n = a.size
    if d >= 1.0:
        return np.ones(tau.shape, dtype=bool)
    k = k_fn(d, n) if k_fn else int(d * n)
    if smallest:
        a = -a
    if rule == "threshold":
        k = min(k, n - 1)
        kth = np.partition(a, n - k - 1)[n - k - 1]
        return (a >= kth).reshape(tau.shape)
    if rule == "floor_min1":
        k = max(1, k)
    if k <= 0:
        return np.zeros(tau.shape, dtype=bool)
    if k >= n:
        return np.ones(tau.shape, dtype=bool)
    v = np.partition(a, n - k)[n - k]
    keep = a > v
    tied = np.flatnonzero(a == v)
    room = k - int(keep.sum())
    keep[(tied[::-1] if tie_high else tied)[:room]] = True
    return keep.reshape(tau.shape)


def _elect(
    taus, w, *, elect, zero_sign, weight_stage, divisor, zeros_vote=False, zero_is_plus=False, divide_by_all=False
):
    """``ties_dare._elect_and_merge`` with one optional defect."""
    before = weight_stage == "before_election"
    score = np.zeros(taus[0].shape)
    for t, wt in zip(taus, w, strict=True):
        e = wt * t if before else t
        score += e if elect == "sum" else np.sign(e)
    gamma = np.sign(score)
    if zero_sign == "positive" or zero_is_plus:
        gamma[gamma == 0] = 1.0
    else:
        gamma[gamma == 0] = np.sign(gamma.sum())
    num = np.zeros(score.shape)
    den = np.zeros(score.shape)
    for t, wt in zip(taus, w, strict=True):
        e = wt * t if before else t
        sel = np.where(gamma > 0, e >= 0 if zeros_vote else e > 0, e < 0)
        num += wt * t * sel
        den += sel if divisor == "count" else wt * sel
    if divisor == "none":
        return num
    if divide_by_all:
        return num / len(taus)
    if divisor == "count":
        return num / np.maximum(den, 1.0)
    den[den == 0] = 1.0
    return num / den


def _ties(
    task_vectors,
    weights=None,
    *,
    density,
    profile="paper",
    lam=1.0,
    trim=None,
    elect_kw=None,
    opt_override=None,
    lam_twice=False,
    tail=0,
    first_density=False,
    **given,
):
    """``merging.ties`` assembled from the hooks above; every keyword is one defect."""
    taus = operands.task_list(task_vectors)
    w = operands.weight_vector(weights, len(taus))
    d = sparsify.densities(density, len(taus))
    if first_density:
        d = np.full_like(d, d[0])
    opts = dataclasses.asdict(profiles.ties_rules(profile, **given))
    opts.update(opt_override or {})
    hat = []
    for tau, dt in zip(taus, d, strict=True):
        m = _trim(tau, dt, opts["k_rule"], **(trim or {}))
        hat.append(sparsify._l1_rescaled(tau, m) if opts["rescale"] == "l1" else tau * m)
    merged = _elect(
        hat,
        w,
        elect=opts["elect"],
        zero_sign=opts["zero_sign"],
        weight_stage=opts["weight_stage"],
        divisor=opts["divisor"],
        **(elect_kw or {}),
    )
    merged = merged * lam * (lam if lam_twice else 1.0)
    if tail:  # a vector-width remainder never written (left at zero)
        flat = merged.reshape(-1)
        r = flat.size % tail
        if r:
            flat[flat.size - r :] = 0.0
    return merged


def _ties_mutant(**defect):
    def fn(task_vectors, weights=None, **kw):
        return _ties(task_vectors, weights, **kw, **defect)

    return fn


def _planted_k_plus_one(task_vectors, weights=None, *, density, **kw):
    """tests/test_conformance_planted.py: one entry more than ⌊d·n⌋ (density nudged so the floor lands on k + 1)."""
    n = np.asarray(task_vectors[0]).size
    k = int(sparsify.densities(density, len(task_vectors))[0] * n)
    return M.ties(task_vectors, weights, density=min(1.0, (k + 1.5) / n), **kw)


# ----------------------------------------------------------------------------- other merges


def _prune(
    task_vectors,
    weights=None,
    *,
    density,
    profile="peft",
    k_rule=None,
    rescale=None,
    lam=1.0,
    smallest=False,
    force_rule=None,
):
    taus = operands.task_list(task_vectors)
    w = operands.weight_vector(weights, len(taus))
    d = sparsify.densities(density, len(taus))
    opts = {"k_rule": k_rule or profiles.profile(profile).ties.k_rule, "rescale": rescale or "none"}
    rule = force_rule or opts["k_rule"]
    out = np.zeros(taus[0].shape)
    for tau, wt, dt in zip(taus, w, d, strict=True):
        m = _trim(tau, dt, rule, smallest=smallest)
        out += wt * (sparsify._l1_rescaled(tau, m) if opts["rescale"] == "l1" else tau * m)
    return lam * out


def _ta_lam_twice(task_vectors, weights=None, *, lam=1.0, normalize=False):
    return lam * M.task_arithmetic(task_vectors, weights, lam=lam, normalize=normalize)


def _ta_no_normalize(task_vectors, weights=None, *, lam=1.0, normalize=False):
    return M.task_arithmetic(task_vectors, weights, lam=lam, normalize=False)


def _ta_abs_normalize(task_vectors, weights=None, *, lam=1.0, normalize=False):
    out = M.task_arithmetic(task_vectors, weights, lam=lam, normalize=False)
    if normalize:
        w = operands.weight_vector(weights, len(task_vectors))
        out = out / float(np.abs(w).sum())
    return out


def _linear_clip(tensors, weights=None, *, normalize=True):
    w = None if weights is None else [max(0.0, float(v)) for v in weights]
    if w is not None and normalize and sum(w) == 0.0:
        w = [1.0] * len(w)
    return M.linear(tensors, w, normalize=normalize)


def _linear_always_normalize(tensors, weights=None, *, normalize=True):
    return M.linear(tensors, weights, normalize=True)


def _dare_with(*, drop=None, force_merge=None, skip_normalize=False):
    """``merging.dare`` with one defect: another drop step, the merge mode or normalize ignored."""

    def fn(
        task_vectors,
        weights=None,
        *,
        density,
        masks=None,
        rng=None,
        merge="linear",
        profile="paper",
        lam=1.0,
        normalize=None,
        **kw,
    ):
        taus = operands.task_list(task_vectors)
        w = operands.weight_vector(weights, len(taus))
        d = sparsify.densities(density, len(taus))
        rules = profiles.dare_rules(
            profile, force_merge or merge, normalize=False if skip_normalize else normalize, **kw
        )
        if rules.merge == "linear" and rules.normalize:
            operands.normalizable(w)
        ms = (
            sparsify.keep_masks(masks, taus)
            if masks is not None
            else sparsify.dare_masks(taus[0].shape, len(taus), d, rng)
        )
        step = drop or sparsify.dare_drop
        dropped = [step(t, m, dt, rules.rescale) for t, m, dt in zip(taus, ms, d, strict=True)]
        # the rest of the reference pipeline, its own drop made a no-op (keep-all masks, no rescale)
        return ties_dare._dare(
            dropped,
            w,
            d,
            [np.ones(t.shape, bool) for t in dropped],
            dataclasses.replace(rules, rescale="none"),
            float(lam),
        )

    return fn


def _drop_times_d(tau, mask, density, rescale):
    out = tau * mask
    if rescale == "l1":
        return sparsify._l1_rescaled(tau, mask)
    return out * density if rescale == "inverse" else out


def _drop_no_rescale(tau, mask, density, rescale):
    return sparsify._l1_rescaled(tau, mask) if rescale == "l1" else tau * mask


def _drop_l2(tau, mask, density, rescale):
    if rescale != "l1":
        return sparsify.dare_drop(tau, mask, density, rescale)
    masked = tau * mask
    before, after = float(np.linalg.norm(tau)), float(np.linalg.norm(masked))
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


# ----------------------------------------------------------------------------- SLERP


def _slerp_with(*, threshold=None, always_linear=False, swap=False, signed_dot=False, eps_in_norm=False):
    def fn(t, v0, v1, *, dot_threshold=spherical.DOT_THRESHOLD, eps=spherical.EPS):
        thr = dot_threshold if threshold is None else threshold
        a = np.asarray(v0, dtype=np.float64)
        b = np.asarray(v1, dtype=np.float64)
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if eps_in_norm:
            na, nb = na + eps, nb + eps
        na = na if na > eps else 1.0
        nb = nb if nb > eps else 1.0
        dot = float(np.clip(np.dot(a.ravel() / na, b.ravel() / nb), -1.0, 1.0))
        tt = 1.0 - t if swap else float(t)
        if always_linear or (dot if signed_dot else abs(dot)) > thr:
            return (1.0 - tt) * a + tt * b
        om = math.acos(dot)
        s = math.sin(om)
        return math.sin((1.0 - tt) * om) / s * a + math.sin(tt * om) / s * b

    return fn


def _slerp_coefficients_f32(t, v0, v1, *, dot_threshold=spherical.DOT_THRESHOLD, eps=spherical.EPS):
    c = M.slerp_coefficients(t, v0, v1, dot_threshold=dot_threshold, eps=eps)
    if c.linear:
        return c
    om = np.float32(np.arccos(np.float32(c.dot)))
    s = np.sin(om)
    c0 = float(np.sin(np.float32(1.0 - t) * om) / s)
    return spherical.SlerpCoefficients(c0, float(np.sin(np.float32(t) * om) / s), c.dot, False)


# ----------------------------------------------------------------------------- LoRA space


def _cat_scale_on_b(As, Bs, scalings, weights=None):
    A, B, c = lora_space._adapters(As, Bs, scalings, weights)
    return np.concatenate(A, axis=0), np.concatenate([ci * b for ci, b in zip(c, B, strict=True)], axis=1)


def _cat_no_weights(As, Bs, scalings, weights=None):
    return M.lora_cat(As, Bs, scalings)


def _delta_first_scaling(As, Bs, scalings, weights=None):
    s = scalings if np.ndim(scalings) == 0 else [float(np.ravel(scalings)[0])] * len(As)
    return M.lora_delta(As, Bs, s, weights)


def _factor_linear_sign_lost(As, Bs, scalings, weights=None):
    w = None if weights is None else [abs(float(v)) for v in weights]
    s = scalings if np.ndim(scalings) == 0 else [abs(float(v)) for v in scalings]
    return M.lora_factor_linear(As, Bs, s, w)


def _svd_min_rank(As, Bs, scalings, weights=None, *, rank=None, split="B", clamp=None):
    r = min(np.shape(a)[0] for a in As) if rank is None else rank
    return M.lora_svd(As, Bs, scalings, weights, rank=r, split=split, clamp=clamp)


def _svd_scaled_twice(As, Bs, scalings, weights=None, *, rank=None, split="B", clamp=None):
    _, _, c = lora_space._adapters(As, Bs, scalings, weights)
    r = max(np.shape(a)[0] for a in As) if rank is None else rank
    return M.lowrank_factors(M.lora_delta(As, Bs, scalings, list(c)), r, split=split, clamp=clamp)


def _lowrank_split_ignored(delta, rank, *, split="B", clamp=None):
    return M.lowrank_factors(delta, rank, split="B", clamp=clamp)


# ----------------------------------------------------------------------------- building blocks


def _task_vector_reversed(finetuned, base):
    return M.task_vector(base, finetuned)


def _trim_mask_exact_k(tau, density, *, k_rule="threshold"):
    t = np.asarray(tau, dtype=np.float64)
    return _trim(t, float(density), "floor" if k_rule == "threshold" else k_rule)


def _elect_zeros_vote(trimmed, weights, *, elect, zero_sign, weight_stage, divisor):
    taus = [np.asarray(t, dtype=np.float64) for t in trimmed]
    return _elect(
        taus,
        operands.weight_vector(weights, len(taus)),
        elect=elect,
        zero_sign=zero_sign,
        weight_stage=weight_stage,
        divisor=divisor,
        zeros_vote=True,
    )


def _dare_masks_upper_tail(shape, count, density, rng):
    d = sparsify.densities(density, count)
    return [rng.random(tuple(shape)) > 1.0 - d[t] for t in range(count)]


def _l1_no_guard(tau, mask):
    t = np.asarray(tau, dtype=np.float64)
    masked = t * np.asarray(mask, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return masked * (float(np.abs(t).sum()) / float(np.abs(masked).sum()))


def _flatten_insertion_order(state, *, remove_keys=()):
    _, layout = M.flatten_model(state, remove_keys=remove_keys)
    keys = [k for k in state if k in layout.keys]
    parts = [np.asarray(state[k], dtype=np.float64).ravel() for k in keys]
    return np.concatenate(parts), M.ModelLayout(tuple(keys), tuple(np.shape(state[k]) for k in keys))


def _m(name: str, op: str, cause: str, fn: Any) -> Mutant:
    return Mutant(name, op, cause, fn)


MUTANTS: list[Mutant] = [
    # TIES: the k rule, tie breaks, election and divisor, options and profiles, λ, tails
    _m(
        "ties: k = ceil(d·n) instead of floor",
        "merging.ties",
        "merge rules",
        _ties_mutant(trim={"k_fn": lambda d, n: math.ceil(d * n)}),
    ),
    _m("ties: planted k off-by-one (keeps ⌊d·n⌋ + 1)", "merging.ties", "thresholds", _planted_k_plus_one),
    _m(
        "ties: ties at the k-th magnitude kept by higher flat index",
        "merging.ties",
        "thresholds",
        _ties_mutant(trim={"tie_high": True}),
    ),
    _m(
        "ties: sign election by count whatever elect says",
        "merging.ties",
        "merge rules",
        _ties_mutant(opt_override={"elect": "count"}),
    ),
    _m(
        "ties: disjoint mean divides by all T tasks",
        "merging.ties",
        "merge rules",
        _ties_mutant(elect_kw={"divide_by_all": True}),
    ),
    _m(
        "ties: elected sign 0 treated as + (global majority ignored)",
        "merging.ties",
        "special values",
        _ties_mutant(elect_kw={"zero_is_plus": True}),
    ),
    _m(
        "ties: zeros vote and count with a positive sign",
        "merging.ties",
        "special values",
        _ties_mutant(elect_kw={"zeros_vote": True}),
    ),
    _m(
        "ties: λ ignored",
        "merging.ties",
        "scaling",
        lambda task_vectors, weights=None, *, lam=1.0, **kw: M.ties(task_vectors, weights, **kw),
    ),
    _m("ties: λ applied twice", "merging.ties", "scaling", _ties_mutant(lam_twice=True)),
    _m(
        "ties: weight_stage ignored (weights always after the election)",
        "merging.ties",
        "options",
        _ties_mutant(opt_override={"weight_stage": "after_election"}),
    ),
    _m("ties: rescale='l1' ignored", "merging.ties", "options", _ties_mutant(opt_override={"rescale": "none"})),
    _m(
        "ties: divisor 'weight_sum' read as 'count'",
        "merging.ties",
        "options",
        lambda task_vectors, weights=None, *, divisor=None, profile="paper", **kw: _ties(
            task_vectors,
            weights,
            profile=profile,
            **kw,
            divisor="count" if (divisor or profiles.TIES_PROFILES[profile]["divisor"]) == "weight_sum" else divisor,
        ),
    ),
    _m(
        "ties: profile ignored (always paper)",
        "merging.ties",
        "options",
        lambda task_vectors, weights=None, *, profile="paper", **kw: M.ties(task_vectors, weights, **kw),
    ),
    _m("ties: per-task densities read as the first one", "merging.ties", "options", _ties_mutant(first_density=True)),
    _m(
        "ties: floor_min1 read as floor (d·n < 1 keeps nothing)",
        "merging.ties",
        "options",
        lambda task_vectors, weights=None, *, k_rule=None, profile="paper", **kw: M.ties(
            task_vectors,
            weights,
            profile=profile,
            **kw,
            k_rule="floor" if (k_rule or profiles.TIES_PROFILES[profile]["k_rule"]) == "floor_min1" else k_rule,
        ),
    ),
    _m("ties: the last n % 16 entries never written", "merging.ties", "tails", _ties_mutant(tail=16)),
    _m("ties: the last n % 8 entries never written", "merging.ties", "tails", _ties_mutant(tail=8)),
    # magnitude prune
    _m(
        "magnitude_prune: keeps the smallest magnitudes",
        "merging.magnitude_prune",
        "merge rules",
        lambda task_vectors, weights=None, **kw: _prune(task_vectors, weights, smallest=True, **kw),
    ),
    _m(
        "magnitude_prune: profile's k_rule ignored (always floor)",
        "merging.magnitude_prune",
        "options",
        lambda task_vectors, weights=None, *, k_rule=None, **kw: _prune(
            task_vectors, weights, force_rule=k_rule or "floor", **kw
        ),
    ),
    # task arithmetic and linear
    _m("task_arithmetic: λ applied twice", "merging.task_arithmetic", "scaling", _ta_lam_twice),
    _m("task_arithmetic: normalize ignored", "merging.task_arithmetic", "options", _ta_no_normalize),
    _m("task_arithmetic: normalize divides by Σ|w|", "merging.task_arithmetic", "scaling", _ta_abs_normalize),
    _m("linear: negative weights clipped to 0", "merging.linear", "merge rules", _linear_clip),
    _m("linear: normalize=False ignored", "merging.linear", "options", _linear_always_normalize),
    # DARE
    _m("dare: rescale by d instead of 1/d", "merging.dare", "scaling", _dare_with(drop=_drop_times_d)),
    _m("dare: inverse rescale missing", "merging.dare", "scaling", _dare_with(drop=_drop_no_rescale)),
    _m("dare: L1 rescale with L2 norms", "merging.dare", "merge rules", _dare_with(drop=_drop_l2)),
    _m("dare: merge='ties' ignored (always linear)", "merging.dare", "options", _dare_with(force_merge="linear")),
    _m("dare: normalize ignored", "merging.dare", "options", _dare_with(skip_normalize=True)),
    # SLERP
    _m("slerp: fallback threshold 0.995", "merging.slerp", "thresholds", _slerp_with(threshold=0.995)),
    _m("slerp: fallback threshold 0.99995", "merging.slerp", "thresholds", _slerp_with(threshold=0.99995)),
    _m("slerp: always linear interpolation", "merging.slerp", "merge rules", _slerp_with(always_linear=True)),
    _m("slerp: t and 1 − t swapped", "merging.slerp", "merge rules", _slerp_with(swap=True)),
    _m(
        "slerp: fallback on cos Ω, not |cos Ω| (antiparallel)",
        "merging.slerp",
        "thresholds",
        _slerp_with(signed_dot=True),
    ),
    _m("slerp: eps added to the norms", "merging.slerp", "precision", _slerp_with(eps_in_norm=True)),
    _m(
        "slerp_coefficients: Ω and the sines in float32",
        "merging.slerp_coefficients",
        "precision",
        _slerp_coefficients_f32,
    ),
    # LoRA space
    _m("lora_cat: c_i applied to B_i instead of A_i", "merging.lora_cat", "scaling", _cat_scale_on_b),
    _m("lora_cat: weights ignored", "merging.lora_cat", "options", _cat_no_weights),
    _m("lora_delta: the first scaling for every adapter", "merging.lora_delta", "scaling", _delta_first_scaling),
    _m(
        "lora_factor_linear: negative weights lose their sign",
        "merging.lora_factor_linear",
        "special values",
        _factor_linear_sign_lost,
    ),
    _m("lora_svd: default rank min r_i instead of max r_i", "merging.lora_svd", "options", _svd_min_rank),
    _m("lora_svd: w_i·s_i applied twice", "merging.lora_svd", "scaling", _svd_scaled_twice),
    _m("lowrank_factors: split='sqrt' read as 'B'", "merging.lowrank_factors", "options", _lowrank_split_ignored),
    # building blocks
    _m("task_vector: base − finetuned", "merging.task_vector", "transposition", _task_vector_reversed),
    _m("trim_mask: threshold rule keeps exactly k", "merging.trim_mask", "thresholds", _trim_mask_exact_k),
    _m("elect_and_merge: zeros vote and count as +", "merging.elect_and_merge", "special values", _elect_zeros_vote),
    _m("dare_masks: keeps u > 1 − d instead of u < d", "merging.dare_masks", "merge rules", _dare_masks_upper_tail),
    _m("l1_rescaled: no guard for a zero kept norm", "merging.l1_rescaled", "special values", _l1_no_guard),
    _m(
        "flatten_model: insertion order instead of sorted keys",
        "merging.flatten_model",
        "transposition",
        _flatten_insertion_order,
    ),
]
