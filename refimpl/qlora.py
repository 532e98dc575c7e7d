"""QLoRA: a LoRA layer over a 4-bit quantized base weight (Dettmers et al., arXiv 2305.14314, eq. 5).

    Y = X · doubleDequant(c1, c2, W_NF4)ᵀ + b + s · (drop(X) Aᵀ) Bᵀ

The base weight W (out, in) is stored as packed 4-bit codes and a ``QuantState``
(refimpl.quant); dequantization is exact (float32 products rounded to the state's
dtype), after which the reference computes in float64 through ``refimpl.lora.forward``.
``forward_error_bound`` gives the elementwise bound for an implementation that computes
the two matmuls in a lower precision (bitsandbytes ``matmul_4bit`` + PEFT's 4-bit LoRA layer).
``backward`` gives ∂L/∂X, ∂L/∂A and ∂L/∂B (QLoRA §3: the 4-bit weight is dequantized for the forward
and backward pass, and only the LoRA parameters get weight gradients; ∂L/∂X passes through the dequantized
weight). spec/nf4.md §13–§13.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, _linear_operands, bounds, lora, precision
from refimpl.quant import QuantState, dequantize_4bit

# ------------------------------------------------------------------------- core: the formulas (spec/nf4.md §13.1)


def _backward(
    x: np.ndarray, W_hat: np.ndarray, A: np.ndarray, B: np.ndarray, g: np.ndarray, s: float, keep: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(∂L/∂x, ∂L/∂A, ∂L/∂B) for x (N, in), g = ∂L/∂y (N, out), keep (N, in) or None: LoRA's backward
    (spec/lora.md §4) with the dequantized weight Ŵ as the frozen base (QLoRA §3), so ∂L/∂x = g Ŵ + ….
    The weight's own gradient gᵀ x is never formed: the 4-bit weight is frozen."""
    return lora._backward(x, W_hat, A, B, g, s, keep)  # the same formulas; W = Ŵ


def dequantized_weight(
    packed: npt.ArrayLike, state: QuantState, *, profile: str | None = None
) -> npt.NDArray[np.float64]:
    """The base weight W = dequantize_4bit(packed, state) as float64, shape (out, in)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a refimpl.quant.QuantState, got {_checks.describe(state)}")
    if len(state.shape) != 2:
        raise ValueError(f"state: expected a 2-D (out_features, in_features) weight, got shape {state.shape}")
    return dequantize_4bit(packed, state, profile=profile).astype(np.float64)


def forward(
    x: npt.ArrayLike,
    packed: npt.ArrayLike,
    state: QuantState,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    scaling: float,
    bias: npt.ArrayLike | None = None,
    *,
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    profile: str | None = None,
) -> npt.NDArray[np.float64]:
    """y = x · dequant(W)ᵀ + b + s · (drop(x) Aᵀ) Bᵀ in float64 (QLoRA eq. 5).

    x: (..., in); packed/state: the 4-bit base weight of shape (out, in); A: (r, in); B: (out, r).
    Inputs may be float16, bfloat16, float32 or float64; they are used exactly (converted to float64).
    ``profile`` only matters for the sign of FP4's zero (defaults to the state's).
    """
    W = dequantized_weight(packed, state, profile=profile)
    return lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p)


@dataclass(frozen=True)
class QLoraGrads:
    """Gradients of a scalar loss through one QLoRA layer: the input and the adapter (no base-weight gradient:
    the 4-bit weight is frozen); ``dbias`` only when requested."""

    dx: np.ndarray
    dA: np.ndarray
    dB: np.ndarray
    dbias: np.ndarray | None = None


@precision._overflow_checked
def backward(
    x: npt.ArrayLike,
    packed: npt.ArrayLike,
    state: QuantState,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    grad_y: npt.ArrayLike,
    scaling: float,
    *,
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    need_dbias: bool = False,
    profile: str | None = None,
) -> QLoraGrads:
    """Reverse mode of ``forward`` (QLoRA §3). With Ŵ = dequantize_4bit(packed, state), x̃ = drop(x),
    h = x̃ Aᵀ and g = ∂L/∂y (..., out):

        ∂L/∂B = s · gᵀ h            (out, r)
        ∂L/∂A = s · (g B)ᵀ x̃        (r, in)
        ∂L/∂x = g Ŵ + (s · g B A) ⊙ mask / (1 − p)
        ∂L/∂b = Σ g                  (with ``need_dbias``)

    Ŵ is frozen: no gradient flows into the codes or the block scales. Sums run over every leading axis of x.
    Arguments as ``forward`` (no bias: it does not enter a gradient), with ``grad_y`` of shape (..., out).
    """
    W_hat = dequantized_weight(packed, state, profile=profile)
    out_f, in_f = W_hat.shape
    ops = _linear_operands.adapter_operands(
        x, A, B, scaling, in_features=in_f, out_features=out_f, dropout_mask=dropout_mask, dropout_p=dropout_p
    )
    g = _checks.float_array(grad_y, "grad_y", ndim=ops.x.ndim)
    _checks.check_shape(g, "grad_y", (*ops.x.shape[:-1], out_f))
    want_dbias = _checks.boolean(need_dbias, "need_dbias")
    x2, g2 = ops.x.reshape(-1, in_f), g.reshape(-1, out_f)  # sums over every leading axis
    keep2 = None if ops.keep is None else ops.keep.reshape(x2.shape)
    dx, dA, dB = _backward(x2, W_hat, ops.A, ops.B, g2, ops.scaling, keep2)
    dbias = g2.sum(axis=0) if want_dbias else None
    return QLoraGrads(dx=dx.reshape(ops.x.shape), dA=dA, dB=dB, dbias=dbias)


@precision._overflow_checked
def forward_error_bound(
    x: npt.ArrayLike,
    packed: npt.ArrayLike,
    state: QuantState,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    scaling: float,
    bias: npt.ArrayLike | None = None,
    *,
    dtype: Any = "float32",
    accumulate: Any = None,
    profile: str | None = None,
) -> npt.NDArray[np.float64]:
    """Elementwise bound on |ŷ − y| for ŷ computed the way PEFT's 4-bit LoRA layer does:
    base = fl(x Wᵀ + b) (K = in products), lora = fl(fl(fl(x Aᵀ) Bᵀ) · s), ŷ = fl(base + lora),
    with W the exactly dequantized weight, sums accumulated in ``accumulate`` (default: ``dtype``)
    and each stored result rounded to ``dtype`` (unit roundoff u; Higham §3.1; ``refimpl.bounds.qlora_forward``):

        |ŷ − y| ≤ [(1+γ_{K+1})(1+u)² − 1] · (|x| |W|ᵀ + |b|)
                 + [(1+γ_K)(1+γ_r)(1+u)⁴ − 1] · |s| · (|x| |A|ᵀ) |B|ᵀ,   γ_n of ``accumulate``.
    """
    W = dequantized_weight(packed, state, profile=profile)
    out_f, K = W.shape
    ax = np.abs(_checks.float_array(x, "x"))
    if ax.ndim == 0:
        raise ValueError(f"x: expected an array of shape (..., {K}), got a 0-d array")
    _checks.check_shape(ax, "x", (*ax.shape[:-1], K))
    aA = np.abs(_checks.float_array(A, "A", ndim=2))
    _checks.check_shape(aA, "A", (None, K))
    r = aA.shape[0]
    aB = np.abs(_checks.float_array(B, "B", ndim=2))
    _checks.check_shape(aB, "B", (out_f, r))
    b_arr = None
    if bias is not None:
        b_arr = _checks.float_array(bias, "bias", ndim=1)
        _checks.check_shape(b_arr, "bias", (out_f,))
    s = _checks.real(scaling, "scaling")
    return bounds.qlora_forward(ax, W, aA, aB, s, b_arr, dtype, accumulate)
