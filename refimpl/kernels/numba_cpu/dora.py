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
from refimpl._linear_operands import linear_layer, linear_operands
from refimpl.kernels.numba_cpu._parallel import parallel_ranges
from refimpl.kernels.numba_cpu.lora import lora_branch_add

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


def weight_norm(
    W: Any, A: Any, B: Any, scaling: float, *, fan_in_fan_out: bool = False, embedding: bool = False
) -> np.ndarray:
    """‖W + s·B A‖ per output row (shape (out,)) without forming W + s·B A.

    ``embedding=True`` (E of shape (V, d), A (r, V), B (d, r)): the norm of each column of E + ΔE
    across the vocabulary, shape (d,), as the reference. ConvNd weights (out, in, *k) with A (r, in, *k)
    and B (out, r, 1, …): the norm over every axis but the first, on the (out, in·∏k) reshapes.
    """
    # the reference's own operand checks and (out, in) reshapes of Linear, Embedding and ConvNd weights
    layer = linear_layer(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding, allow_conv=True)
    return _row_norms(layer.W, layer.A, layer.B, layer.scaling)


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
    ops = linear_operands(
        x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    w, a, b, s = ops.W, ops.A, ops.B, ops.scaling
    out_f, in_f = w.shape
    m_arr = _checks.float_array(m, "m", ndim=1)
    _checks.check_shape(m_arr, "m", (out_f,))
    norm = _row_norms(w, a, b, s)
    zero = np.flatnonzero(norm == 0)
    if zero.size:
        raise ValueError(
            f"W + s·B·A: row norm is zero at output row(s) {zero[:8].tolist()}; DoRA's direction "
            "V/‖V‖ is undefined there (see spec/dora.md, special values)"
        )
    f = m_arr / norm
    x2 = ops.x.reshape(-1, in_f)
    y = np.matmul(x2, w.T)
    if ops.keep is None:
        lora_branch_add(y, x2, a, b, s, None)
        y *= f
    else:
        xd = x2 * ops.keep.reshape(-1, in_f)
        u = np.matmul(xd, w.T)
        y -= u
        lora_branch_add(u, xd, a, b, s, None)
        u *= f
        y += u
    if ops.bias is not None:
        y += ops.bias
    return y.reshape(*ops.x.shape[:-1], out_f)
