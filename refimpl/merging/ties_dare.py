"""TIES (trim, elect sign, disjoint merge) and DARE (drop and rescale), with peer profiles.

TIES: Yadav et al., NeurIPS 2023, arXiv 2306.01708, Algorithm 1:
    τ̂_t = trim_k(τ_t);  γ = sgn(Σ_t τ̂_t);  A_p = {t : sgn(τ̂_t,p) = γ_p};
    τ_m,p = (1/|A_p|) Σ_{t∈A_p} τ̂_t,p;  θ = θ₀ + λ τ_m.
DARE: Yu et al., ICML 2024, arXiv 2311.03099, eq. (1): m_t ~ Bernoulli(1 − p) elementwise,
    τ̂_t = τ_t ⊙ m_t / (1 − p), then any merge (task arithmetic, TIES) of the τ̂_t.
Keep fraction d = 1 − p throughout (``density``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, precision
from refimpl.merging import _common
from refimpl.merging.sparsify import (
    K_RULES,
    RESCALES,
    TRIM_K_RULE,
    _l1_rescaled,
    dare_drop,
    dare_masks,
    densities,
    keep_masks,
    trim_mask,
)

ELECT = ("sum", "count")
ZERO_SIGN = ("positive", "global_majority", "global_majority_zero")
WEIGHT_STAGE = ("before_election", "after_election")
DIVISOR = ("count", "weight_sum", "none")

#: Per-profile TIES options (spec/merging.md, "TIES profiles").
TIES_PROFILES: dict[str, dict[str, Any]] = {
    # prateeky2806/ties-merging: topk_values_mask, resolve_sign("mass") + resolve_zero_signs("majority"),
    # disjoint_merge("dis-mean"). The official code has no per-task weights; given weights act as in PEFT.
    "paper": {"k_rule": TRIM_K_RULE["paper"], "elect": "sum", "zero_sign": "global_majority",
              "weight_stage": "after_election", "divisor": "count", "rescale": "none"},
    # PEFT 0.21.2 merge_utils.ties: topk prune, elect on unweighted tensors (tie → +1), count mean.
    "peft": {"k_rule": TRIM_K_RULE["peft"], "elect": "sum", "zero_sign": "positive",
             "weight_stage": "after_election", "divisor": "count", "rescale": "none"},
    # mergekit 0.1.5 ties (normalize=True, rescale=False): weights before the election (mergekit#474),
    # divisor Σ w over agreeing entries.
    "mergekit": {"k_rule": TRIM_K_RULE["mergekit"], "elect": "sum", "zero_sign": "positive",
                 "weight_stage": "before_election", "divisor": "weight_sum", "rescale": "none"},
    # yule-BUAA/MergeLM model_merging_methods/merging_methods.py ties_merging: kthvalue at
    # int(n · mask_rate) with mask_rate = 1 − d (keeps one more than the official code when d·n is not
    # whole), sign of the sum, zeros → global majority, and where that is 0 too γ = 0 selects nothing.
    "mergelm": {"k_rule": TRIM_K_RULE["mergelm"], "elect": "sum", "zero_sign": "global_majority_zero",
                "weight_stage": "after_election", "divisor": "count", "rescale": "none"},
}

def _dare_profile(profile: str, dare_rescale: str, ties_density: float, **overrides: Any) -> dict[str, Any]:
    base = {k: v for k, v in TIES_PROFILES[profile].items() if k not in ("k_rule", "rescale")}
    return {**base, "dare_rescale": dare_rescale, "normalize": False, "ties_density": ties_density, **overrides}


#: Per-profile DARE options. ``ties_density`` is the TIES trim applied after the drop (paper only).
DARE_PROFILES: dict[str, dict[str, Any]] = {
    "paper": _dare_profile("paper", "inverse", 0.2),
    "peft": _dare_profile("peft", "inverse", 1.0),
    # mergekit dare_ties: normalize=False, so the agreeing entries are summed, not averaged.
    "mergekit": _dare_profile("mergekit", "l1", 1.0, divisor="none"),
    # MergeLM mask_merging + ties_merging: drop, rescale by 1/(1 − p), then its TIES (mask rate 0.8).
    "mergelm": _dare_profile("mergelm", "inverse", 0.2),
}


@precision._overflow_checked
def elect_and_merge(
    trimmed: Sequence[npt.ArrayLike] | npt.NDArray[Any],
    weights: npt.ArrayLike,
    *,
    elect: str,
    zero_sign: str,
    weight_stage: str,
    divisor: str,
) -> npt.NDArray[np.float64]:
    """Sign election and disjoint merge of T trimmed task vectors, a list or a (T, ...) stack
    (validated; the formula is in ``_elect_and_merge``)."""
    taus = _common.task_list(list(trimmed) if isinstance(trimmed, np.ndarray) and trimmed.ndim > 1 else trimmed,
                             "trimmed")
    w = _common.weight_vector(weights, len(taus))
    for key, value, allowed in (("elect", elect, ELECT), ("zero_sign", zero_sign, ZERO_SIGN),
                                ("weight_stage", weight_stage, WEIGHT_STAGE), ("divisor", divisor, DIVISOR)):
        _checks.choice(value, key, allowed)
    return _elect_and_merge(taus, w, elect=elect, zero_sign=zero_sign, weight_stage=weight_stage, divisor=divisor)


def _elect_and_merge(
    trimmed: Sequence[np.ndarray],
    weights: np.ndarray,
    *,
    elect: str,
    zero_sign: str,
    weight_stage: str,
    divisor: str,
) -> np.ndarray:
    """Sign election and disjoint merge of T trimmed task vectors (a list or a (T, ...) stack).

    e_t = w_t τ̂_t (``weight_stage="before_election"``, mergekit) or τ̂_t (PEFT, paper);
    score = Σ_t e_t (``elect="sum"``: mass / total) or Σ_t sgn(e_t) (``"count"``: frequency);
    γ = sgn(score), where score = 0 gives +1 (``zero_sign="positive"``) or the global majority
    sgn(Σ_p γ_p) (``"global_majority"``; if that is 0 too, γ_p stays 0 and selects negative entries,
    as the official TIES code does; ``"global_majority_zero"``: γ_p = 0 selects nothing, as MergeLM does);
    m_t = (γ > 0 ∧ e_t > 0) ∨ (γ ≤ 0 ∧ e_t < 0) [∧ γ ≠ 0 for ``"global_majority_zero"``], so zeros never
    vote nor count;
    τ_m = Σ_t w_t τ̂_t m_t / D with D = max(Σ_t m_t, 1) (``"count"``), Σ_t w_t m_t with 0 → 1
    (``"weight_sum"``) or 1 (``"none"``).
    """
    # Loops over the (few) tasks with in-place updates keep the working set to ~4 tensors.
    before = weight_stage == "before_election"
    shape = np.shape(trimmed[0])
    score = np.zeros(shape)
    for t, w in zip(trimmed, weights, strict=True):
        if elect == "sum":
            score += w * t if before else t
        else:
            score += np.sign(w * t if before else t)
    gamma = np.sign(score)
    del score
    if zero_sign == "positive":
        gamma[gamma == 0] = 1.0
    else:
        gamma[gamma == 0] = np.sign(gamma.sum())
    positive = gamma > 0
    live = gamma != 0 if zero_sign == "global_majority_zero" else None
    del gamma
    numerator = np.zeros(shape)
    den = np.zeros(shape) if divisor != "none" else None
    for t, w in zip(trimmed, weights, strict=True):
        vote = t * w if before else t  # the sign that voted, e_t
        sel = np.where(positive, vote > 0, vote < 0)
        if live is not None:
            sel &= live
        del vote
        contribution = t * w
        contribution *= sel
        numerator += contribution
        del contribution
        if divisor == "count":
            den += sel
        elif divisor == "weight_sum":
            den += sel * w
        del sel
    if den is None:
        return numerator
    if divisor == "count":
        np.maximum(den, 1.0, out=den)
    else:
        den[den == 0] = 1.0
    numerator /= den
    return numerator


def _ties_options(profile: str, table: dict, given: dict) -> dict:
    opts = _common.profile_options(profile, table, given)
    for key, allowed in (("elect", ELECT), ("zero_sign", ZERO_SIGN), ("weight_stage", WEIGHT_STAGE),
                         ("divisor", DIVISOR)):
        _checks.choice(opts[key], key, allowed)
    return opts


@precision._overflow_checked
def ties(
    task_vectors: Sequence[npt.ArrayLike],
    weights: npt.ArrayLike | None = None,
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
) -> npt.NDArray[np.float64]:
    """TIES-merged task vector λ·τ_m (add it to θ₀); arXiv 2306.01708, Algorithm 1.

    Each task vector is trimmed to its top-d magnitudes (``trim_mask`` with ``k_rule``; optionally
    L1-rescaled, ``rescale="l1"``), then ``elect_and_merge``. Pass one tensor per task for the
    per-tensor scope (PEFT, mergekit) or ``flatten_model`` vectors for the whole-model scope (paper).
    ``profile`` picks the defaults of every option (table in spec/merging.md); explicit options win.
    The official code has no weights; in the ``paper`` profile given weights are applied after the
    election, as PEFT does. mergekit's ``normalize=False`` is ``divisor="none"``.
    """
    taus = _common.task_list(task_vectors)  # float64 copies, trimmed in place below
    w = _common.weight_vector(weights, len(taus))
    d = densities(density, len(taus))
    opts = ties_options(profile, k_rule=k_rule, elect=elect, zero_sign=zero_sign, weight_stage=weight_stage,
                        divisor=divisor, rescale=rescale)
    return ties_owned(taus, w, d, opts, _checks.real(lam, "lam"))


def ties_options(profile: str, **given: Any) -> dict[str, Any]:
    """The TIES options of ``profile`` with the explicitly given (non-None) ones substituted, validated."""
    opts = _ties_options(profile, TIES_PROFILES, given)
    _checks.choice(opts["k_rule"], "k_rule", K_RULES)
    _checks.choice(opts["rescale"], "rescale", ("l1", "none"))
    return opts


def ties_owned(taus: list[np.ndarray], w: np.ndarray, d: np.ndarray, opts: dict[str, Any], lam: float
               ) -> np.ndarray:
    """``ties`` on validated float64 arrays that the caller hands over (they are trimmed in place)."""
    for i, (tau, dt) in enumerate(zip(taus, d, strict=True)):
        m = trim_mask(tau, dt, k_rule=opts["k_rule"])
        if opts["rescale"] == "l1":
            taus[i] = _l1_rescaled(tau, m)
        else:
            tau *= m
        del m
    merged = _elect_and_merge(taus, w, elect=opts["elect"], zero_sign=opts["zero_sign"],
                             weight_stage=opts["weight_stage"], divisor=opts["divisor"])
    if lam != 1.0:
        merged *= lam
    return merged


@precision._overflow_checked
def dare(
    task_vectors: Sequence[npt.ArrayLike],
    weights: npt.ArrayLike | None = None,
    *,
    density: float | Sequence[float],
    masks: Sequence[npt.ArrayLike] | None = None,
    rng: np.random.Generator | None = None,
    merge: str = "linear",
    profile: str = "paper",
    rescale: str | None = None,
    normalize: bool | None = None,
    ties_density: float | None = None,
    elect: str | None = None,
    zero_sign: str | None = None,
    weight_stage: str | None = None,
    divisor: str | None = None,
    lam: float = 1.0,
) -> npt.NDArray[np.float64]:
    """DARE-merged task vector; arXiv 2311.03099 eq. (1), τ̂_t = τ_t ⊙ m_t / d_t, then a merge.

    The keep-masks m_t (1 = keep) are ``masks`` (one per task), or drawn with ``dare_masks(shape, T,
    density, rng)``; exactly one of the two must be given. ``rescale``: ``"inverse"`` (1/d, the paper
    and PEFT ≥ 0.19), ``"l1"`` (mergekit ≥ PR #505: ‖τ‖₁/‖τ ⊙ m‖₁ per tensor) or ``"none"``.

    ``merge="linear"``: λ·Σ_t w_t τ̂_t (÷ Σ w with ``normalize``) — PEFT/mergekit ``dare_linear``.
    ``merge="ties"``: TIES on the τ̂_t. The paper (MergeLM#38) runs the full TIES, trim included
    (``ties_density``, default 0.2 = MergeLM's mask rate 0.8); PEFT and mergekit ``dare_ties`` skip the
    trim (``ties_density=1``) and differ in election and divisor as in ``ties``.
    """
    taus = _common.task_list(task_vectors)  # float64 copies, dropped in place below
    w = _common.weight_vector(weights, len(taus))
    d = densities(density, len(taus))
    opts = dare_options(profile, merge, rescale=rescale, normalize=normalize, ties_density=ties_density,
                        elect=elect, zero_sign=zero_sign, weight_stage=weight_stage, divisor=divisor)
    if masks is None and rng is not None:
        ms = dare_masks(taus[0].shape, len(taus), d.tolist(), rng)
    elif masks is not None and rng is None:
        ms = keep_masks(masks, taus)
    else:
        raise ValueError("masks, rng: expected exactly one of them (the DARE keep-masks or a Generator to "
                         f"draw them), got masks={_checks.describe(masks)} and rng={_checks.describe(rng)}")
    return dare_owned(taus, w, d, ms, opts, _checks.real(lam, "lam"))


def dare_options(profile: str, merge: str, **given: Any) -> dict[str, Any]:
    """The DARE options of ``profile`` (``rescale`` given as such) with explicit ones substituted, validated."""
    _checks.choice(merge, "merge", ("linear", "ties"))
    given = dict(given)
    given["dare_rescale"] = given.pop("rescale", None)
    opts = _ties_options(profile, DARE_PROFILES, given)
    _checks.choice(opts["dare_rescale"], "rescale", RESCALES)
    opts["normalize"] = _checks.boolean(opts["normalize"], "normalize")
    opts["ties_density"] = _common.density(opts["ties_density"], "ties_density")
    opts["merge"], opts["profile"] = merge, profile
    return opts


def dare_owned(taus: list[np.ndarray], w: np.ndarray, d: np.ndarray, masks: Sequence[np.ndarray],
               opts: dict[str, Any], lam: float) -> np.ndarray:
    """``dare`` on validated float64 arrays that the caller hands over (dropped in place)."""
    for i in range(len(taus)):
        taus[i] = dare_drop(taus[i], masks[i], d[i], opts["dare_rescale"])
    if opts["merge"] == "linear":
        merged = np.zeros(taus[0].shape)
        for tau, wt in zip(taus, w, strict=True):
            tau *= wt
            merged += tau
        if opts["normalize"]:
            total = float(w.sum())
            if abs(total) < 1e-8:
                raise ValueError(f"weights: normalize=True needs |Σ w| ≥ 1e-8, got Σ w = {total!r}")
            merged /= total
    else:
        k_rule = TRIM_K_RULE[opts["profile"]]
        for tau in taus:
            tau *= trim_mask(tau, opts["ties_density"], k_rule=k_rule)
        merged = _elect_and_merge(taus, w, elect=opts["elect"], zero_sign=opts["zero_sign"],
                                 weight_stage=opts["weight_stage"], divisor=opts["divisor"])
    if lam != 1.0:
        merged *= lam
    return merged
