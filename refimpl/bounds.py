"""Every error bound of refimpl, in one place: the tests and the conformance harness use these.

A bound says how far a computation in a floating-point format may be from the exact value of its
formula, elementwise, when the inputs are exact. Each is derived, never picked, from the rounding
model fl(a ∘ b) = (a ∘ b)(1 + δ), |δ| ≤ u (Higham, *Accuracy and Stability of Numerical Algorithms*,
2nd ed., §2.2, §3.1): a chain of k roundings multiplies a term by at most 1 + γ_k, γ_k = k·u / (1 − k·u),
and an n-term dot product satisfies |fl(aᵀb) − aᵀb| ≤ γ_n |a|ᵀ|b|. So each bound is

    γ_k(dtype) · magnitude,

with k the number of roundings on the longest chain of the formula's evaluation and ``magnitude`` the
formula evaluated on absolute values (no cancellation credited). The functions here take validated
float64 arrays; the public names (``precision.matmul_error_bound``, ``dora.forward_error_bound``,
``dora.backward_error_bound``, ``qlora.forward_error_bound``) check their arguments and call them.

Every conformance row's k is a ``*_depth`` function here (``lora_forward_depth``, ``dora_weight_depth``,
``disjoint_merge_depth``, …), counted on the op's evaluation order in spec/*.md, and ``differential`` turns
it into the row's tolerance; the DoRA rows' magnitudes are here too (``dora_*_magnitude``). The LoRA rows'
magnitude is the op itself on |inputs|, the merging rows' follows the reference's own selection (trim,
election): those stay beside their rows in refimpl/conformance.

tests/test_bounds.py checks each bound against float32 evaluations in a fixed order on random and
adversarial inputs (each addition rounding the same way) and states how tight it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from refimpl.precision import gamma, round_to, unit_roundoff

Array = NDArray[np.float64]


# ---------------------------------------------------------------------------- matrix products


def matmul(a: Array, b: Array, dtype: Any, *, extra_roundings: int = 1) -> Array:
    """|fl(a @ b) − a @ b| ≤ γ_{K + extra} · (|a| @ |b|), K the length of the sum (Higham eq. 3.5).

    ``extra_roundings`` counts roundings after the sum (1: storing the result in ``dtype``).
    """
    return gamma(a.shape[-1] + extra_roundings, dtype) * (np.abs(a) @ np.abs(b))


# ---------------------------------------------------------------------------- LoRA (spec/lora.md)
#
# The rounding counts k of the conformance rows: ``differential(k, magnitude, dtype)`` turns each into the
# harness's tolerance, ``magnitude`` the op's formula on |inputs|. A count is the longest chain of roundings
# one term of the result goes through, on the evaluation orders the spec allows; an n-term sum charges n
# (Higham eq. 3.4: the first product and its n − 1 additions).


def lora_scaling_depth() -> int:
    """k = 2: s = α / r is one division; s = α / √r a square root and a division (spec/lora.md §2)."""
    return 2


def lora_delta_depth(r: int) -> int:
    """k = r + 2 for ΔW = s·B A (spec/lora.md §1): the r-term sum B A (r), its storage when it was accumulated
    in a wider format (1), the scaling (1). (s·B) A, scaling first, rounds 1 + r times: within it."""
    return r + 2


def lora_forward_batched_depth(in_features: int, r_max: int) -> int:
    """k = in + r_max + 4 for y_t = x_t Wᵀ + b + s_i·(x_t A_iᵀ) B_iᵀ (spec/lora.md §11): each token takes
    ``lora_forward_depth``'s path without the keep factor (eval form: 3 fewer), through its own adapter,
    whose rank is at most r_max; a token with index −1 takes the base path, in + 1."""
    return in_features + r_max + 4


def lora_forward_depth(in_features: int, r: int) -> int:
    """k = in + r + 6 for y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ (spec/lora.md §3), on the LoRA path:

        keep = mask / (1 − p)      2 (1 − p, the divide)
        x ⊙ keep                   1
        (·) Aᵀ                     in (an in-term sum)
        (·) Bᵀ                     r
        s · (·)                    1
        + x Wᵀ, + b                2 (the base path, in + 1, is shorter for every r ≥ 1)

    QLoRA's forward is the same formula on the exactly dequantized weight (spec/nf4.md), so it has the same k.
    """
    return in_features + r + 6


def lora_backward_depth(in_features: int, out_features: int, r: int, n_rows: int) -> int:
    """k = in + out + r + N + 6 for the gradients of spec/lora.md §4, N the rows of x, one k for all of them.

    A product of two rounded operands carries both operands' roundings, so the chains are (x̃ = x ⊙ keep:
    3 roundings, as in ``lora_forward_depth``):

        dB = s·gᵀ(x̃ Aᵀ)            3 + in (x̃ Aᵀ) + N (the sum over rows) + 1 (s)     = in + N + 4
        dA = s·(g B)ᵀ x̃             out (g B) + 3 (x̃) + N + 1                          = out + N + 4
        dx = g W + (s·g B A) ⊙ keep  out + r + 1 (s) + 3 (⊙ keep: the divide, 1 − p, the product) + 1 (+ g W)
                                                                                         = out + r + 5

    Each is at most in + out + r + N + 6, the sum of every reduction length; a chain never holds all four
    lengths, so the count over-charges the shorter chains (measured 0.951 on a climbing sum over N).
    """
    return in_features + out_features + r + n_rows + 6


def lora_merge_depth(r: int) -> int:
    """k = r + 3 for W ± s·B A (merge and unmerge, spec/lora.md §6): ΔW rounds r + 1 times (the r-term sum,
    the scaling), the safe path stores it in the base dtype (1), then the add (1)."""
    return r + 3


def lora_embedding_forward_depth(r: int) -> int:
    """k = r + 3 for y = E[ids] + s·Aᵀ[ids] Bᵀ (spec/lora.md §3, Embedding): the r-term sum (r), the scaling
    (1), a storage of the adapter term in the table's dtype (1, when a target forms E + ΔE first), the add (1)."""
    return r + 3


def lora_init_depth(out_features: int, in_features: int) -> int:
    """k = out + in + 8 for the PiSSA and OLoRA factors (spec/lora.md §5): the backward error of LAPACK's
    Householder SVD and QR, ‖E‖ ≤ p(out, in)·u‖W‖, with p = out + in + 8 (one Householder sweep over each
    dimension, the square root and the divide of forming A = √(σ/s)·vᵀ and B). Higham Thm. 19.4 has p a
    modest multiple of out·in for the worst case; out + in is the normwise behaviour LAPACK documents
    (LAPACK Users' Guide §4.9, "p(m, n) is a modestly growing function"), which the tests measure. The
    magnitude (``rows_lora._init_magnitude``) turns this backward error into the factors' forward error."""
    return out_features + in_features + 8


# ---------------------------------------------------------------------------- QLoRA forward


def qlora_forward(
    x: Array, W: Array, A: Array, B: Array, scaling: float, bias: Array | None, dtype: Any, accumulate: Any = None
) -> Array:
    """The QLoRA forward as PEFT's 4-bit LoRA layer evaluates it, W the exactly dequantized (out, in) weight:

        base = fl(x Wᵀ + b)          K = in products and sums, + 1 for the bias, stored in dtype
        lora = fl(fl(fl(x Aᵀ) Bᵀ) · s)   K-term and r-term sums, each stored, then the scaling
        ŷ    = fl(base + lora)

    with sums accumulated in ``accumulate`` (default ``dtype``) and each stored result rounded to ``dtype``:

        |ŷ − y| ≤ [(1+γ_{K+1})(1+u)² − 1] · (|x| |W|ᵀ + |b|)
                 + [(1+γ_K)(1+γ_r)(1+u)⁴ − 1] · |s| · (|x| |A|ᵀ) |B|ᵀ,      γ_n of ``accumulate``.
    """
    K, r = W.shape[1], A.shape[0]
    acc = dtype if accumulate is None else accumulate
    u = unit_roundoff(dtype)
    base = np.abs(x) @ np.abs(W).T
    if bias is not None:
        base = base + np.abs(bias)
    g_base = (1 + gamma(K + 1, acc)) * (1 + u) ** 2 - 1
    g_lora = (1 + gamma(K, acc)) * (1 + gamma(r, acc)) * (1 + u) ** 4 - 1
    return g_base * base + g_lora * abs(scaling) * ((np.abs(x) @ np.abs(A).T) @ np.abs(B).T)


def qlora_forward_bound_evaluation_depth(in_features: int, r: int) -> int:
    """k = in + r + 8 for another evaluation of ``qlora_forward`` itself (the conformance row of
    qlora.forward_error_bound: a target computes the same bound, in any order). Its terms are sums of
    non-negative products, so each rounding is relative to the result (no cancellation): the lora term
    |s|·(|x||A|ᵀ)|B|ᵀ rounds in + r times (the two sums), 1 for |s|, 1 for its γ factor, 1 for the add of
    the base term; the γ factors themselves, [(1 + γ_K)(1 + γ_r)(1 + u)⁴ − 1], are evaluated in a few
    operations each accurate to a few ulps relative (charged 5). The base term's chain, in + 3, is shorter.
    """
    return in_features + r + 8


# ---------------------------------------------------------------------------- DoRA (spec/dora.md §10)


def _dora_norms(W: Array, A: Array, B: Array, scaling: float) -> tuple[Array, Array, Array]:
    """(V, n = ‖V‖ per row, c = ‖|W| + |s||B||A|‖ / ‖V‖): the adapted weight, its norm and the norm's
    condition number (≥ 1; large when W and s·B A cancel)."""
    V = W + scaling * (B @ A)
    n = np.linalg.norm(V, axis=1)
    n_abs = np.linalg.norm(np.abs(W) + abs(scaling) * (np.abs(B) @ np.abs(A)), axis=1)
    return V, n, n_abs / n


def dora_forward_depth(in_features: int, r: int) -> int:
    """k = in + r + 5: the longest rounding chain of the DoRA forward (spec/dora.md §3, §10).

    Counted on the order PEFT evaluates, y = base + (f − 1)·(base − b) + f·s·B(A x), base = x Wᵀ + b:
    the LoRA term f·s·B(A x) rounds in (A x) + r (B ·) + 1 (· s) + 1 (f ·) + 2 (the two sums) = in + r + 4
    times; the correction (f − 1)·(base − b) rounds in + 1 (base) + 1 (− b) + 1 (f − 1) + 1 (·) + 2 = in + 6
    times; the larger of the two is at most in + r + 5 for every r ≥ 1. The factor f = m / ‖V‖ itself
    is within c·γ_{r + ⌈in/2⌉ + 4} relative (V = W + s·B A: r + 2; the sum of squares: in; the square
    root halves it and adds 1; the divide: 1), a shorter chain carried by the condition number c. The
    direct order f ⊙ (x Vᵀ) + b rounds in + r + 4 times. The same k covers the train form.
    """
    return in_features + r + 5


def dora_forward_magnitude(
    x: Array,
    W: Array,
    A: Array,
    B: Array,
    m: Array,
    scaling: float,
    bias: Array | None = None,
    x_dropped: Array | None = None,
) -> Array:
    """The terms the roundings of the DoRA forward act on; |ŷ − y| ≤ γ_k · this, k = ``dora_forward_depth``.

    With x_d the dropped input (x in the eval form), P = |x||W|ᵀ, P_d = |x_d||W|ᵀ, Q_d = |s|(|x_d||A|ᵀ)|B|ᵀ,
    f = m / ‖V‖ and c the norm's condition number:

        (P + |b|) + |f − 1|·(P_d + |b|) + |f|·Q_d + c|f|·(P_d + Q_d)

    term by term: the base x Wᵀ + b; the correction (f − 1)·(x_d Wᵀ) (in the eval form PEFT reuses the base
    as base − b, whose bias rounding |f − 1| scales); the LoRA term f·s·(x_d Aᵀ)Bᵀ; and the error of f̂,
    relative c·γ, times the two terms f multiplies. The direct eval order f ⊙ (x Vᵀ) + b is covered too:
    its terms |f|(1 + c)(P + Q) + |b| are within the above, since |f| ≤ 1 + |f − 1|.
    """
    _, n, c = _dora_norms(W, A, B, scaling)
    f = m / n
    xd = x if x_dropped is None else x_dropped
    b = np.zeros(W.shape[0]) if bias is None else np.abs(bias)
    P = np.abs(x) @ np.abs(W).T
    Pd = np.abs(xd) @ np.abs(W).T
    Qd = abs(scaling) * ((np.abs(xd) @ np.abs(A).T) @ np.abs(B).T)
    af = np.abs(f)
    return (P + b) + np.abs(f - 1) * (Pd + b) + af * Qd + c * af * (Pd + Qd)


def dora_forward(
    x: Array,
    W: Array,
    A: Array,
    B: Array,
    m: Array,
    scaling: float,
    dtype: Any,
    bias: Array | None = None,
    x_dropped: Array | None = None,
) -> Array:
    """Elementwise bound on the DoRA forward evaluated in ``dtype``: γ_k · ``dora_forward_magnitude``."""
    k = dora_forward_depth(W.shape[1], A.shape[0])
    return gamma(k, dtype) * dora_forward_magnitude(x, W, A, B, m, scaling, bias, x_dropped)


def dora_norm_depth(in_features: int, r: int) -> int:
    """k = in + r + 4 for n = ‖W + s·B A‖ per row (weight_norm, init_magnitude; spec/dora.md §2):

        V = W + s·B A        r + 2 (the r-term sum, the scaling, the add)
        Σ_j V_oj²            in (an in-term sum of products)
        √                    1
        storage in dtype     1 (init_magnitude(..., dtype=d))

    Relative to ‖|W| + |s||B||A|‖, not to n: the magnitude is the norm of the absolute terms.
    """
    return in_features + r + 4


def dora_weight_depth(in_features: int, r: int) -> int:
    """k = in + r + 6 for the merged weight f ⊙ (W + ΔW), f = m / n*, and the direction V / n (spec/dora.md §2,
    §5), and for the embedding's f ⊙ (E + ΔE) (§7, in = the vocabulary size V, the norm's length):

        n                    in + r + 3 (``dora_norm_depth`` without its storage)
        f = m / n            1
        f ⊙ V                1 (the element of V itself rounds only r + 2 times)
        storage in dtype     1 (merge(..., dtype=d))

    The direction V / n rounds in + r + 4 times, within it. n's error is relative to the absolute norm: the
    magnitude carries it as c·|f|·|V|, c = ‖|W| + |s||B||A|‖ / n (``rows_dora._merge_magnitude``).
    """
    return in_features + r + 6


def dora_unmerge_depth(r: int) -> int:
    """k = r + 3 for W = W_merged / (m / n*) − ΔW (spec/dora.md §5): the ratio and the divide (2) or n*/m and
    the product (2), the subtraction (1), the storage (1) on the W path (4 ≤ r + 3); ΔW rounds r + 1 times
    (the r-term sum, the scaling), then the subtraction and the storage: r + 3."""
    return r + 3


def dora_sequential_depth(in_features: int, r_max: int, n_adapters: int) -> int:
    """k = in + r_max + 2T + 2 for T DoRA adapters applied in turn (spec/dora.md §6):

        z₀ = x Wᵀ                                   in
        z_i = f_i ⊙ (z_{i−1} + s_i·(x A_iᵀ) B_iᵀ)    + 2 per adapter on z's chain (the add, the product by f_i);
                                                    adapter i's own term enters with in + r_i + 1 (the scaling)
        y = z_T + b                                 1

    The longest chain starts in adapter 1's term: in + r + 1 + 2T + 1. Each f_i's error (relative c_i·γ,
    a shorter chain, see ``dora_forward_depth``) is carried by the magnitude's (1 + c_i) factor.
    """
    return in_features + r_max + 2 * n_adapters + 2


def _dora_abs(W: Array, A: Array, B: Array, scaling: float) -> Array:
    """|W| + |s|·|B||A|: the adapted weight V = W + s·B A on absolute values."""
    return np.abs(W) + abs(scaling) * (np.abs(B) @ np.abs(A))


def dora_norm_magnitude(W: Array, A: Array, B: Array, scaling: float) -> Array:
    """‖|W| + |s||B||A|‖ per row: |n̂ − n| ≤ γ_k · this, k = ``dora_norm_depth`` (weight_norm, init_magnitude)."""
    return np.linalg.norm(_dora_abs(W, A, B, scaling), axis=1)


def dora_direction_magnitude(W: Array, A: Array, B: Array, scaling: float) -> Array:
    """(|V|_abs + c|V|) / n, c = ‖|V|_abs‖ / n per row: D = V / n has V's own error on |V|_abs and n's
    relative error (γ·c) on |V|; |D̂ − D| ≤ γ_k · this, k = ``dora_weight_depth``."""
    V, v_abs = W + scaling * (B @ A), _dora_abs(W, A, B, scaling)
    n, n_abs = np.linalg.norm(V, axis=1), np.linalg.norm(v_abs, axis=1)
    return (v_abs + (n_abs / n)[:, None] * np.abs(V)) / n[:, None]


def dora_merge_magnitude(
    W: Array, A: Array, B: Array, m: Array, scaling: float, W_base: Array | None = None
) -> tuple[Array, Array]:
    """(|f|·(|V|_abs + c|V|), ‖|V_base|_abs‖): the terms of W' = f ⊙ (W + ΔW), f = m / n*, and of n* = ‖W_base +
    ΔW‖ (W_base = W unless the norm is taken against an unmerged base), f and c of the base;
    |Ŵ' − W'| ≤ γ_k · the first, k = ``dora_weight_depth``. Also the embedding's f ⊙ (E + ΔE), transposed."""
    V, v_abs = W + scaling * (B @ A), _dora_abs(W, A, B, scaling)
    if W_base is None:
        Vn, vn_abs = V, v_abs
    else:
        Vn, vn_abs = W_base + scaling * (B @ A), _dora_abs(W_base, A, B, scaling)
    n, n_abs = np.linalg.norm(Vn, axis=1), np.linalg.norm(vn_abs, axis=1)
    f = np.abs(m / n)
    return f[:, None] * (v_abs + (n_abs / n)[:, None] * np.abs(V)), n_abs


def dora_unmerge_magnitude(W_merged: Array, A: Array, B: Array, m: Array, scaling: float, weight_norm: Array) -> Array:
    """|W'|·|n*/m| + |s||B||A|: the terms of W = W' / (m / n*) − ΔW;
    |Ŵ − W| ≤ γ_k · this, k = ``dora_unmerge_depth``."""
    return np.abs(W_merged) * np.abs(weight_norm / m)[:, None] + abs(scaling) * (np.abs(B) @ np.abs(A))


def dora_sequential_magnitude(
    x: Array, W: Array, adapters: list[tuple[Array, Array, Array, float]], bias: Array | None = None
) -> Array:
    """The terms of T DoRA adapters applied in turn (spec/dora.md §6), adapters as (A, B, m, s):

        Z₀ = |x||W|ᵀ,   Zᵢ = |fᵢ|(Zᵢ₋₁ + |sᵢ|(|x||Aᵢ|ᵀ)|Bᵢ|ᵀ),   Mᵢ = |fᵢ| Mᵢ₋₁ + (1 + cᵢ) Zᵢ,   M₀ = Z₀

    (each fᵢ's error, relative cᵢ·γ, acts on all of Zᵢ); |ŷ − y| ≤ γ_k (M_T + |b|), k = ``dora_sequential_depth``.
    """
    x_abs = np.abs(x)
    z = x_abs @ np.abs(W).T
    mag = z.copy()
    for A, B, m, s in adapters:
        V, v_abs = W + s * (B @ A), _dora_abs(W, A, B, s)
        n, n_abs = np.linalg.norm(V, axis=1), np.linalg.norm(v_abs, axis=1)
        f = np.abs(m / n)
        z = f * (z + abs(s) * ((x_abs @ np.abs(A).T) @ np.abs(B).T))
        mag = f * mag + (1.0 + n_abs / n) * z
    return mag + (0.0 if bias is None else np.abs(bias))


@dataclass(frozen=True)
class DoraBackwardTerms:
    """Per gradient, the terms its roundings act on (the §4 formulas on absolute values)."""

    dx: Array
    dA: Array
    dB: Array
    dm: Array


def dora_backward_depth(n_rows: int, in_features: int, out_features: int, r: int) -> int:
    """k = N + in + out + r + 20, N the rows of x: every reduction of the backward chained (dm sums N
    products of P = x Vᵀ, an in-term sum over V, itself an r-term sum; dA sums out terms of dV, an N-term
    sum; the full mode adds dm's chain to dV), plus the elementwise steps."""
    return n_rows + in_features + out_features + r + 20


def dora_backward_terms(
    x: Array,
    W: Array,
    A: Array,
    B: Array,
    m: Array,
    grad_y: Array,
    scaling: float,
    mode: str,
    keep: Array | None = None,
) -> DoraBackwardTerms:
    """Each gradient of spec/dora.md §4 evaluated on absolute values, every 1/n carrying the condition
    number c. x: (N, in) as the backward sees it (x_d in the train form); ``keep`` the dropout factor
    mask / (1 − p) of shape (N, in), or None (eval form); grad_y: (N, out)."""
    _, n, c = _dora_norms(W, A, B, scaling)
    x_in, g = np.abs(x), np.abs(grad_y)
    w_abs = np.abs(W)
    v_abs = w_abs + abs(scaling) * (np.abs(B) @ np.abs(A))
    fc = np.abs(m) / n * c
    dm = c * np.sum(g * (x_in @ v_abs.T), axis=0) / n
    dV = (g * fc).T @ x_in
    if mode == "full":
        dV = dV + (np.abs(m) * dm * c**2 / n**2)[:, None] * v_abs
    dA = abs(scaling) * (np.abs(B).T @ dV)
    dB = abs(scaling) * (dV @ np.abs(A).T)
    dx = (g * fc) @ v_abs
    if keep is not None:
        dx = g @ w_abs + (dx + g @ w_abs) * keep
    return DoraBackwardTerms(dx=dx, dA=dA, dB=dB, dm=dm)


def dora_backward(
    x: Array,
    W: Array,
    A: Array,
    B: Array,
    m: Array,
    grad_y: Array,
    scaling: float,
    dtype: Any,
    mode: str,
    keep: Array | None = None,
) -> DoraBackwardTerms:
    """Elementwise bounds on the DoRA gradients evaluated in ``dtype``: γ_k · ``dora_backward_terms``."""
    t = dora_backward_terms(x, W, A, B, m, grad_y, scaling, mode, keep)
    gk = gamma(dora_backward_depth(x.shape[0], W.shape[1], W.shape[0], A.shape[0]), dtype)
    return DoraBackwardTerms(dx=gk * t.dx, dA=gk * t.dA, dB=gk * t.dB, dm=gk * t.dm)


# ---------------------------------------------------------------------------- merging (spec/merging.md)


def task_vector_depth() -> int:
    """k = 1 for τ = θ_ft − θ_base (spec/merging.md §2): one subtraction."""
    return 1


def weighted_sum_depth(n_tasks: int) -> int:
    """k = T + 2 for task_arithmetic and linear, λ·Σ_t w_t τ_t (÷ Σ_t w_t) (spec/merging.md §3): the products
    and the T − 1 additions in order (T), the division (1), the scaling by λ (1). The divisor Σ w_t has its
    own T − 1 roundings relative to Σ|w_t|, not to |Σ w_t|: the magnitude carries that as the factor
    1 + Σ|w_t| / |Σ w_t| (``rows_merging._ta_magnitude``)."""
    return n_tasks + 2


def l1_rescale_depth(size: int) -> int:
    """k = 2n for τ ⊙ m · ‖τ‖₁ / ‖τ ⊙ m‖₁ over n entries (spec/merging.md §5, rescale="l1"): each norm is an
    n-term sum of exact absolute values (n − 1 roundings), the ratio (1), the product (1); 0 when not used."""
    return 2 * size


def disjoint_merge_depth(n_tasks: int) -> int:
    """k = T + 2 for TIES's disjoint merge λ·Σ_t w_t τ̂_t m_t / D (spec/merging.md §4.2), and for
    elect_and_merge (λ = 1) and magnitude_prune (D = 1): the weighted products and their T − 1 additions
    (T; with weight_stage="before_election" the product w_t τ̂_t is the same one rounding), the division
    (1), λ (1). The election only selects (an exact sign); D = Σ_t w_t m_t carries its condition number in
    the magnitude (``rows_merging._elected_magnitude``). Add ``l1_rescale_depth`` when τ̂ is L1-rescaled."""
    return n_tasks + 2


def dare_depth(n_tasks: int) -> int:
    """k = T + 3 for DARE (spec/merging.md §5): τ̂_t = τ_t ⊙ m_t / d_t rounds once (the mask is exact), then
    the linear or the disjoint merge (T + 2). Add ``l1_rescale_depth`` for rescale="l1"."""
    return n_tasks + 3


def slerp_depth(size: int) -> int:
    """k = 2n + 16 for SLERP over n entries (spec/merging.md §6):

        ‖v₀‖, ‖v₁‖, v̂ = v/‖v‖, ⟨v̂₀, v̂₁⟩    2n + 3 (the n-term sums of squares and dot, √, the divide)
        Ω = acos, sin((1 − t)Ω), sin(tΩ), sin Ω  8 (four libm functions, within 2 ulps each)
        1 − t, (1 − t)·Ω, t·Ω, the two quotients  3 on the longest path (1 − t, its product, the quotient)
        c₀v₀ + c₁v₁                              2, and a storage rounding 1

    The coefficients' sensitivity to cos Ω (large near the fallback threshold) is in the magnitude
    (``rows_merging._slerp_terms``), not here.
    """
    return 2 * size + 16


def lora_delta_merge_depth(r_max: int, n_adapters: int) -> int:
    """k = r_max + T + 1 for ΔW = Σ_i c_i B_i A_i, c_i = w_i s_i (spec/merging.md §7): c_i (1), the r_i-term
    sum B_i A_i (r_i), the product by c_i (1), the T − 1 additions. lora_cat's c_i A_i (2 roundings) and
    lora_factor_linear's Σ_i √|c_i| A_i (c_i, √, the product, T − 1 additions: T + 2) are within it."""
    return r_max + n_adapters + 1


def lora_cat_depth() -> int:
    """k = 2 for lora_cat's A = [c₁A₁; …; c_T A_T] (spec/merging.md §7): c_i = w_i s_i (1), c_i A_i (1);
    B is the columns of the B_i, exact."""
    return 2


def svd_factor_depth(out_features: int, in_features: int, n_adapters: int) -> int:
    """k = 10(out + in) + 4T for the truncated-SVD factors of lora_svd and lowrank_factors (spec/merging.md
    §7): ΔW's formation (``lora_delta_merge_depth``, ≤ 4T + r) and the backward error of LAPACK's SVD,
    ‖E‖ ≤ p·u‖ΔW‖, charged generously as p = 10(out + in) (LAPACK Users' Guide §4.9 leaves p(m, n) "a
    modestly growing function"). The magnitude (``rows_merging._svd_bound``) turns it into the factors'
    error through σ₁ / gap (Wedin). ``lora_init_depth`` charges the same SVD less (out + in + 8): the PiSSA
    factors' magnitude caps the first-order bound by the trivial one, so a loose p is not needed there."""
    return 10 * (out_features + in_features) + 4 * n_adapters


# ---------------------------------------------------------------------------- the conformance harness


def differential(depth: int, magnitude: Array, dtype: str) -> Array:
    """Bound on |target − reference| for a formula of rounding depth K and ``magnitude`` (the formula on
    |inputs|): the reference (float64) and the target (``dtype``) are each within γ of the exact value, so

        |target − reference| ≤ (γ_{K'}(dtype) + γ_K(float64)) · magnitude,

    K' = K for a float64 target and K + 2 otherwise (a target computing in a narrower format also rounds
    its inputs and its result once). Used by ``conformance.tolerance.Bounded``.
    """
    k_target = depth if dtype == "float64" else depth + 2
    return (gamma(k_target, dtype) + gamma(depth, "float64")) * np.abs(np.asarray(magnitude, dtype=np.float64))


# ---------------------------------------------------------------------------- results stored in a narrower format
#
# Some ops round their result into a storage format (``dtype=`` of lora.merge/unmerge, dora.merge/unmerge):
# the reference stores y = rd(v), rd the round-to-nearest-even of that format and v its float64 value. A
# target computes v in its own precision and then rounds: its stored value is rd(z), |z − v| ≤ e (the
# differential bound on v), which may be the neighbour of rd(v) where v lies within e of a tie of the format
# (double rounding). rd is monotone, so the stored values a correct target can give are exactly those of the
# format in [rd(v − e), rd(v + e)]. The counts below are those of v, before its storage rounding.


def lora_merge_unrounded_depth(r: int) -> int:
    """k = r + 2 for v = W ± s·B A before its storage rounding (spec/lora.md §6, safe=False): the r-term sum,
    the scaling, the add."""
    return r + 2


def lora_delta_unrounded_depth(r: int) -> int:
    """k = r + 1 for ΔW = s·B A before the safe path stores it in the base format: the r-term sum, the
    scaling (``lora_delta_depth`` without the storage)."""
    return r + 1


def stored_add_depth() -> int:
    """k = 1 for W ± rd(ΔW), the add of an already stored term (safe merge, unmerge)."""
    return 1


def dora_merge_unrounded_depth(in_features: int, r: int) -> int:
    """k = in + r + 5 for f ⊙ (W + ΔW) before its storage rounding: ``dora_weight_depth`` without the storage."""
    return dora_weight_depth(in_features, r) - 1


def dora_unmerge_unrounded_depth(r: int) -> int:
    """k = r + 2 for W' / f − ΔW before its storage rounding: ``dora_unmerge_depth`` without the storage."""
    return dora_unmerge_depth(r) - 1


def _round_extended(x: Array, dtype: str) -> Array:
    """rd(x) in ``dtype``, an overflow as ±inf by the sign of x (float8_e4m3fn rounds it to NaN: the sign is
    kept here so that the ends of a range stay ordered)."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = round_to(x, dtype)
    return np.where(np.isfinite(out) | np.isnan(x), out, np.copysign(np.inf, x))


@dataclass(frozen=True)
class StoredRange:
    """The stored values a target may give for y = rd(base + sign·q(inner)), q = rd (``inner_rounded``: PEFT's
    safe merge and unmerge store ΔW first) or the identity, all in the storage format ``dtype``.

    ``e_inner`` bounds the target's error on ``inner``, ``e_outer`` its error on the sum; both are differential
    bounds (they include the float64 reference's own error). A single rounding rd(v) is base = v, inner = 0.
    ``ends(λ)`` is the range [lo, hi] with both errors scaled by λ (λ = 1: the bound): by monotonicity of rd,

        q-range  = [q(inner − λe_in), q(inner + λe_in)]
        [lo, hi] = [rd(base + sign·q-range − λe_out), rd(base + sign·q-range + λe_out)],

    every stored value a correct target can give lies in it (with the safe path, a superset: q takes only
    the format's values in its range). Overflow ends are ±inf.
    """

    dtype: str
    base: Array
    e_outer: Array
    inner: Array | float = 0.0
    e_inner: Array | float = 0.0
    inner_rounded: bool = False
    sign: float = 1.0

    def ends(self, lam: Array | float = 1.0) -> tuple[Array, Array]:
        with np.errstate(invalid="ignore", over="ignore"):
            q_lo = np.asarray(self.inner - lam * self.e_inner, dtype=np.float64)
            q_hi = np.asarray(self.inner + lam * self.e_inner, dtype=np.float64)
            if self.inner_rounded:
                q_lo, q_hi = _round_extended(q_lo, self.dtype), _round_extended(q_hi, self.dtype)
            if self.sign < 0:
                q_lo, q_hi = -q_hi, -q_lo
            lo = _round_extended(self.base + q_lo - lam * self.e_outer, self.dtype)
            hi = _round_extended(self.base + q_hi + lam * self.e_outer, self.dtype)
        return np.where(np.isnan(lo), -np.inf, lo), np.where(np.isnan(hi), np.inf, hi)

    def subset(self, where: Any) -> StoredRange:
        """The range of the elements at the flat indices ``where`` (1-D)."""

        def pick(a: Array | float) -> Array | float:
            return np.broadcast_to(a, np.shape(self.base)).reshape(-1)[where] if np.ndim(a) else a

        return StoredRange(
            self.dtype,
            np.asarray(pick(self.base)),
            np.asarray(pick(self.e_outer)),
            pick(self.inner),
            pick(self.e_inner),
            self.inner_rounded,
            self.sign,
        )


@dataclass(frozen=True)
class StoredNormRange:
    """The stored values of PEFT's magnitude in a storage format (dora.init_magnitude with ``dtype``, spec/dora.md
    §2): m = rd(‖rd(rd(W) + rd(s·rd(B A)))‖) per row, W (out, in), A (r, in), B (out, r), every rd into ``dtype``.

    A target computing each stage in ``target`` precision may round each one to the neighbour of the
    reference's (double rounding), so the range of each stage is carried to the next as ``StoredRange`` does:
    rd(W) in [rd(W ∓ e₀)] (the target's own rounding of W first), rd(B A) in [rd(B A ∓ e₁)] (r-term sums),
    the scaling and the add monotone in their stored operands (e₂, e₃: one rounding each), the norm of the
    row between the norms of its least and largest |V| (0 where V's range holds 0), ± e₄ (in + 1: the sum of
    squares and the root), then rd. Each eᵢ is a differential bound; ``ends(λ)`` scales them all by λ.
    """

    dtype: str
    target: str
    W: Array
    A: Array
    B: Array
    scaling: float

    def ends(self, lam: Array | float = 1.0) -> tuple[Array, Array]:
        t, lam_rows = self.target, np.asarray(lam, dtype=np.float64)
        lam2 = lam_rows[..., None] if lam_rows.ndim else lam_rows

        def rd(x: Array) -> Array:
            return _round_extended(x, self.dtype)

        def widest(lo: Array, hi: Array) -> Array:
            return np.maximum(np.abs(lo), np.abs(hi))

        with np.errstate(invalid="ignore", over="ignore"):
            e0 = lam2 * differential(0, np.abs(self.W), t)
            w_lo, w_hi = rd(self.W - e0), rd(self.W + e0)
            ba = self.B @ self.A
            e1 = lam2 * differential(self.A.shape[0], np.abs(self.B) @ np.abs(self.A), t)
            p_lo, p_hi = rd(ba - e1), rd(ba + e1)
            sp_lo, sp_hi = (self.scaling * p_lo, self.scaling * p_hi)
            if self.scaling < 0:
                sp_lo, sp_hi = sp_hi, sp_lo
            e2 = lam2 * differential(1, abs(self.scaling) * widest(p_lo, p_hi), t)
            l_lo, l_hi = rd(sp_lo - e2), rd(sp_hi + e2)
            e3 = lam2 * differential(1, widest(w_lo, w_hi) + widest(l_lo, l_hi), t)
            v_lo, v_hi = rd(w_lo + l_lo - e3), rd(w_hi + l_hi + e3)
            least = np.where((v_lo <= 0) & (v_hi >= 0), 0.0, np.minimum(np.abs(v_lo), np.abs(v_hi)))
            n_lo, n_hi = np.linalg.norm(least, axis=1), np.linalg.norm(widest(v_lo, v_hi), axis=1)
            e4 = lam_rows * differential(self.W.shape[1] + 1, n_hi, t)
            lo, hi = rd(n_lo - e4), rd(n_hi + e4)
        return np.where(np.isnan(lo), 0.0, lo), np.where(np.isnan(hi), np.inf, hi)

    def subset(self, where: Any) -> StoredNormRange:
        """The range of the rows at the indices ``where`` (1-D)."""
        return StoredNormRange(self.dtype, self.target, self.W[where], self.A, self.B[where], self.scaling)


def stored_single(v: Array, depth: int, magnitude: Array, storage: str, dtype: str) -> StoredRange:
    """The stored range of y = rd(v) for a target computing v (rounding count ``depth``, ``magnitude`` its
    formula on |inputs|) in ``dtype`` and storing it in ``storage``."""
    return StoredRange(storage, np.asarray(v, dtype=np.float64), differential(depth, magnitude, dtype))


def stored_sum(
    base: Array,
    inner: Array,
    inner_depth: int,
    inner_magnitude: Array,
    storage: str,
    dtype: str,
    *,
    sign: float = 1.0,
) -> StoredRange:
    """The stored range of y = rd(base + sign·rd(inner)) (the safe merge, the unmerge): ``inner`` within
    differential(inner_depth, inner_magnitude), the add (``stored_add_depth``) relative to |base| plus the
    largest stored |inner| of its range."""
    inner = np.asarray(inner, dtype=np.float64)
    e_in = differential(inner_depth, inner_magnitude, dtype)
    q = np.maximum(np.abs(_round_extended(inner - e_in, storage)), np.abs(_round_extended(inner + e_in, storage)))
    q = np.where(np.isfinite(q), q, 0.0)  # an overflowing stored ΔW overflows the sum whatever its error
    e_out = differential(stored_add_depth(), np.abs(base) + q, dtype)
    return StoredRange(storage, np.asarray(base, dtype=np.float64), e_out, inner, e_in, True, sign)


# ---------------------------------------------------------------------------- QLoRA backward (spec/nf4.md §13.1)


@dataclass(frozen=True)
class QloraBackwardBounds:
    """Elementwise bounds on the gradients of ``qlora.backward`` (None for dbias unless asked)."""

    dx: Array
    dA: Array
    dB: Array
    dbias: Array | None = None


def qlora_backward(
    x: Array,
    W: Array,
    A: Array,
    B: Array,
    grad_y: Array,
    scaling: float,
    keep: Array | None,
    dtype: Any,
    accumulate: Any = None,
) -> QloraBackwardBounds:
    """The QLoRA backward as torch autograd evaluates it through bitsandbytes' ``Linear4bit`` and PEFT's LoRA
    layer, W the exactly dequantized (out, in) weight (frozen), x (N, in), grad_y g (N, out), keep the dropout
    factor mask / (1 − p) (N, in) or None. With ρ = 2 roundings when there is a keep factor (the factor itself
    stored in ``dtype``, then the product), else 0, the evaluation is

        x̃ = fl(x ⊙ keep) (ρ),  h = fl(x̃ Aᵀ) (K = in),  ĝ = fl(s·g) (1)
        dB = fl(ĝᵀ h) (N),  dh = fl(ĝ B) (out),  dA = fl(dhᵀ x̃) (N)
        dx = fl(fl(g W) + fl(fl(dh A) ⊙ keep))   (out; r; ρ; the sum of the two paths)
        dbias = fl(Σ_N g)

    each sum accumulated in ``accumulate`` (default ``dtype``, γ_n) and each stored result rounded to ``dtype``
    (u), so (Higham §3.1), with x̃ = |x| ⊙ keep:

        |d̂B − dB|    ≤ [(1+γ_K)(1+γ_N)(1+u)^{3+ρ} − 1] · |s| |g|ᵀ (|x̃| |A|ᵀ)
        |d̂A − dA|    ≤ [(1+γ_out)(1+γ_N)(1+u)^{3+ρ} − 1] · |s| (|g| |B|)ᵀ |x̃|
        |d̂x − dx|    ≤ [(1+γ_out)(1+u)² − 1] · |g| |W| + [(1+γ_out)(1+γ_r)(1+u)^{4+ρ} − 1] · |s| (|g| |B| |A|) ⊙ keep
        |d̂bias − db| ≤ [(1+γ_N)(1+u) − 1] · Σ_N |g|
    """
    n_rows, K = x.shape
    out_f, r = B.shape
    acc = dtype if accumulate is None else accumulate
    u = unit_roundoff(dtype)
    rho = 0 if keep is None else 2
    ax, aW, aA, aB, ag = np.abs(x), np.abs(W), np.abs(A), np.abs(B), np.abs(grad_y)
    axd = ax if keep is None else ax * keep
    s = abs(scaling)
    gB = ag @ aB
    lora_dx = s * (gB @ aA)
    if keep is not None:
        lora_dx = lora_dx * keep
    g_dB = (1 + gamma(K, acc)) * (1 + gamma(n_rows, acc)) * (1 + u) ** (3 + rho) - 1
    g_dA = (1 + gamma(out_f, acc)) * (1 + gamma(n_rows, acc)) * (1 + u) ** (3 + rho) - 1
    g_base = (1 + gamma(out_f, acc)) * (1 + u) ** 2 - 1
    g_lora = (1 + gamma(out_f, acc)) * (1 + gamma(r, acc)) * (1 + u) ** (4 + rho) - 1
    return QloraBackwardBounds(
        dx=g_base * (ag @ aW) + g_lora * lora_dx,
        dA=g_dA * s * (gB.T @ axd),
        dB=g_dB * s * (ag.T @ (axd @ aA.T)),
        dbias=((1 + gamma(n_rows, acc)) * (1 + u) - 1) * ag.sum(axis=0),
    )


def qlora_backward_row_depth(in_features: int, out_features: int, r: int, n_rows: int) -> int:
    """k = in + out + r + N + 6 for the conformance row of ``qlora.backward`` (spec/nf4.md §13.1): every
    reduction on the longest chain (dx: g B over out, then through r and in; dA and dB: the
    N rows of x), plus the two scalings, the keep factor's divide and product and the final add; the
    dequantized weight is exact (spec/nf4.md §5), so it adds no rounding."""
    return in_features + out_features + r + n_rows + 6
