"""QLoRA forward: a LoRA layer over a 4-bit quantized base weight (Dettmers et al., arXiv 2305.14314, eq. 5).

    Y = X · doubleDequant(c1, c2, W_NF4)ᵀ + b + s · (drop(X) Aᵀ) Bᵀ

The base weight W (out, in) is stored as packed 4-bit codes and a ``QuantState``
(refimpl.quant); dequantization is exact (float32 products rounded to the state's
dtype), after which the reference computes in float64 through ``refimpl.lora.forward``.
``forward_error_bound`` gives the elementwise bound for an implementation that computes
the two matmuls in a lower precision (bitsandbytes ``matmul_4bit`` + PEFT's 4-bit LoRA layer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, bounds, lora, precision
from refimpl.quant import QuantState, dequantize_4bit


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
