"""DoRA forward on the CPU (Liu et al. 2024, arXiv 2402.09353, eq. 5).

    f = m / ‖W + s·B A‖_row
    eval:  y = f ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ) + b
    train: y = x Wᵀ + b + (f − 1) ⊙ (x_d Wᵀ) + f ⊙ s · (x_d Aᵀ) Bᵀ,   x_d = x ⊙ mask / (1 − p)

The reference forms V = W + s·B A, an (out, in) temporary, and multiplies x by it. Here the
row norms are computed in tiles of rows (B_tile A is (tile, in)) by a numba kernel that fuses
W + s·T, the square and the row sum, so the extra memory is one tile; the output uses the LoRA
kernel's in-place rank-r update (x (W + sBA)ᵀ = x Wᵀ + s (x Aᵀ) Bᵀ).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from refimpl import _checks
from refimpl import dora as reference_dora
from refimpl.kernels.numba_cpu._parallel import parallel_ranges
from refimpl.kernels.numba_cpu.lora import _layer, _mask, lora_branch_add

_TILE = 256


@njit(cache=True, nogil=True, fastmath=False)
def _row_norms_range(w, t, s, out, lo, hi):
    for i in range(lo, hi):
        acc = 0.0
        for j in range(w.shape[1]):
            v = w[i, j] + s * t[i, j]
            acc += v * v
        out[i] = np.sqrt(acc)


def _tile_row_norms(w, t, s, out):
    """out[i] = ‖w[i] + s·t[i]‖₂ for each row i of a tile, rows split over threads."""
    parallel_ranges(_row_norms_range, w.shape[0], w, t, s, out)


def weight_norm(W: Any, A: Any, B: Any, scaling: float, *, fan_in_fan_out: bool = False,
                embedding: bool = False) -> np.ndarray:
    """‖W + s·B A‖ per output row (shape (out,)) without forming W + s·B A.

    ``embedding=True`` (E of shape (V, d), A (r, V), B (d, r)): the norm of each column of E + ΔE
    across the vocabulary, shape (d,), as the reference. ConvNd weights (out, in, *k) with A (r, in, *k)
    and B (out, r, 1, …): the norm over every axis but the first, on the (out, in·∏k) reshapes.
    """
    # the reference's own operand checks and (out, in) reshapes of Linear, Embedding and ConvNd weights
    layer = reference_dora._layer(W, A, B, scaling, fan_in_fan_out, embedding, allow_conv=True)
    return _row_norms(layer.w, layer.a, layer.b, layer.s)


def _row_norms(w: np.ndarray, a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    out = np.empty(w.shape[0])
    for lo in range(0, w.shape[0], _TILE):
        hi = min(lo + _TILE, w.shape[0])
        _tile_row_norms(np.ascontiguousarray(w[lo:hi]), b[lo:hi] @ a, s, out[lo:hi])
    return out


def forward(
    x: Any,
    W: Any,
    A: Any,
    B: Any,
    m: Any,
    scaling: float,
    *,
    bias: Any = None,
    dropout_mask: Any = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> np.ndarray:
    """``refimpl.dora.forward`` (eval form without a mask, PEFT's train form with one), float64."""
    xx, w, a, b = _layer(x, W, A, B, fan_in_fan_out)
    out_f, in_f = w.shape
    if a.shape[0] < 1:
        raise ValueError(f"A: rank r = {a.shape[0]} must be in [1, min(out, in) = {min(w.shape)}]")
    mm = _checks.float_array(m, "m", ndim=1)
    _checks.check_shape(mm, "m", (out_f,))
    s = _checks.real(scaling, "scaling")
    bb = None
    if bias is not None:
        bb = _checks.float_array(bias, "bias", ndim=1)
        _checks.check_shape(bb, "bias", (out_f,))
    mask, p = _mask(dropout_mask, dropout_p, xx.shape)
    norm = _row_norms(w, a, b, s)
    zero = np.flatnonzero(norm == 0)
    if zero.size:
        raise ValueError(f"W + s·B·A: row norm is zero at output row(s) {zero[:8].tolist()}; DoRA's direction "
                         "V/‖V‖ is undefined there (see spec/dora.md, special values)")
    f = mm / norm
    x2 = xx.reshape(-1, in_f)
    y = np.matmul(x2, w.T)
    if mask is None:
        lora_branch_add(y, x2, a, b, s, None, 0.0)
        y *= f
    else:
        xd = x2 * (mask.reshape(-1, in_f) / (1.0 - p))
        u = np.matmul(xd, w.T)
        y -= u
        lora_branch_add(u, xd, a, b, s, None, 0.0)
        u *= f
        y += u
    if bb is not None:
        y += bb
    return y.reshape(*xx.shape[:-1], out_f)
