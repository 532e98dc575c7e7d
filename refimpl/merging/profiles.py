"""The peer rule sets of TIES, DARE and magnitude prune: one record per profile, chosen from ``PROFILES``.

A profile names the rule each step follows (spec/merging.md §8). ``paper`` is the reference: Algorithm 1
of Yadav et al. 2023 (arXiv 2306.01708) as the official code runs it, prateeky2806/ties-merging. The peer
profiles start from it and replace only the steps where their peer differs (``dataclasses.replace``):
PEFT 0.21.2 ``merge_utils``, mergekit 0.1.5, and the DARE authors' yule-BUAA/MergeLM. Explicit options
given to ``ties``/``dare`` override the profile's field of the same name (``ties_rules``, ``dare_rules``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from refimpl import _checks
from refimpl.merging import operands

#: How many entries a magnitude trim keeps (spec/merging.md §4.1).
K_RULES = ("threshold", "floor", "floor_min1", "mask_rate")
TRIM_RESCALES = ("l1", "none")
ELECT = ("sum", "count")
ZERO_SIGN = ("positive", "global_majority", "global_majority_zero")
WEIGHT_STAGE = ("before_election", "after_election")
DIVISOR = ("count", "weight_sum", "none")
#: How DARE rescales the kept entries (spec/merging.md §5).
RESCALES = ("inverse", "l1", "none")
MERGES = ("linear", "ties")


@dataclass(frozen=True)
class TiesRules:
    """The rule each step of TIES follows (spec/merging.md §4)."""

    k_rule: str  # step 1, trim: how many entries are kept (K_RULES)
    rescale: str  # step 1: "l1" matches the trimmed tensor's L1 norm to the untrimmed one (mergekit)
    weight_stage: str  # who votes: τ̂_t ("after_election") or w_t τ̂_t ("before_election", mergekit#474)
    elect: str  # step 2: γ = sgn Σ_t e_t ("sum", the paper's mass) or sgn Σ_t sgn e_t ("count")
    zero_sign: str  # step 2: γ where the score is 0 (ZERO_SIGN)
    divisor: str  # step 3: |A_p| ("count"), Σ_{t∈A_p} w_t ("weight_sum") or 1 ("none")


@dataclass(frozen=True)
class DareRules:
    """The rules of DARE (spec/merging.md §5): the drop's rescale, then a linear or a TIES merge."""

    rescale: str  # τ̂_t = τ_t ⊙ m_t / d_t ("inverse", the paper), L1-matched ("l1", mergekit) or τ_t ⊙ m_t
    normalize: bool  # merge="linear": divide Σ_t w_t τ̂_t by Σ_t w_t
    ties_density: float  # merge="ties": the keep fraction of TIES's own trim (1: no trim)
    ties: TiesRules  # merge="ties": the TIES that merges the τ̂_t (its trim is never L1-rescaled)
    merge: str = "linear"  # "linear" (task arithmetic of the τ̂_t) or "ties"


@dataclass(frozen=True)
class Profile:
    """One implementation's rules for every merge that has a profile."""

    name: str
    ties: TiesRules
    dare: DareRules


# prateeky2806/ties-merging: topk_values_mask (k + 1 entries plus ties), resolve_sign("mass") with
# resolve_zero_signs("majority"), disjoint_merge("dis-mean"). It has no per-task weights; given weights are
# applied after the election, as PEFT does. DARE (MergeLM#38): drop, rescale by 1/d, then the full TIES
# with its own trim at density 0.2 (MergeLM's mask rate 0.8).
_PAPER_TIES = TiesRules(
    k_rule="threshold",
    rescale="none",
    weight_stage="after_election",
    elect="sum",
    zero_sign="global_majority",
    divisor="count",
)
PAPER = Profile(
    "paper", ties=_PAPER_TIES, dare=DareRules(rescale="inverse", normalize=False, ties_density=0.2, ties=_PAPER_TIES)
)

# PEFT 0.21.2 merge_utils.ties: topk prune of exactly k, elect on the unweighted tensors with a tie → +1,
# count mean. dare_ties: no trim.
_PEFT_TIES = replace(PAPER.ties, k_rule="floor", zero_sign="positive")
PEFT = Profile("peft", ties=_PEFT_TIES, dare=replace(PAPER.dare, ties_density=1.0, ties=_PEFT_TIES))

# mergekit 0.1.5 ties (normalize=True, rescale=False): sparsify.magnitude keeps max(1, k), weights before
# the election (mergekit#474), divisor Σ w over the agreeing entries. dare_ties: L1 rescale (PR #505), no
# trim, and with its default normalize=False the agreeing entries are summed (divisor "none").
_MERGEKIT_TIES = replace(_PEFT_TIES, k_rule="floor_min1", weight_stage="before_election", divisor="weight_sum")
MERGEKIT = Profile(
    "mergekit",
    ties=_MERGEKIT_TIES,
    dare=replace(PAPER.dare, rescale="l1", ties_density=1.0, ties=replace(_MERGEKIT_TIES, divisor="none")),
)

# yule-BUAA/MergeLM merging_methods.py ties_merging: kthvalue at int(n · mask_rate), mask_rate = 1 − d
# (one more entry than the official code when d·n is not whole); where the global majority is 0 too,
# γ = 0 selects nothing. mask_merging with ties_merging: drop, rescale by 1/(1 − p), then that TIES.
_MERGELM_TIES = replace(PAPER.ties, k_rule="mask_rate", zero_sign="global_majority_zero")
MERGELM = Profile("mergelm", ties=_MERGELM_TIES, dare=replace(PAPER.dare, ties=_MERGELM_TIES))

PROFILES: dict[str, Profile] = {p.name: p for p in (PAPER, PEFT, MERGEKIT, MERGELM)}


def profile(name: Any) -> Profile:
    """The profile called ``name`` (ValueError naming the choices otherwise)."""
    return PROFILES[_checks.choice(name, "profile", tuple(PROFILES))]


def ties_rules(name: Any, **given: Any) -> TiesRules:
    """The TIES rules of profile ``name`` with the explicitly given (non-None) options substituted, checked."""
    rules = replace(profile(name).ties, **{k: v for k, v in given.items() if v is not None})
    _check_election(rules)
    _checks.choice(rules.k_rule, "k_rule", K_RULES)
    _checks.choice(rules.rescale, "rescale", TRIM_RESCALES)
    return rules


def dare_rules(
    name: Any, merge: Any, *, rescale: Any = None, normalize: Any = None, ties_density: Any = None, **election: Any
) -> DareRules:
    """The DARE rules of profile ``name`` for ``merge`` with the given (non-None) options substituted, checked.

    ``election`` holds TIES's ``elect``, ``zero_sign``, ``weight_stage`` and ``divisor`` (merge="ties").
    """
    _checks.choice(merge, "merge", MERGES)
    base = profile(name).dare
    ties = replace(base.ties, **{k: v for k, v in election.items() if v is not None})
    _check_election(ties)
    rules = replace(
        base,
        ties=ties,
        merge=merge,
        **{
            k: v
            for k, v in (("rescale", rescale), ("normalize", normalize), ("ties_density", ties_density))
            if v is not None
        },
    )
    _checks.choice(rules.rescale, "rescale", RESCALES)
    return replace(
        rules,
        normalize=_checks.boolean(rules.normalize, "normalize"),
        ties_density=operands.density(rules.ties_density, "ties_density"),
    )


def _check_election(rules: TiesRules) -> None:
    for key, allowed in (
        ("elect", ELECT),
        ("zero_sign", ZERO_SIGN),
        ("weight_stage", WEIGHT_STAGE),
        ("divisor", DIVISOR),
    ):
        _checks.choice(getattr(rules, key), key, allowed)


def _as_table(pick: Any) -> dict[str, dict[str, Any]]:
    return {name: pick(p) for name, p in PROFILES.items()}


#: The tables of spec/merging.md §8 as plain dicts (the public ``TIES_PROFILES``/``DARE_PROFILES``).
TIES_PROFILES: dict[str, dict[str, Any]] = _as_table(lambda p: asdict(p.ties))
DARE_PROFILES: dict[str, dict[str, Any]] = _as_table(
    lambda p: {
        **{k: v for k, v in asdict(p.dare.ties).items() if k not in ("k_rule", "rescale")},
        "dare_rescale": p.dare.rescale,
        "normalize": p.dare.normalize,
        "ties_density": p.dare.ties_density,
    }
)
#: The trim rule of each profile (TIES's trim, magnitude prune, DARE-TIES's trim).
TRIM_K_RULE: dict[str, str] = {name: p.ties.k_rule for name, p in PROFILES.items()}
