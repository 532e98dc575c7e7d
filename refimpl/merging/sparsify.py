"""Trimming and dropping task vectors: magnitude trim (TIES), magnitude prune, DARE masks.

TIES: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, arXiv 2306.01708.
DARE: Yu et al., "Language Models are Super Mario", ICML 2024, arXiv 2311.03099.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from refimpl import _checks, precision
from refimpl.merging import operands, profiles
from refimpl.merging.operands import densities
from refimpl.merging.profiles import K_RULES, RESCALES, TRIM_K_RULE

__all__ = [
    "K_RULES",
    "L1_EPS",
    "RESCALES",
    "TRIM_K_RULE",
    "dare_drop",
    "dare_masks",
    "densities",
    "keep_masks",
    "l1_rescaled",
    "magnitude_prune",
    "trim_mask",
]

#: mergekit's absolute guard in the L1 rescale: below it the masked tensor is returned unscaled.
L1_EPS = 1e-7


def trim_mask(tau: npt.ArrayLike, density: float, *, k_rule: str = "threshold") -> npt.NDArray[np.bool_]:
    """Boolean keep-mask of a magnitude trim of one tensor (or one flattened model).

    With n entries and keep fraction d, k = ⌊fl(d·n)⌋ (the floating product, as every peer computes it):

    * ``"threshold"`` (official TIES, ``topk_values_mask``): keep |τ| ≥ the (n − k)-th
      smallest |τ|, i.e. k + 1 entries plus every tie at the threshold (1000 entries at d = 0.2 keep 201).
    * ``"floor"`` (PEFT ``magnitude_based_pruning``): exactly k entries, the largest |τ|; ties at the
      k-th value are broken by lower flat index (PEFT's ``topk`` order is unspecified). k = 0 keeps none.
    * ``"floor_min1"`` (mergekit ``sparsify.magnitude``): as ``"floor"`` with k = max(1, ⌊d·n⌋).
    * ``"mask_rate"`` (MergeLM ``ties_merging``, whose input is the mask rate 1 − d): drop count
      m = ⌊fl(n·fl(1 − d))⌋; keep |τ| ≥ the m-th smallest |τ|, i.e. n − m + 1 entries plus every tie
      (n = 10, d = 0.25: m = 7, keeps 4 where ``"threshold"`` keeps 3); m = 0 keeps everything.

    d = 1 keeps everything under every rule (the official code raises there; PEFT and mergekit no-op).
    """
    t = operands.as_float(tau, "tau")[0]
    d = operands.density(density)
    _checks.choice(k_rule, "k_rule", K_RULES)
    return _trim_mask(t, d, k_rule)


# core: the trim rules (spec/merging.md §4.1); a = |τ| flattened, n = a.size


def _trim_mask(tau: np.ndarray, density: float, k_rule: str) -> np.ndarray:
    """The keep-mask of ``trim_mask`` on a checked float64 tensor (d = 1 keeps everything)."""
    if density >= 1.0:
        return np.ones(tau.shape, dtype=bool)
    return _KEEP[k_rule](np.abs(tau).ravel(), density).reshape(tau.shape)


def _keep_threshold(a: np.ndarray, d: float) -> np.ndarray:
    """Official TIES: |τ| ≥ the (n − k)-th smallest |τ|, k = ⌊d·n⌋."""
    n, k = a.size, int(d * a.size)
    return a >= np.partition(a, n - k - 1)[n - k - 1]


def _keep_mask_rate(a: np.ndarray, d: float) -> np.ndarray:
    """MergeLM: |τ| ≥ the m-th smallest |τ|, m = ⌊n·(1 − d)⌋ (m = 0 keeps all), torch ``kthvalue``."""
    drop = int(a.size * (1.0 - d))
    if drop == 0:
        return np.ones(a.size, dtype=bool)
    return a >= np.partition(a, drop - 1)[drop - 1]


def _keep_floor(a: np.ndarray, d: float) -> np.ndarray:
    """PEFT: exactly k = ⌊d·n⌋ largest |τ|, ties at the k-th value by lower flat index."""
    return _keep_top(a, int(d * a.size))


def _keep_floor_min1(a: np.ndarray, d: float) -> np.ndarray:
    """mergekit: exactly max(1, ⌊d·n⌋) largest |τ|, ties as ``_keep_floor``."""
    return _keep_top(a, max(1, int(d * a.size)))


def _keep_top(a: np.ndarray, k: int) -> np.ndarray:
    n = a.size
    if k == 0 or k >= n:
        return np.full(n, k > 0)
    kth = np.partition(a, n - k)[n - k]  # the k-th largest
    keep = a > kth
    tied = np.flatnonzero(a == kth)
    keep[tied[: k - int(keep.sum())]] = True
    return keep


_KEEP = {
    "threshold": _keep_threshold,
    "mask_rate": _keep_mask_rate,
    "floor": _keep_floor,
    "floor_min1": _keep_floor_min1,
}


@precision._overflow_checked
def l1_rescaled(tau: npt.ArrayLike, mask: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """mergekit's ``rescaled_masked_tensor(norm=l1)`` with validated inputs (see ``_l1_rescaled``)."""
    t = operands.as_float(tau, "tau")[0]
    raw = np.asarray(mask)
    m = raw.astype(np.float64) if raw.dtype == bool else operands.as_float(raw, "mask")[0]
    _checks.same_shape(t, "tau", m, "mask")
    if not np.isin(m, (0.0, 1.0)).all():
        raise ValueError("mask: expected a keep mask of 0/1 (or bool) entries")
    return _l1_rescaled(t, m)


def _l1_rescaled(tau: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """mergekit's ``rescaled_masked_tensor(norm=l1)``: (τ ⊙ m)·‖τ‖₁/‖τ ⊙ m‖₁, per tensor.

    When ‖τ‖₁ < 1e-7 or ‖τ ⊙ m‖₁ < 1e-7 (absolute, mergekit's eps) the masked tensor is returned unscaled.
    """
    masked = tau * mask
    before = float(np.abs(tau).sum())
    after = float(np.abs(masked).sum())
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


@precision._overflow_checked
def magnitude_prune(
    task_vectors: Sequence[npt.ArrayLike],
    weights: npt.ArrayLike | None = None,
    *,
    density: float | Sequence[float],
    profile: str = "peft",
    k_rule: str | None = None,
    rescale: str | None = None,
    lam: float = 1.0,
) -> npt.NDArray[np.float64]:
    """λ·Σ_t w_t (τ_t ⊙ trim_mask(τ_t, d_t)) — PEFT ``merge_utils.magnitude_prune`` (no rescale).

    ``rescale="l1"`` applies mergekit's per-tensor L1 norm match after the trim.
    """
    ops = operands.task_operands(task_vectors, weights, density=density, lam=lam)
    default_k_rule = profiles.profile(profile).ties.k_rule
    rescale = _checks.choice("none" if rescale is None else rescale, "rescale", ("l1", "none"))
    k_rule = _checks.choice(default_k_rule if k_rule is None else k_rule, "k_rule", K_RULES)
    return _magnitude_prune(ops.taus, ops.weights, ops.densities, k_rule, rescale, ops.lam)


def _magnitude_prune(
    taus: list[np.ndarray], weights: np.ndarray, densities: np.ndarray, k_rule: str, rescale: str, lam: float
) -> np.ndarray:
    """λ·Σ_t w_t (τ_t ⊙ m_t), m_t the trim's keep-mask (L1-matched with ``rescale="l1"``)."""
    out = np.zeros_like(taus[0])
    for tau, w, d in zip(taus, weights, densities, strict=True):
        keep = _trim_mask(tau, d, k_rule)
        out += w * (_l1_rescaled(tau, keep) if rescale == "l1" else tau * keep)
    return lam * out


def dare_masks(
    shape: Sequence[int], count: int, density: float | Sequence[float], rng: np.random.Generator
) -> list[npt.NDArray[np.bool_]]:
    """Draw DARE keep-masks: for t = 0 … count−1 in order, m_t = ``rng.random(shape) < d_t``.

    Each entry is kept independently with probability d_t (Bernoulli(d_t); 1 = keep, as in PEFT
    and mergekit; MergeLM draws the complementary drop mask). Calling again with a generator in the
    same state reproduces the masks. ``merge_files`` seeds one generator per tensor with
    ``np.random.default_rng([seed, crc32(tensor name)])``.
    """
    rng = _checks.rng(rng)
    count = _checks.integer(count, "count", low=1)
    shape = tuple(_checks.integer(s, f"shape[{i}]", low=0) for i, s in enumerate(shape))
    d = densities(density, count)
    return [rng.random(shape) < d[t] for t in range(count)]


def keep_masks(
    masks: Sequence[npt.ArrayLike], taus: list[npt.NDArray[np.float64]], name: str = "masks"
) -> list[npt.NDArray[np.bool_]]:
    """Validate user-given keep-masks: one per task, the task's shape, values 0/1 (bool or numeric)."""
    if isinstance(masks, np.ndarray) or not isinstance(masks, Sequence):
        raise TypeError(f"{name}: expected a list of {len(taus)} arrays, got {_checks.describe(masks)}")
    if len(masks) != len(taus):
        raise ValueError(f"{name}: expected {len(taus)} masks (one per task), got {len(masks)}")
    out = []
    for i, m in enumerate(masks):
        arr = _checks._to_numpy(m, f"{name}[{i}]")
        if arr.shape != taus[i].shape:
            raise ValueError(f"{name}[{i}]: expected shape {taus[i].shape}, got shape {arr.shape}")
        if arr.dtype != bool:
            if arr.dtype.kind not in "iuf" or not np.isin(arr, (0, 1)).all():
                raise ValueError(
                    f"{name}[{i}]: expected a 0/1 keep mask, got {_checks.describe(arr)} with values other than 0 and 1"
                )
            arr = arr != 0
        out.append(arr)
    return out


def dare_drop(
    tau: npt.NDArray[np.float64], mask: npt.NDArray[np.bool_], density: float, rescale: str
) -> npt.NDArray[np.float64]:
    """One DARE step: τ̂ = τ ⊙ m / d (``"inverse"``, the paper), L1-matched (``"l1"``, mergekit) or τ ⊙ m."""
    if rescale == "l1":
        return _l1_rescaled(tau, mask)
    out = tau * mask
    if rescale == "inverse":
        out /= density
    return out
