"""Trimming and dropping task vectors: magnitude trim (TIES), magnitude prune, DARE masks.

TIES: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, arXiv 2306.01708.
DARE: Yu et al., "Language Models are Super Mario", ICML 2024, arXiv 2311.03099.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, precision
from refimpl.merging import _common

#: How many entries a magnitude trim keeps (see spec/merging.md, "Trim").
K_RULES = ("threshold", "floor", "floor_min1", "mask_rate")
TRIM_K_RULE = {"paper": "threshold", "peft": "floor", "mergekit": "floor_min1", "mergelm": "mask_rate"}
RESCALES = ("inverse", "l1", "none")
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
    t = _common.as_float(tau, "tau")[0]
    d = _common.density(density)
    _checks.choice(k_rule, "k_rule", K_RULES)
    a = np.abs(t).ravel()
    n = a.size
    if d >= 1.0:
        return np.ones(t.shape, dtype=bool)
    if k_rule == "mask_rate":
        drop = int(n * (1.0 - d))
        if drop == 0:
            return np.ones(t.shape, dtype=bool)
        kth = np.partition(a, drop - 1)[drop - 1]  # the drop-th smallest, 1-based (torch kthvalue)
        return (a >= kth).reshape(t.shape)
    k = int(d * n)
    if k_rule == "threshold":
        kth = np.partition(a, n - k - 1)[n - k - 1]  # the (n − k)-th smallest, 1-based
        return (a >= kth).reshape(t.shape)
    if k_rule == "floor_min1":
        k = max(1, k)
    if k == 0:
        return np.zeros(t.shape, dtype=bool)
    if k >= n:
        return np.ones(t.shape, dtype=bool)
    v = np.partition(a, n - k)[n - k]  # the k-th largest
    keep = a > v
    tied = np.flatnonzero(a == v)
    keep[tied[: k - int(keep.sum())]] = True
    return keep.reshape(t.shape)


@precision._overflow_checked
def l1_rescaled(tau: npt.ArrayLike, mask: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """mergekit's ``rescaled_masked_tensor(norm=l1)`` with validated inputs (see ``_l1_rescaled``)."""
    t = _common.as_float(tau, "tau")[0]
    raw = np.asarray(mask)
    m = raw.astype(np.float64) if raw.dtype == bool else _common.as_float(raw, "mask")[0]
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


def densities(density: Any, count: int, name: str = "density") -> np.ndarray:
    """One keep fraction for all tasks, or one per task (mergekit's per-model density)."""
    if np.ndim(density) == 0:
        return np.full(count, _common.density(density, name))
    vals = [_common.density(v, f"{name}[{i}]") for i, v in enumerate(density)]
    if len(vals) != count:
        raise ValueError(f"{name}: expected one density or {count} (one per task), got {len(vals)}")
    return np.asarray(vals)


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
    taus = _common.task_list(task_vectors)
    w = _common.weight_vector(weights, len(taus))
    d = densities(density, len(taus))
    opts = _common.profile_options(profile, {p: {"k_rule": r, "rescale": "none"} for p, r in TRIM_K_RULE.items()},
                                   {"k_rule": k_rule, "rescale": rescale})
    _checks.choice(opts["rescale"], "rescale", ("l1", "none"))
    lam = _checks.real(lam, "lam")
    out = np.zeros_like(taus[0])
    for tau, wt, dt in zip(taus, w, d, strict=True):
        m = trim_mask(tau, dt, k_rule=opts["k_rule"])
        out += wt * (_l1_rescaled(tau, m) if opts["rescale"] == "l1" else tau * m)
    return lam * out


def dare_masks(shape: Sequence[int], count: int, density: float | Sequence[float],
               rng: np.random.Generator) -> list[npt.NDArray[np.bool_]]:
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


def keep_masks(masks: Any, taus: list[np.ndarray], name: str = "masks") -> list[np.ndarray]:
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
                raise ValueError(f"{name}[{i}]: expected a 0/1 keep mask, got {_checks.describe(arr)} "
                                 "with values other than 0 and 1")
            arr = arr != 0
        out.append(arr)
    return out


def dare_drop(tau: np.ndarray, mask: np.ndarray, density: float, rescale: str) -> np.ndarray:
    """One DARE step: τ̂ = τ ⊙ m / d (``"inverse"``, the paper), L1-matched (``"l1"``, mergekit) or τ ⊙ m."""
    if rescale == "l1":
        return _l1_rescaled(tau, mask)
    out = tau * mask
    if rescale == "inverse":
        out /= density
    return out
