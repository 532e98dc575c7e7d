"""LoRA forward and backward on the CPU (Hu et al. 2021, arXiv 2106.09685, eq. 3).

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ,        drop(x) = x ⊙ mask / (1 − p)

The matmuls are BLAS (float64, as the reference); what this module saves is traffic: the
rank-r branch is accumulated into the base output in place (``dgemm`` with β = 1), the bias is
added in place, s is folded into the (m, r) intermediate, and the keep factor mask / (1 − p)
(``refimpl._linear_operands.keep_factor``, the reference's) is applied by a numba kernel that
writes x ⊙ keep once. The reference forms x Wᵀ, then y + b, then s·(…)ᵀ and their sum: three
(m, out) temporaries, here none. Backward likewise accumulates dx = g W + (s·gB) A ⊙ keep in place.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit
from scipy.linalg import blas

from refimpl import _checks
from refimpl._linear_operands import linear_operands
from refimpl.kernels.numba_cpu._parallel import parallel_ranges
from refimpl.lora import LoraGrads


@njit(cache=True, nogil=True)
def _masked_rows(x, mask, out, lo, hi):
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            out[i, j] = x[i, j] * mask[i, j]


def _masked(x, mask, out):
    """out = x ⊙ keep (the keep factor mask / (1 − p), float64), rows split over threads."""
    parallel_ranges(_masked_rows, x.shape[0], x, mask, out)


def _accumulate(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float) -> None:
    """c += alpha · a bᵀ in place (c C-contiguous (m, n), a (m, k), b (n, k)): cᵀ += alpha · b aᵀ."""
    blas.dgemm(alpha, b, a, beta=1.0, c=c.T, trans_b=True, overwrite_c=True)


def lora_branch_add(
    y: np.ndarray, x: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float, keep: np.ndarray | None
) -> None:
    """y += s · (drop(x) Aᵀ) Bᵀ in place, drop(x) = x ⊙ keep (keep = mask / (1 − p), or None: no dropout);
    y (..., out) C-contiguous float64, x (..., in)."""
    in_f = A.shape[1]
    x2 = x.reshape(-1, in_f)
    if keep is not None:
        xd = np.empty_like(x2)
        _masked(np.ascontiguousarray(x2), np.ascontiguousarray(keep.reshape(-1, in_f), dtype=np.float64), xd)
        x2 = xd
    h = x2 @ A.T
    h *= scaling
    _accumulate(y.reshape(-1, B.shape[0]), h, B, 1.0)


def forward(
    x: Any,
    W: Any,
    A: Any,
    B: Any,
    scaling: float,
    *,
    bias: Any = None,
    dropout_mask: Any = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> np.ndarray:
    """``refimpl.lora.forward``: y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ, float64, no (m, out) temporaries."""
    ops = linear_operands(
        x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    y = np.matmul(ops.x.reshape(-1, ops.in_features), ops.W.T)
    if ops.bias is not None:
        y += ops.bias
    lora_branch_add(y, ops.x, ops.A, ops.B, ops.scaling, ops.keep)
    return y.reshape(*ops.x.shape[:-1], ops.out_features)


def backward(
    x: Any,
    W: Any,
    A: Any,
    B: Any,
    grad_y: Any,
    scaling: float,
    *,
    dropout_mask: Any = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    need_dW: bool = False,
    need_dbias: bool = False,
) -> LoraGrads:
    """``refimpl.lora.backward`` (same formulas), with dx accumulated in place:

    h = x̃ Aᵀ,  gB = s · g B,  ∂B = s · gᵀ h,  ∂A = gBᵀ x̃,  ∂x = g W + (gB A) ⊙ mask/(1 − p)
    """
    ops = linear_operands(
        x, W, A, B, scaling, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    w, a, b, s = ops.W, ops.A, ops.B, ops.scaling
    out_f, in_f = w.shape
    g = _checks.float_array(grad_y, "grad_y", ndim=ops.x.ndim)
    _checks.check_shape(g, "grad_y", (*ops.x.shape[:-1], out_f))
    want_dW, want_dbias = _checks.boolean(need_dW, "need_dW"), _checks.boolean(need_dbias, "need_dbias")
    x2 = ops.x.reshape(-1, in_f)
    g2 = np.ascontiguousarray(g.reshape(-1, out_f))
    xd = x2
    keep = None
    if ops.keep is not None:
        keep = ops.keep.reshape(-1, in_f)
        xd = np.empty_like(x2)
        _masked(np.ascontiguousarray(x2), np.ascontiguousarray(keep), xd)
    h = xd @ a.T
    gb = g2 @ b
    gb *= s
    dB = g2.T @ h
    dB *= s
    dA = gb.T @ xd
    dx = g2 @ w
    if keep is None:
        _accumulate(dx, gb, np.ascontiguousarray(a.T), 1.0)
    else:
        lora_dx = gb @ a
        lora_dx *= keep
        dx += lora_dx
    dW = None
    if want_dW:
        dW = g2.T @ x2
        dW = dW.T if ops.fan_in_fan_out else dW
    dbias = g2.sum(axis=0) if want_dbias else None
    return LoraGrads(dx=dx.reshape(ops.x.shape), dA=dA, dB=dB, dW=dW, dbias=dbias)
