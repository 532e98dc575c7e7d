"""Many LoRA adapters in one batch on the CPU, in the segment form (SGMV, Punica; S-LoRA's MBGMM).

    y_t = x_t Wᵀ + b + s_i · (x_t A_iᵀ) B_iᵀ,     i = adapter_index[t]  (−1: no adapter)

The base GEMM x Wᵀ runs once over all T tokens (BLAS). The tokens are then grouped by adapter with a
stable counting sort (``_segments``, numba), so that each adapter's tokens form one contiguous segment
of the permutation; per segment the rows are gathered, the rank-r_i branch is two small GEMMs
s_i·(x_seg A_iᵀ) B_iᵀ, and the result is scattered back and added into y (``_scatter_add``, numba).
Adapters no token uses cost nothing; tokens with index −1 get the base layer only. float64 throughout,
as the reference; the checks are the reference's (``refimpl._linear_operands.batched_operands``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import njit

from refimpl._linear_operands import batched_operands


@njit(cache=True, nogil=True)
def _segments(index, n_adapters):
    """(order, starts): tokens stably sorted by adapter; adapter i's tokens are order[starts[i]:starts[i + 1]].

    Tokens with index −1 are left out (they need no branch)."""
    counts = np.zeros(n_adapters, dtype=np.int64)
    for t in range(index.shape[0]):
        if index[t] >= 0:
            counts[index[t]] += 1
    starts = np.zeros(n_adapters + 1, dtype=np.int64)
    for i in range(n_adapters):
        starts[i + 1] = starts[i] + counts[i]
    order = np.empty(starts[n_adapters], dtype=np.int64)
    fill = starts[:n_adapters].copy()
    for t in range(index.shape[0]):
        i = index[t]
        if i >= 0:
            order[fill[i]] = t
            fill[i] += 1
    return order, starts


@njit(cache=True, nogil=True)
def _gather(x, rows, out):
    """out[k] = x[rows[k]] (a segment's tokens, contiguous)."""
    for k in range(rows.shape[0]):
        for j in range(x.shape[1]):
            out[k, j] = x[rows[k], j]


@njit(cache=True, nogil=True)
def _scatter_add(y, rows, d):
    """y[rows[k]] += d[k] (rows are distinct: each token belongs to one segment)."""
    for k in range(rows.shape[0]):
        for j in range(y.shape[1]):
            y[rows[k], j] += d[k, j]


def forward_batched(
    x: Any,
    W: Any,
    adapters: Sequence[tuple[Any, Any, float]],
    adapter_index: Any,
    *,
    bias: Any = None,
    fan_in_fan_out: bool = False,
) -> np.ndarray:
    """``refimpl.lora.forward_batched`` in the segment form: one base GEMM, then per adapter a gather of its
    tokens, s_i·(x_seg A_iᵀ) B_iᵀ and a scatter-add into y."""
    ops = batched_operands(x, W, adapters, adapter_index, bias=bias, fan_in_fan_out=fan_in_fan_out)
    x2 = np.ascontiguousarray(ops.x)
    y = np.ascontiguousarray(x2 @ ops.W.T)
    if ops.bias is not None:
        y += ops.bias
    order, starts = _segments(ops.adapter_index, len(ops.adapters))
    for i, ad in enumerate(ops.adapters):
        rows = order[starts[i] : starts[i + 1]]
        if rows.size == 0:  # an adapter no token uses
            continue
        xs = np.empty((rows.size, x2.shape[1]))
        _gather(x2, rows, xs)
        h = xs @ ad.A.T
        h *= ad.scaling
        _scatter_add(y, rows, np.ascontiguousarray(h @ ad.B.T))
    return y
