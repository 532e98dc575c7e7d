"""LoRA forward and backward on the CPU (Hu et al. 2021, arXiv 2106.09685, eq. 3).

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ,        drop(x) = x ⊙ mask / (1 − p)

The matmuls are BLAS (float64, as the reference); what this module saves is traffic: the
rank-r branch is accumulated into the base output in place (``dgemm`` with β = 1), the bias is
added in place, the dropout scale 1/(1 − p) and s are folded into the (m, r) intermediate, and the
mask is applied by a numba kernel that writes x ⊙ mask once. The reference forms x Wᵀ, then
y + b, then s·(…)ᵀ and their sum: three (m, out) temporaries, here none.
Backward likewise accumulates dx = g W + (s·gB) A ⊙ mask/(1 − p) in place.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit
from scipy.linalg import blas

from refimpl import _checks
from refimpl.kernels.numba_cpu._parallel import parallel_ranges
from refimpl.lora import LoraGrads


@njit(cache=True, nogil=True)
def _masked_rows(x, mask, out, lo, hi):
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            out[i, j] = x[i, j] * mask[i, j]


def _masked(x, mask, out):
    """out = x ⊙ mask (the keep mask as 0/1 float64), rows split over threads."""
    parallel_ranges(_masked_rows, x.shape[0], x, mask, out)


def _matrix(value: Any, name: str, ndim: Any = 2) -> np.ndarray:
    return _checks.float_array(value, name, ndim=ndim)


def _mask(dropout_mask: Any, dropout_p: Any, shape: tuple[int, ...]) -> tuple[np.ndarray | None, float]:
    return _checks.keep_mask(dropout_mask, dropout_p, shape)


def _accumulate(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float) -> None:
    """c += alpha · a bᵀ in place (c C-contiguous (m, n), a (m, k), b (n, k)): cᵀ += alpha · b aᵀ."""
    blas.dgemm(alpha, b, a, beta=1.0, c=c.T, trans_b=True, overwrite_c=True)


def lora_branch_add(y: np.ndarray, x: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float,
                    mask: np.ndarray | None, dropout_p: float) -> None:
    """y += s · (drop(x) Aᵀ) Bᵀ in place; y (..., out) C-contiguous float64, x (..., in)."""
    in_f = A.shape[1]
    x2 = x.reshape(-1, in_f)
    if mask is not None:
        xd = np.empty_like(x2)
        _masked(np.ascontiguousarray(x2), np.ascontiguousarray(mask.reshape(-1, in_f), dtype=np.float64), xd)
        x2 = xd
    h = x2 @ A.T
    h *= scaling / (1.0 - dropout_p) if mask is not None else scaling
    _accumulate(y.reshape(-1, B.shape[0]), h, B, 1.0)


def _layer(x: Any, W: Any, A: Any, B: Any, fan_in_fan_out: Any) -> tuple[np.ndarray, ...]:
    w = _matrix(W, "W")
    if _checks.boolean(fan_in_fan_out, "fan_in_fan_out"):
        w = w.T
    out_f, in_f = w.shape
    a, b = _matrix(A, "A"), _matrix(B, "B")
    _checks.check_shape(a, "A", (None, in_f))
    _checks.check_shape(b, "B", (out_f, a.shape[0]))
    if a.shape[0] > min(in_f, out_f):
        raise ValueError(f"A: rank r = {a.shape[0]} must be at most min(in, out) = {min(in_f, out_f)}")
    xx = _checks.float_array(x, "x", ndim=range(1, 33))
    _checks.check_shape(xx, "x", (*xx.shape[:-1], in_f))
    return xx, w, a, b


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
    xx, w, a, b = _layer(x, W, A, B, fan_in_fan_out)
    s = _checks.real(scaling, "scaling")
    mask, p = _mask(dropout_mask, dropout_p, xx.shape)
    out_f, in_f = w.shape
    y = np.matmul(xx.reshape(-1, in_f), w.T)
    if bias is not None:
        bb = _checks.float_array(bias, "bias", ndim=1)
        _checks.check_shape(bb, "bias", (out_f,))
        y += bb
    lora_branch_add(y, xx, a, b, s, mask, p)
    return y.reshape(*xx.shape[:-1], out_f)


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
    fifo = _checks.boolean(fan_in_fan_out, "fan_in_fan_out")
    xx, w, a, b = _layer(x, W, A, B, fifo)
    out_f, in_f = w.shape
    g = _checks.float_array(grad_y, "grad_y", ndim=xx.ndim)
    _checks.check_shape(g, "grad_y", (*xx.shape[:-1], out_f))
    s = _checks.real(scaling, "scaling")
    mask, p = _mask(dropout_mask, dropout_p, xx.shape)
    x2 = xx.reshape(-1, in_f)
    g2 = np.ascontiguousarray(g.reshape(-1, out_f))
    xd = x2
    keep = None
    if mask is not None:
        keep = mask.reshape(-1, in_f) / (1.0 - p)
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
    if _checks.boolean(need_dW, "need_dW"):
        dW = g2.T @ x2
        dW = dW.T if fifo else dW
    dbias = g2.sum(axis=0) if _checks.boolean(need_dbias, "need_dbias") else None
    return LoraGrads(dx=dx.reshape(xx.shape), dA=dA, dB=dB, dW=dW, dbias=dbias)
