"""Merging LoRA adapters: in ΔW space (exact), by concatenation (exact) or by SVD projection.

LoRA: Hu et al., arXiv 2106.09685: ΔW_i = s_i·B_i A_i, A_i (r_i, in), B_i (out, r_i), s_i = α_i/r_i
(rsLoRA, arXiv 2312.03732: α_i/√r_i). A merge with weights w_i targets ΔW = Σ_i c_i B_i A_i, c_i = w_i s_i.
PEFT's ``add_weighted_adapter`` (0.21.2) gives the merged adapter scaling 1 (α = r), so its B·A is ΔW.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, precision
from refimpl.merging import operands


def _adapters(As: Any, Bs: Any, scalings: Any, weights: Any) -> tuple[list, list, np.ndarray]:
    """Validate T adapters (A_i (r_i, in), B_i (out, r_i)); return them with c_i = w_i·s_i."""
    for name, seq in (("As", As), ("Bs", Bs)):
        if isinstance(seq, np.ndarray) or not isinstance(seq, Sequence) or not seq:
            raise TypeError(f"{name}: expected a non-empty list of 2-D arrays, got {_checks.describe(seq)}")
    if len(As) != len(Bs):
        raise ValueError(f"Bs: expected {len(As)} matrices (one per A), got {len(Bs)}")
    A = [operands.as_float(a, f"As[{i}]", ndim=2)[0] for i, a in enumerate(As)]
    B = [operands.as_float(b, f"Bs[{i}]", ndim=2)[0] for i, b in enumerate(Bs)]
    n_in, n_out = A[0].shape[1], B[0].shape[0]
    for i, (a, b) in enumerate(zip(A, B, strict=True)):
        _checks.check_shape(a, f"As[{i}]", (None, n_in))
        _checks.check_shape(b, f"Bs[{i}]", (n_out, a.shape[0]))
    if np.ndim(scalings) == 0:
        s = np.full(len(A), _checks.real(scalings, "scalings"))
    else:
        s = operands.weight_vector(scalings, len(A), "scalings")
    w = operands.weight_vector(weights, len(A))
    return A, B, w * s


@precision._overflow_checked
def lora_delta(
    As: Sequence[npt.ArrayLike],
    Bs: Sequence[npt.ArrayLike],
    scalings: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
) -> npt.NDArray[np.float64]:
    """ΔW = Σ_i w_i s_i B_i A_i, shape (out, in), float64: the target of every LoRA-space merge."""
    A, B, c = _adapters(As, Bs, scalings, weights)
    return sum(ci * (b @ a) for ci, a, b in zip(c, A, B, strict=True))


@precision._overflow_checked
def lora_cat(
    As: Sequence[npt.ArrayLike],
    Bs: Sequence[npt.ArrayLike],
    scalings: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Concatenation: A = [c_1 A_1; …; c_T A_T] (rows), B = [B_1 … B_T] (columns), rank Σ r_i.

    B A = Σ_i B_i (c_i A_i) = Σ_i c_i B_i A_i exactly (PEFT ``combination_type="cat"``; merged scaling 1).
    Returns (A, B).
    """
    A, B, c = _adapters(As, Bs, scalings, weights)
    return np.concatenate([ci * a for ci, a in zip(c, A, strict=True)], axis=0), np.concatenate(B, axis=1)


@precision._overflow_checked
def lora_factor_linear(
    As: Sequence[npt.ArrayLike],
    Bs: Sequence[npt.ArrayLike],
    scalings: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """PEFT's factor-space ``combination_type="linear"`` (an emulation, NOT Σ c_i ΔW_i).

    a_i = sgn(c_i)√|c_i|, b_i = √|c_i|; A = Σ_i a_i A_i, B = Σ_i b_i B_i (all r_i equal), so
    B A = Σ_i c_i B_i A_i + Σ_{i≠j} b_j a_i B_j A_i: the cross terms remain (PEFT #3004).
    Example: two identical adapters with w = (½, ½) give 2·s·B A instead of s·B A. Returns (A, B).
    """
    A, B, c = _adapters(As, Bs, scalings, weights)
    ranks = {a.shape[0] for a in A}
    if len(ranks) != 1:
        raise ValueError(f"As: factor-space linear needs equal ranks, got ranks {[a.shape[0] for a in A]}")
    a_w = np.sign(c) * np.sqrt(np.abs(c))
    a_w[c == 0] = 0.0
    b_w = np.sqrt(np.abs(c))
    return (sum(x * a for x, a in zip(a_w, A, strict=True)), sum(x * b for x, b in zip(b_w, B, strict=True)))


@precision._overflow_checked
def lowrank_factors(
    delta: npt.ArrayLike, rank: int, *, split: str = "B", clamp: float | None = None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Best rank-r factors of ΔW (Eckart–Young): U, S, Vᵀ = svd(ΔW), truncated to r.

    ``split="B"`` (PEFT): B = U_r diag(S_r), A = V_rᵀ. ``split="sqrt"`` (mergekit extract-lora):
    B = U_r diag(√S_r), A = diag(√S_r) V_rᵀ. ``clamp`` q ∈ (0, 1] (PEFT ``svd_clamp``, split "B"
    only): hi = quantile(concat(B, A), q), both factors clipped to [−hi, hi]. Factors are unique only
    up to signs: compare B·A. Returns (A, B).
    """
    d = operands.as_float(delta, "delta", ndim=2)[0]
    r = _checks.integer(rank, "rank", low=1, high=min(d.shape))
    _checks.choice(split, "split", ("B", "sqrt"))
    u, s, vh = np.linalg.svd(d, full_matrices=False)
    if split == "B":
        b, a = u[:, :r] * s[:r], vh[:r]
    else:
        root = np.sqrt(s[:r])
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
    if clamp is not None:
        if split != "B":
            raise ValueError(f"clamp: only defined for split='B' (PEFT), got split={split!r}")
        q = _checks.real(clamp, "clamp", low=0.0, high=1.0)
        hi = float(np.quantile(np.concatenate([b.ravel(), a.ravel()]), q))
        b, a = np.clip(b, -hi, hi), np.clip(a, -hi, hi)
    return a, b


@precision._overflow_checked
def lora_svd(
    As: Sequence[npt.ArrayLike],
    Bs: Sequence[npt.ArrayLike],
    scalings: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
    *,
    rank: int | None = None,
    split: str = "B",
    clamp: float | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """ΔW-space merge then SVD projection (PEFT ``combination_type="svd"``): factors of
    ``lowrank_factors(Σ_i w_i s_i B_i A_i, rank)``. ``rank`` defaults to max r_i (PEFT) and must be
    ≤ min(out, in) (PEFT crashes there). Exact iff rank(ΔW) ≤ rank. PEFT 0.21.2 scales once
    (ΔW_i = get_delta_weight includes s_i, weights w_i unchanged). Returns (A, B).
    """
    A, _, _ = _adapters(As, Bs, scalings, weights)
    delta = lora_delta(As, Bs, scalings, weights)
    r = max(a.shape[0] for a in A) if rank is None else rank
    return lowrank_factors(delta, r, split=split, clamp=clamp)
