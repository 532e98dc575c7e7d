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

tests/test_bounds.py checks each bound against float32 evaluations in a fixed order on random and
adversarial inputs (each addition rounding the same way) and states how tight it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from refimpl.precision import gamma, unit_roundoff

Array = NDArray[np.float64]


# ---------------------------------------------------------------------------- matrix products


def matmul(a: Array, b: Array, dtype: Any, *, extra_roundings: int = 1) -> Array:
    """|fl(a @ b) − a @ b| ≤ γ_{K + extra} · (|a| @ |b|), K the length of the sum (Higham eq. 3.5).

    ``extra_roundings`` counts roundings after the sum (1: storing the result in ``dtype``).
    """
    return gamma(a.shape[-1] + extra_roundings, dtype) * (np.abs(a) @ np.abs(b))


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
