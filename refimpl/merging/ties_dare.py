"""TIES (trim, elect sign, disjoint merge) and DARE (drop and rescale).

TIES: Yadav et al., NeurIPS 2023, arXiv 2306.01708, Algorithm 1:
    τ̂_t = keep the top-k% magnitudes of τ_t;  γ_m = sgn(Σ_t τ̂_t);  A_p = {t : sgn(τ̂_t,p) = γ_m,p};
    τ_m,p = (1/|A_p|) Σ_{t∈A_p} τ̂_t,p;  θ_m = θ_init + λ τ_m.
DARE: Yu et al., ICML 2024, arXiv 2311.03099, eq. (1): m_t ~ Bernoulli(1 − p) elementwise,
    τ̂_t = τ_t ⊙ m_t / (1 − p), then any merge (task arithmetic, TIES) of the τ̂_t.
Keep fraction d = 1 − p throughout (``density``). The rule each step follows is a field of a
``profiles.TiesRules``/``DareRules`` record; the ``paper`` profile's rules are the paper's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, precision
from refimpl.merging import operands
from refimpl.merging.arithmetic import _task_arithmetic
from refimpl.merging.profiles import (
    DARE_PROFILES,
    DIVISOR,
    ELECT,
    TIES_PROFILES,
    WEIGHT_STAGE,
    ZERO_SIGN,
    DareRules,
    TiesRules,
    dare_rules,
    ties_rules,
)
from refimpl.merging.sparsify import _l1_rescaled, _trim_mask, dare_drop, dare_masks, densities, keep_masks

__all__ = [
    "DARE_PROFILES",
    "TIES_PROFILES",
    "dare",
    "densities",
    "elect_and_merge",
    "ties",
]

# core: the formulas (spec/merging.md §4, §5)


def _ties(
    taus: Iterable[np.ndarray], weights: np.ndarray, densities: Iterable[float], rules: TiesRules, lam: float
) -> np.ndarray:
    """Algorithm 1 of Yadav et al. 2023: the merged task vector λ τ_m (θ_m = θ_init + λ τ_m)."""
    trimmed = [_trim(tau, d, rules) for tau, d in zip(taus, densities, strict=True)]  # step 1: τ̂_t = top-k% of τ_t
    return lam * _elect_and_merge(trimmed, weights, rules)  # steps 2 and 3


def _elect_and_merge(trimmed: list[np.ndarray], weights: np.ndarray, rules: TiesRules) -> np.ndarray:
    """Steps 2 and 3 of Algorithm 1: elect the signs γ_m, then the mean over the agreeing tasks A_p."""
    votes = [_vote(tau, w, rules) for tau, w in zip(trimmed, weights, strict=True)]  # the paper: τ̂_t
    agree = _agreement(votes, rules)  # step 2: γ_m = sgn(Σ_t τ̂_t); A_p = {t : sgn(τ̂_t,p) = γ_m,p}
    total = sum(w * tau * a for tau, w, a in zip(trimmed, weights, agree, strict=True))  # step 3: Σ_{t∈A_p} τ̂_t,p
    return total / _divisor(agree, weights, rules)  # ÷ |A_p|


def _agreement(votes: list[np.ndarray], rules: TiesRules) -> list[np.ndarray]:
    """Step 2: elect γ_m, then mark the tasks that agree with it (γ_m is not kept: one tensor less)."""
    gamma = _elect(votes, rules)
    return [_agrees(vote, gamma, rules) for vote in votes]


def _dare(
    taus: Iterable[np.ndarray],
    weights: np.ndarray,
    densities: np.ndarray,
    masks: Sequence[np.ndarray],
    rules: DareRules,
    lam: float,
) -> np.ndarray:
    """DARE, eq. (1): τ̂_t = τ_t ⊙ m_t / d_t, then task arithmetic or TIES of the τ̂_t, times λ."""
    dropped = [dare_drop(tau, m, d, rules.rescale) for tau, m, d in zip(taus, masks, densities, strict=True)]
    if rules.merge == "ties":  # TIES with its own trim at ties_density (1: none)
        return _ties(dropped, weights, [rules.ties_density] * len(dropped), rules.ties, lam)
    return _task_arithmetic(dropped, weights, lam, rules.normalize)


# the rule each step follows (spec/merging.md §4.1, §4.2): a field of TiesRules


def _trim(tau: np.ndarray, density: float, rules: TiesRules) -> np.ndarray:
    """τ̂ = τ ⊙ keep, keep = the top-d magnitudes by ``k_rule``; L1-matched with ``rescale="l1"``."""
    keep = _trim_mask(tau, density, rules.k_rule)
    return _l1_rescaled(tau, keep) if rules.rescale == "l1" else tau * keep


def _vote(tau: np.ndarray, weight: float, rules: TiesRules) -> np.ndarray:
    """e_t: τ̂_t (the paper), or w_t τ̂_t when the weights come before the election (mergekit)."""
    return weight * tau if rules.weight_stage == "before_election" else tau


def _elect(votes: list[np.ndarray], rules: TiesRules) -> np.ndarray:
    """γ = sgn(Σ_t e_t) (``"sum"``, the paper's mass) or sgn(Σ_t sgn e_t) (``"count"``); where that is 0,
    +1 (``"positive"``) or the global majority sgn(Σ_p γ_p) (the official code, MergeLM)."""
    score = sum(votes) if rules.elect == "sum" else sum(np.sign(vote) for vote in votes)
    gamma = np.sign(score)
    return np.where(gamma == 0, 1.0 if rules.zero_sign == "positive" else np.sign(gamma.sum()), gamma)


def _agrees(vote: np.ndarray, gamma: np.ndarray, rules: TiesRules) -> np.ndarray:
    """t ∈ A_p: e_t,p has the elected sign; zeros never agree. The official code's ``where(γ > 0, e > 0,
    e < 0)`` lets γ = 0 select the negative entries; MergeLM's γ = 0 selects none."""
    agree = np.where(gamma > 0, vote > 0, vote < 0)
    return agree & (gamma != 0) if rules.zero_sign == "global_majority_zero" else agree


def _divisor(agree: list[np.ndarray], weights: np.ndarray, rules: TiesRules) -> np.ndarray | float:
    """|A_p| (0 → 1; ``"count"``), Σ_{t∈A_p} w_t (0 → 1; ``"weight_sum"``, mergekit) or 1 (``"none"``)."""
    if rules.divisor == "count":
        return np.maximum(sum(agree), 1.0)
    if rules.divisor == "weight_sum":
        weight_sum = sum(w * a for w, a in zip(weights, agree, strict=True))
        return np.where(weight_sum == 0, 1.0, weight_sum)
    return 1.0


# checks, then the core


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
    """Sign election and disjoint merge of T trimmed task vectors, a list or a (T, ...) stack.

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
    taus = operands.task_list(
        list(trimmed) if isinstance(trimmed, np.ndarray) and trimmed.ndim > 1 else trimmed, "trimmed"
    )
    w = operands.weight_vector(weights, len(taus))
    for key, value, allowed in (
        ("elect", elect, ELECT),
        ("zero_sign", zero_sign, ZERO_SIGN),
        ("weight_stage", weight_stage, WEIGHT_STAGE),
        ("divisor", divisor, DIVISOR),
    ):
        _checks.choice(value, key, allowed)
    rules = TiesRules(
        k_rule="threshold", rescale="none", weight_stage=weight_stage, elect=elect, zero_sign=zero_sign, divisor=divisor
    )
    return _elect_and_merge(taus, w, rules)


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
    ops = operands.task_operands(task_vectors, weights, density=density, lam=lam)
    rules = ties_rules(
        profile,
        k_rule=k_rule,
        elect=elect,
        zero_sign=zero_sign,
        weight_stage=weight_stage,
        divisor=divisor,
        rescale=rescale,
    )
    return _ties(ops.taus, ops.weights, ops.densities, rules, ops.lam)


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
    ops = operands.task_operands(task_vectors, weights, density=density, lam=lam)
    rules = dare_rules(
        profile,
        merge,
        rescale=rescale,
        normalize=normalize,
        ties_density=ties_density,
        elect=elect,
        zero_sign=zero_sign,
        weight_stage=weight_stage,
        divisor=divisor,
    )
    if rules.merge == "linear" and rules.normalize:
        operands.normalizable(ops.weights)
    return _dare(ops.taus, ops.weights, ops.densities, _keep_masks(masks, rng, ops), rules, ops.lam)


def _keep_masks(masks: Any, rng: Any, ops: operands.TaskOperands) -> list[np.ndarray]:
    """The given keep-masks, checked, or ones drawn from ``rng``: exactly one of the two."""
    if masks is None and rng is not None:
        return dare_masks(ops.taus[0].shape, len(ops.taus), ops.densities.tolist(), rng)
    if masks is not None and rng is None:
        return keep_masks(masks, ops.taus)
    raise ValueError(
        "masks, rng: expected exactly one of them (the DARE keep-masks or a Generator to "
        f"draw them), got masks={_checks.describe(masks)} and rng={_checks.describe(rng)}"
    )
