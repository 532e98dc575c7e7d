"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353), as PEFT 0.21.2 computes it.

DoRA splits the adapted weight into a trainable magnitude m and a direction
(DoRA eq. 5, written in PEFT's (out, in) layout):

    V  = W + s · B A                       (out, in)   the LoRA-adapted weight
    ‖V‖ = sqrt(Σ_j V_oj²)                  (out,)      norm of each output row over the input dimension
    W' = m ⊙ V / ‖V‖ = f ⊙ V,   f = m / ‖V‖           (the paper's "column-wise" ‖·‖_c in its d×k notation)

    eval form:   y = f ⊙ (x Vᵀ) + b
    train form:  y = x Wᵀ + b + (f − 1) ⊙ (x_d Wᵀ) + f ⊙ s·(x_d Aᵀ) Bᵀ,   x_d = x ⊙ mask / (1 − p)

The train form is PEFT's dropout formula (PR #1474, PR #2153, nbasyl/DoRA#2);
with no dropout both forms are equal. The magnitude starts at m = ‖W + s·B A‖,
so the layer equals its base at initialisation. The backward pass either treats
‖V‖ as a constant (paper §4.3, PEFT: ``mode="detached"``) or differentiates it
(``mode="full"``). Rows with ‖V‖ = 0 have no direction: every function that
divides by the norm raises ValueError (spec/dora.md, special values).

Embedding (PEFT ``lora.Embedding``): E is (V, d), A (r, V), B (d, r) and
ΔE = s·(B A)ᵀ — a Linear stored (in, out) with in = V, so ``embedding=True``
means ``fan_in_fan_out=True``: the norm runs across the vocabulary and m is (d,).
ConvNd: W (out, in, *k), A (r, in, *k), B (out, r, 1, …); the norm is over every
axis but the first, i.e. the Linear rule on the (out, in·∏k) reshapes.

Everything is float64 NumPy; ``dtype=`` options round a result once into a
storage format, as PEFT does. See spec/dora.md for the written rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, bounds, precision
from refimpl._linear_operands import (
    adapter_factors,
    base_weight,
    bias_vector,
    layer_input,
    linear_layer,
    linear_operands,
    scaling_factor,
    token_ids,
)

#: the public API (the checks imported from refimpl._linear_operands are not part of it)
__all__ = [
    "BACKWARD_MODES",
    "DoraAdapter",
    "DoraGrads",
    "DoraMerge",
    "backward",
    "backward_error_bound",
    "direction",
    "embedding_forward",
    "forward",
    "forward_error_bound",
    "forward_sequential",
    "init_magnitude",
    "merge",
    "param_count",
    "unmerge",
    "weight_norm",
]

BACKWARD_MODES = ("detached", "full")


@dataclass(frozen=True)
class DoraGrads:
    """Gradients of a DoRA layer: dx like x, dA (r, in), dB (out, r), dm (out,)."""

    dx: np.ndarray
    dA: np.ndarray
    dB: np.ndarray
    dm: np.ndarray


@dataclass(frozen=True)
class DoraMerge:
    """A merged weight and the row norm ‖W_base + ΔW‖ that ``unmerge`` needs back."""

    W: np.ndarray
    weight_norm: np.ndarray


@dataclass(frozen=True)
class DoraAdapter:
    """One DoRA adapter of a layer, for ``forward_sequential``: A (r, in), B (out, r), m (out,), s."""

    A: Any
    B: Any
    m: Any
    scaling: float


# ---------------------------------------------------------------------------- core: the formulas (spec/dora.md §2–§7)


def _nonzero_norm(norm: np.ndarray, name: str = "W + s·B·A") -> np.ndarray:
    """The zero-norm policy: a row without a direction is an error, never a silent inf/NaN."""
    zero = np.flatnonzero(norm == 0)
    if zero.size:
        raise ValueError(
            f"{name}: row norm is zero at output row(s) {zero[:8].tolist()}"
            f"{' …' if zero.size > 8 else ''}; DoRA's direction V/‖V‖ is undefined there "
            "(PEFT returns inf/NaN; see spec/dora.md, special values)"
        )
    return norm


def _combined(W: np.ndarray, A: np.ndarray, B: np.ndarray, s: float) -> np.ndarray:
    return W + s * (B @ A)  # V = W + s · B A


def _row_norm(V: np.ndarray) -> np.ndarray:
    return np.linalg.norm(V, axis=1)  # ‖V‖ per output row, over the input dimension


def _factor(m: np.ndarray, V: np.ndarray, name: str = "W + s·B·A") -> np.ndarray:
    return m / _nonzero_norm(_row_norm(V), name)  # f = m / ‖V‖


def _forward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    m: np.ndarray,
    s: float,
    bias: np.ndarray,
    keep: np.ndarray | None,
) -> np.ndarray:
    V = _combined(W, A, B, s)
    f = _factor(m, V)
    if keep is None:  # eval form
        return f * (x @ V.T) + bias
    x_d = x * keep  # train form (PEFT's dropout formula): the base term never sees dropout
    return x @ W.T + bias + (f - 1.0) * (x_d @ W.T) + f * (s * ((x_d @ A.T) @ B.T))


def _backward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    m: np.ndarray,
    g: np.ndarray,
    s: float,
    keep: np.ndarray | None,
    full: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dA, dB, dm) for x (N, in), g = ∂L/∂y (N, out), keep (N, in) or None; ``full`` differentiates ‖V‖."""
    x_in = x if keep is None else x * keep
    V = _combined(W, A, B, s)
    n = _nonzero_norm(_row_norm(V))
    gf = g * (m / n)  # G ⊙ f
    dm = np.sum(g * (x_in @ V.T), axis=0) / n
    dV = gf.T @ x_in
    if full:
        dV = dV - (m * dm / n**2)[:, None] * V
    dA = s * (B.T @ dV)
    dB = s * (dV @ A.T)
    dx = gf @ V if keep is None else g @ W + (gf @ V - g @ W) * keep
    return dx, dA, dB, dm


def _forward_sequential(
    x: np.ndarray, W: np.ndarray, adapters: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]], bias: np.ndarray
) -> np.ndarray:
    z = x @ W.T  # z₀ = x Wᵀ
    for A, B, m, s in adapters:
        z = _factor(m, _combined(W, A, B, s)) * (z + s * ((x @ A.T) @ B.T))  # z_i = f_i ⊙ (z_{i−1} + s_i x A_iᵀ B_iᵀ)
    return z + bias


def _merge(
    W: np.ndarray, base: np.ndarray, A: np.ndarray, B: np.ndarray, m: np.ndarray, s: float
) -> tuple[np.ndarray, np.ndarray]:
    """(f ⊙ (W + ΔW), ‖W_base + ΔW‖) with f = m / ‖W_base + ΔW‖."""
    d = s * (B @ A)
    norm = _nonzero_norm(_row_norm(base + d))
    return (m / norm)[:, None] * (W + d), norm


def _unmerge(
    W_merged: np.ndarray, A: np.ndarray, B: np.ndarray, m: np.ndarray, s: float, weight_norm: np.ndarray
) -> np.ndarray:
    return W_merged / (m / weight_norm)[:, None] - s * (B @ A)  # W = W' / f − ΔW


# ---------------------------------------------------------------------------- checks beside the core


def _magnitude(m: Any, out_features: int) -> np.ndarray:
    m_arr = _checks.float_array(m, "m", ndim=1)
    _checks.check_shape(m_arr, "m", (out_features,))
    return m_arr


def _bias_or_zero(bias: np.ndarray | None, out_features: int) -> np.ndarray:
    return np.zeros(out_features) if bias is None else bias


# ---------------------------------------------------------------------------- norm, direction, magnitude


@precision._overflow_checked
def weight_norm(
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
) -> npt.NDArray[np.float64]:
    """‖W + s·B A‖ per output row, over the input dimension (DoRA eq. 5's ‖V + ΔV‖_c); shape (out,).

    Embedding (``embedding=True``, E (V, d)): the norm of each column of E + ΔE
    across the vocabulary, shape (d,). ConvNd weights: over all axes but the first.
    """
    layer = linear_layer(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding, allow_conv=True)
    return _row_norm(_combined(layer.W, layer.A, layer.B, layer.scaling))


@precision._overflow_checked
def direction(
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
) -> npt.NDArray[np.float64]:
    """The unit-norm direction (W + s·B A) / ‖W + s·B A‖ (DoRA eq. 5), in the layout of W."""
    layer = linear_layer(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding, allow_conv=True)
    V = _combined(layer.W, layer.A, layer.B, layer.scaling)
    return layer.to_caller(V / _nonzero_norm(_row_norm(V))[:, None])  # V / ‖V‖


@precision._overflow_checked(storage_dtype="dtype")
def init_magnitude(
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
    dtype: Any = None,
) -> npt.NDArray[np.float64]:
    """m₀ = ‖W + s·B A‖ (DoRA §4.1: m initialised to the norm of the pre-trained weight), shape (out,).

    With the default LoRA init (B = 0) this is ‖W‖, so the layer starts equal to
    its base. ``dtype`` emulates PEFT, which computes m in the base dtype before
    upcasting the adapter: ``round(‖round(W + round(s·round(B A)))‖)``. In bfloat16
    that m is off by up to one rounding (|f − 1| ≤ u = 2⁻⁸), so PEFT's DoRA is not
    the identity at init there. A zero row gives m = 0 (allowed; forward then raises).
    """
    layer = linear_layer(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding, allow_conv=True)
    if dtype is None:
        return _row_norm(_combined(layer.W, layer.A, layer.B, layer.scaling))
    dt = precision.resolve_dtype(dtype)
    low_rank = precision.round_to(layer.scaling * precision.round_to(layer.B @ layer.A, dt), dt)
    V = precision.round_to(precision.round_to(layer.W, dt) + low_rank, dt)
    return precision.round_to(_row_norm(V), dt)


# ---------------------------------------------------------------------------- forward and backward


@precision._overflow_checked
def forward(
    x: npt.ArrayLike,
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    m: npt.ArrayLike,
    scaling: float,
    *,
    bias: npt.ArrayLike | None = None,
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> npt.NDArray[np.float64]:
    """DoRA layer output, shape (..., out), for x of shape (..., in).

    Eval form (no ``dropout_mask``; also PEFT's training without dropout):
        y = f ⊙ (x (W + s·B A)ᵀ) + b,                       f = m / ‖W + s·B A‖
    Train form (PEFT with ``lora_dropout`` > 0, keep mask given):
        y = x Wᵀ + b + (f − 1) ⊙ (x_d Wᵀ) + f ⊙ s·(x_d Aᵀ) Bᵀ,   x_d = x ⊙ mask / (1 − p)
    The base term x Wᵀ never sees dropout; with an all-ones mask and p = 0 the
    two forms agree. Liu et al. 2024 (arXiv 2402.09353) eq. 5; PEFT PR #1474.
    """
    ops = linear_operands(
        x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    m_arr = _magnitude(m, ops.out_features)
    return _forward(ops.x, ops.W, ops.A, ops.B, m_arr, ops.scaling, _bias_or_zero(ops.bias, ops.out_features), ops.keep)


@precision._overflow_checked
def backward(
    x: npt.ArrayLike,
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    m: npt.ArrayLike,
    grad_y: npt.ArrayLike,
    scaling: float,
    *,
    mode: str = "detached",
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> DoraGrads:
    """Gradients of ⟨grad_y, forward(...)⟩ with respect to x, A, B and m (W and b are frozen).

    With G = grad_y (N, out), x_in = x (eval) or x_d (train), P = x_in Vᵀ, n = ‖V‖, f = m / n:

        dm = Σ_N G ⊙ P / n
        dV = (G ⊙ f)ᵀ x_in                                   ``mode="detached"`` (paper §4.3, PEFT)
        dV = (G ⊙ f)ᵀ x_in − (m ⊙ dm / n²) ⊙ V               ``mode="full"`` (∂n_o/∂V_oj = V_oj / n_o)
        dA = s · Bᵀ dV,   dB = s · dV Aᵀ
        dx = (G ⊙ f) V                                       eval form
        dx = G W + ((G ⊙ f) V − G W) ⊙ mask / (1 − p)        train form

    dm is the same in both modes: the norm does not depend on m.
    """
    ops = linear_operands(
        x, W, A, B, scaling, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    m_arr = _magnitude(m, ops.out_features)
    g = _checks.float_array(grad_y, "grad_y", ndim=ops.x.ndim)
    _checks.check_shape(g, "grad_y", (*ops.x.shape[:-1], ops.out_features))
    full = _checks.choice(mode, "mode", BACKWARD_MODES) == "full"
    x2, g2 = ops.x.reshape(-1, ops.in_features), g.reshape(-1, ops.out_features)  # sums over every leading axis
    keep2 = None if ops.keep is None else ops.keep.reshape(x2.shape)
    dx, dA, dB, dm = _backward(x2, ops.W, ops.A, ops.B, m_arr, g2, ops.scaling, keep2, full)
    return DoraGrads(dx=dx.reshape(ops.x.shape), dA=dA, dB=dB, dm=dm)


@precision._overflow_checked
def embedding_forward(
    ids: npt.ArrayLike, E: npt.ArrayLike, A: npt.ArrayLike, B: npt.ArrayLike, m: npt.ArrayLike, scaling: float
) -> npt.NDArray[np.float64]:
    """DoRA Embedding (PEFT ``lora.Embedding`` with ``use_dora``): y = (f ⊙ (E + ΔE))[ids].

    E (V, d), A (r, V), B (d, r), ΔE = s·(B A)ᵀ, f = m / ‖E + ΔE‖ with the norm of
    each embedding dimension across the vocabulary, m of shape (d,). No dropout
    (PEFT never applies it to embeddings).
    """
    layer = linear_layer(E, A, B, scaling, embedding=True, w_name="E")  # (d, V) layout
    m_arr = _magnitude(m, layer.out_features)
    idx = token_ids(ids, layer.in_features)
    V = _combined(layer.W, layer.A, layer.B, layer.scaling)  # (d, V)
    return (_factor(m_arr, V, "E + s·(B·A)ᵀ") * V.T)[idx]  # y = (f ⊙ (E + ΔE))[ids]


@precision._overflow_checked
def forward_sequential(
    x: npt.ArrayLike,
    W: npt.ArrayLike,
    adapters: Sequence[DoraAdapter],
    *,
    bias: npt.ArrayLike | None = None,
    fan_in_fan_out: bool = False,
) -> npt.NDArray[np.float64]:
    """Several active DoRA adapters on one layer, composed as PEFT composes them (eval form).

        z₀ = x Wᵀ,   z_i = f_i ⊙ (z_{i−1} + s_i·(x A_iᵀ) B_iᵀ),   y = z_k + b,
        f_i = m_i / ‖W + s_i·B_i A_i‖   (each norm against the bare base W)

    PEFT feeds the running result to each adapter as its ``base_result``; the
    result is not a DoRA layer of the summed delta. ``merge`` with ``unmerged_base``
    gives the matching merged weight.
    """
    if isinstance(adapters, DoraAdapter) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError(f"adapters: expected a non-empty sequence of DoraAdapter, got {_checks.describe(adapters)}")
    w = base_weight(W, fan_in_fan_out)
    out_f, in_f = w.shape
    x_arr = layer_input(x, in_f)
    checked = []
    for i, ad in enumerate(adapters):
        if not isinstance(ad, DoraAdapter):
            raise TypeError(f"adapters[{i}]: expected a DoraAdapter, got {_checks.describe(ad)}")
        a, b = adapter_factors(ad.A, ad.B, in_f, out_f)
        checked.append((a, b, _magnitude(ad.m, out_f), scaling_factor(ad.scaling)))
    return _forward_sequential(x_arr, w, checked, _bias_or_zero(bias_vector(bias, out_f), out_f))


# ---------------------------------------------------------------------------- merge and unmerge


@precision._overflow_checked(storage_dtype="dtype")
def merge(
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    m: npt.ArrayLike,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
    unmerged_base: npt.ArrayLike | None = None,
    dtype: Any = None,
) -> DoraMerge:
    """W_merged = f ⊙ (W + ΔW), f = m / ‖W_base + ΔW‖ per output row (PEFT ``merge``).

    Returns the merged weight (layout of W) and the norm ‖W_base + ΔW‖, which
    ``unmerge`` takes back: the merged weight alone does not determine it. W_base
    is ``unmerged_base`` when W already holds earlier merged adapters (PEFT ≥ 0.21
    norms against the unmerged base, fix #3609 for #3608), else W itself.
    ``dtype`` rounds the merged weight once into the base storage format (PEFT
    computes f ⊙ (W + ΔW) in float32 and casts; its safe and unsafe DoRA merges agree).
    """
    layer = linear_layer(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding, allow_conv=True)
    m_arr = _magnitude(m, layer.out_features)
    if unmerged_base is None:
        base = layer.W
    else:
        ub = _checks.float_array(unmerged_base, "unmerged_base", ndim=len(layer.w_shape))
        _checks.check_shape(ub, "unmerged_base", layer.w_shape)
        base = ub.reshape(layer.w_shape[0], -1) if ub.ndim > 2 else (ub.T if layer.transposed else ub)
    merged, norm = _merge(layer.W, base, layer.A, layer.B, m_arr, layer.scaling)
    merged = layer.to_caller(merged)
    return DoraMerge(W=merged if dtype is None else precision.round_to(merged, dtype), weight_norm=norm)


@precision._overflow_checked(storage_dtype="dtype")
def unmerge(
    W_merged: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    m: npt.ArrayLike,
    scaling: float,
    weight_norm: npt.ArrayLike,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
    dtype: Any = None,
) -> npt.NDArray[np.float64]:
    """W = W_merged / f − ΔW with f = m / weight_norm, the norm ``merge`` returned (PEFT's cached norm).

    Exact inverse of ``merge`` in exact arithmetic; in a low-precision ``dtype``
    (result rounded once) it is not, as in PEFT. A zero magnitude row cannot be
    unmerged (the merged row is 0 whatever W was): ValueError.
    """
    layer = linear_layer(
        W_merged, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding, allow_conv=True, w_name="W_merged"
    )
    m_arr = _magnitude(m, layer.out_features)
    norm = _checks.float_array(weight_norm, "weight_norm", ndim=1)
    _checks.check_shape(norm, "weight_norm", (layer.out_features,))
    if (norm <= 0).any():
        raise ValueError(
            f"weight_norm: expected positive row norms (as returned by merge), got "
            f"{norm[norm <= 0][:4].tolist()} at rows {np.flatnonzero(norm <= 0)[:8].tolist()}"
        )
    if (m_arr == 0).any():
        raise ValueError(
            f"m: zero magnitude at output row(s) {np.flatnonzero(m_arr == 0)[:8].tolist()}; "
            "those merged rows are 0 and the base weight cannot be recovered"
        )
    restored = layer.to_caller(_unmerge(layer.W, layer.A, layer.B, m_arr, layer.scaling, norm))
    return restored if dtype is None else precision.round_to(restored, dtype)


# ---------------------------------------------------------------------------- counts and bounds


def param_count(
    in_features: int, out_features: int, r: int, *, kernel_size: Sequence[int] = (), groups: int = 1
) -> int:
    """Trainable parameters of one DoRA layer: r·(in + out) + out (A, B and m).

    Embedding: in = num_embeddings, out = embedding_dim. ConvNd (``kernel_size``):
    r·in·∏k + out·(r / groups) + out (PEFT's ``lora_B`` is grouped, ``lora_A`` not).
    """
    i = _checks.integer(in_features, "in_features", low=1)
    o = _checks.integer(out_features, "out_features", low=1)
    rank = _checks.integer(r, "r", low=1)
    g = _checks.integer(groups, "groups", low=1)
    ks = tuple(_checks.integer(k, "kernel_size", low=1) for k in kernel_size)
    if not ks:
        if g != 1:
            raise ValueError(f"groups: only convolutions are grouped; expected 1 without kernel_size, got {g}")
        return rank * (i + o) + o
    if rank % g:
        raise ValueError(f"r: expected a multiple of groups = {g} (PEFT requires r % groups == 0), got {rank}")
    return rank * i * math.prod(ks) + o * (rank // g) + o  # Python ints: no int64 overflow


@precision._overflow_checked
def forward_error_bound(
    x: npt.ArrayLike,
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    m: npt.ArrayLike,
    scaling: float,
    dtype: Any = "float32",
    *,
    bias: npt.ArrayLike | None = None,
    fan_in_fan_out: bool = False,
) -> npt.NDArray[np.float64]:
    """Elementwise bound on |ŷ − y| for a kernel that evaluates the DoRA eval form in ``dtype``.

    Inputs are taken as exact. With P = |x||W|ᵀ, Q = |s|·(|x||A|ᵀ)|B|ᵀ, c = ‖|W| + |s||B||A|‖ / ‖V‖
    (the norm's condition number, ≥ 1) and k = in + r + 5 roundings on the longest chain
    (``refimpl.bounds.dora_forward_depth`` counts them; Higham §3.1):

        |ŷ − y| ≤ γ_k · [ (1 + |f − 1| + c|f|) P + (1 + c)|f| Q + (1 + |f − 1|)|b| ]

    It covers PEFT's order of evaluation (base, minus bias, (f − 1)·base + f·s·lora, plus
    base) and the direct f ⊙ (x Vᵀ) + b.
    """
    ops = linear_operands(x, W, A, B, scaling, bias=bias, fan_in_fan_out=fan_in_fan_out)
    m_arr = _magnitude(m, ops.W.shape[0])
    _nonzero_norm(_row_norm(_combined(ops.W, ops.A, ops.B, ops.scaling)))
    return bounds.dora_forward(ops.x, ops.W, ops.A, ops.B, m_arr, ops.scaling, dtype, bias=ops.bias)


@precision._overflow_checked
def backward_error_bound(
    x: npt.ArrayLike,
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    m: npt.ArrayLike,
    grad_y: npt.ArrayLike,
    scaling: float,
    dtype: Any = "float64",
    *,
    mode: str = "detached",
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> DoraGrads:
    """Elementwise bounds on the errors of ``backward``'s formulas evaluated in ``dtype`` (inputs exact).

    Each gradient is bounded by γ_k times its formula evaluated on absolute values, with every
    1/n carrying the norm's condition number c = ‖|W| + |s||B||A|‖ / ‖V‖ and
    k = N + in + out + r + 20 (the longest chain of dot products and elementwise steps;
    ``refimpl.bounds.dora_backward``).
    """
    ops = linear_operands(
        x, W, A, B, scaling, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    out_f, in_f = ops.W.shape
    m_arr = _magnitude(m, out_f)
    g = _checks.float_array(grad_y, "grad_y", ndim=ops.x.ndim)
    _checks.check_shape(g, "grad_y", (*ops.x.shape[:-1], out_f))
    mode = _checks.choice(mode, "mode", BACKWARD_MODES)
    x_in = ops.x if ops.keep is None else ops.x * ops.keep
    _nonzero_norm(_row_norm(_combined(ops.W, ops.A, ops.B, ops.scaling)))
    keep = None if ops.keep is None else ops.keep.reshape(-1, in_f)
    b = bounds.dora_backward(
        x_in.reshape(-1, in_f), ops.W, ops.A, ops.B, m_arr, g.reshape(-1, out_f), ops.scaling, dtype, mode, keep
    )
    return DoraGrads(dx=b.dx.reshape(ops.x.shape), dA=b.dA, dB=b.dB, dm=b.dm)
