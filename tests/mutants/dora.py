"""One-defect mutants of refimpl.dora: each is the reference op with one bug a DoRA-kernel author could ship.

Written from the causes (``tests/mutants/__init__.py``): the norm over the wrong axis (the planted bug of
tests/test_conformance_planted.py) or of the untransposed Conv1D weight; an ε added to the norm; the bias scaled by
m/‖V‖ (torchtune's DoRA bug); dropout on the base term of the train form; the norm not detached in backward (or the
full mode's correction dropped); dm without its 1/‖V‖; the merge normed against the merged weight instead of the
unmerged base (PEFT #3608); unmerge in the wrong order; a sum of squares that drops the columns after the last
multiple of 16; rank components beyond min(out, in) lost; a path above 16 rows that forgets s in the norm; the
storage dtype ignored; the embedding norm across d instead of the vocabulary; sequential adapters normed against the
running weight; grouped-conv parameters counted without the groups. Each ``fn`` takes the reference's keyword
arguments.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import refimpl.dora as D
from refimpl import lora, precision
from tests.mutants import Mutant


def _linear(W: Any, A: Any, B: Any, scaling: Any, fan_in_fan_out: bool) -> tuple[np.ndarray, ...]:
    w = np.asarray(W, dtype=np.float64)
    w = w.T if fan_in_fan_out else w
    a, b = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    return w, a, b, float(scaling)


def _forward(
    x, W, A, B, m, scaling, *, bias=None, dropout_mask=None, dropout_p=0.0, fan_in_fan_out=False, defect: str = ""
) -> np.ndarray:
    """dora.forward with one optional defect (the reference's validation runs first)."""
    D.forward(
        x, W, A, B, m, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    w, a, b, s = _linear(W, A, B, scaling, fan_in_fan_out)
    if defect == "rank_clipped":  # buffers sized by min(out, in): rank components beyond it lost
        k = min(w.shape)
        a, b = a[:k], b[:, :k]
    x_arr = np.asarray(x, dtype=np.float64)
    m_arr = np.asarray(m, dtype=np.float64)
    rows = int(np.prod(x_arr.shape[:-1]))
    s_norm = 1.0 if (defect == "big_batch_norm_unscaled" and rows > 16) else s
    v_norm = w + s_norm * (b @ a)
    if defect == "eps":
        n = np.sqrt(np.sum(v_norm**2, axis=1) + 1e-12)  # ε inside the square root
    elif defect == "tail16" and w.shape[1] > 16:
        k = w.shape[1] // 16 * 16
        n = np.linalg.norm(v_norm[:, :k], axis=1)  # the vector loop's remainder columns never squared
    else:
        n = np.linalg.norm(v_norm, axis=1)
    f = m_arr / n
    v = w + s * (b @ a)
    bias_arr = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    if dropout_mask is None:
        y = x_arr @ v.T
        return f * (y + bias_arr) if defect == "bias_scaled" else f * y + bias_arr
    xd = x_arr * np.asarray(dropout_mask, dtype=np.float64) / (1.0 - dropout_p)
    base_in = xd if defect == "dropout_on_base" else x_arr
    lora_y = s * ((xd @ a.T) @ b.T)
    y = base_in @ w.T + (f - 1.0) * (xd @ w.T) + f * lora_y
    return f * (y + bias_arr) if defect == "bias_scaled" else y + bias_arr


def _fwd(defect: str):
    def fn(**kw: Any) -> np.ndarray:
        return _forward(**kw, defect=defect)

    return fn


def _planted_column_norm(x, W, A, B, m, scaling, *, bias=None, dropout_mask=None, dropout_p=0.0, fan_in_fan_out=False):
    """The planted bug of tests/test_conformance_planted.py, verbatim: a per-column norm, eval form only."""
    w = np.asarray(W).T if fan_in_fan_out else np.asarray(W)
    v = w + scaling * (np.asarray(B) @ np.asarray(A))
    col = np.linalg.norm(v, axis=0, keepdims=True)
    direction = v / np.where(col == 0, 1.0, col)
    y = np.asarray(m) * (np.asarray(x) @ direction.T)
    return y if bias is None else y + bias


def _forward_fifo_norm_untransposed(x, W, A, B, m, scaling, *, fan_in_fan_out=False, **kw):
    """Conv1D: the norm taken over axis 1 of W as stored, (in, out), before transposing."""
    y = D.forward(x, W, A, B, m, scaling, fan_in_fan_out=fan_in_fan_out, **kw)
    if not fan_in_fan_out:
        return y
    w = np.asarray(W, dtype=np.float64)
    if w.shape[0] != w.shape[1]:
        raise ValueError("norm axis does not match the output width")
    v, _, _, _ = _linear(W, A, B, scaling, True)
    n_true = np.linalg.norm(v, axis=1)
    n_wrong = np.linalg.norm(v, axis=0)
    bias_arr = 0.0 if kw.get("bias") is None else np.asarray(kw["bias"], dtype=np.float64)
    return (y - bias_arr) * n_true / n_wrong + bias_arr


# ---------------------------------------------------------------------------- norms, directions, magnitudes


def _weight_norm_embedding_ignored(W, A, B, scaling, *, fan_in_fan_out=False, embedding=False):
    return D.weight_norm(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out)  # E (V, d) read as a Linear (out, in)


def _weight_norm_tail16(W, A, B, scaling, *, fan_in_fan_out=False, embedding=False):
    n = D.weight_norm(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding)
    w = np.asarray(W, dtype=np.float64)
    if w.ndim > 2:
        w, a, b = (
            w.reshape(w.shape[0], -1),
            np.asarray(A).reshape(np.shape(A)[0], -1),
            np.asarray(B).reshape(np.shape(B)[0], -1),
        )
    else:
        w = w.T if (fan_in_fan_out or embedding) else w
        a, b = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    if w.shape[1] <= 16:
        return n
    k = w.shape[1] // 16 * 16
    v = w + float(scaling) * (b @ a)
    return np.linalg.norm(v[:, :k], axis=1)


def _direction_layout(W, A, B, scaling, *, fan_in_fan_out=False, embedding=False):
    d = D.direction(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding)
    if d.ndim == 2 and (fan_in_fan_out or embedding):
        return d.T.reshape(d.shape)  # the (out, in) result not transposed back, reshaped into the caller's shape
    return d


def _direction_eps(W, A, B, scaling, *, fan_in_fan_out=False, embedding=False):
    d = D.direction(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding)
    n = D.weight_norm(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding)
    shape = [1] * d.ndim
    axis = 1 if (d.ndim == 2 and (fan_in_fan_out or embedding)) else 0
    shape[axis] = -1
    return d * (n / (n + 1e-6)).reshape(shape)  # V / (‖V‖ + ε)


def _init_magnitude_dtype_ignored(W, A, B, scaling, *, fan_in_fan_out=False, embedding=False, dtype=None):
    return D.init_magnitude(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding)


def _init_magnitude_rounds_once(W, A, B, scaling, *, fan_in_fan_out=False, embedding=False, dtype=None):
    m = D.init_magnitude(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding)
    return m if dtype is None else precision.round_to(m, dtype)  # the float64 norm rounded, not PEFT's


# ---------------------------------------------------------------------------- backward


def _backward_not_detached(x, W, A, B, m, grad_y, scaling, *, mode="detached", **kw):
    return D.backward(x, W, A, B, m, grad_y, scaling, mode="full", **kw)  # the norm differentiated always


def _backward_full_ignored(x, W, A, B, m, grad_y, scaling, *, mode="detached", **kw):
    return D.backward(x, W, A, B, m, grad_y, scaling, mode="detached", **kw)


def _backward_dm_no_norm(x, W, A, B, m, grad_y, scaling, *, fan_in_fan_out=False, **kw):
    g = D.backward(x, W, A, B, m, grad_y, scaling, fan_in_fan_out=fan_in_fan_out, **kw)
    n = D.weight_norm(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out)
    return D.DoraGrads(dx=g.dx, dA=g.dA, dB=g.dB, dm=g.dm * n)  # Σ G ⊙ P without the 1/‖V‖


def _backward_dx_eval_with_mask(x, W, A, B, m, grad_y, scaling, *, dropout_mask=None, dropout_p=0.0, **kw):
    """dx of the train form computed with the eval formula (the mask applied to dA/dB only)."""
    g = D.backward(x, W, A, B, m, grad_y, scaling, dropout_mask=dropout_mask, dropout_p=dropout_p, **kw)
    if dropout_mask is None:
        return g
    ev = D.backward(x, W, A, B, m, grad_y, scaling, **kw)
    return D.DoraGrads(dx=ev.dx, dA=g.dA, dB=g.dB, dm=g.dm)


# ---------------------------------------------------------------------------- merge, unmerge


def _merge_norm_of_merged(W, A, B, m, scaling, *, unmerged_base=None, **kw):
    return D.merge(W, A, B, m, scaling, **kw)  # the norm against W (earlier adapters merged in): PEFT #3608


def _merge_dtype_ignored(W, A, B, m, scaling, *, dtype=None, **kw):
    return D.merge(W, A, B, m, scaling, **kw)


def _merge_norm_returned_of_w(W, A, B, m, scaling, *, fan_in_fan_out=False, embedding=False, **kw):
    out = D.merge(W, A, B, m, scaling, fan_in_fan_out=fan_in_fan_out, embedding=embedding, **kw)
    wn = D.weight_norm(
        W, np.zeros_like(np.asarray(A, dtype=np.float64)), B, 0.0, fan_in_fan_out=fan_in_fan_out, embedding=embedding
    )
    return D.DoraMerge(W=out.W, weight_norm=wn)  # the cached norm of W alone, without ΔW


def _unmerge_wrong_order(W_merged, A, B, m, scaling, weight_norm, *, fan_in_fan_out=False, embedding=False, dtype=None):
    D.unmerge(W_merged, A, B, m, scaling, weight_norm, fan_in_fan_out=fan_in_fan_out, embedding=embedding)
    wm = np.asarray(W_merged, dtype=np.float64)
    delta = lora.delta(
        np.asarray(A, dtype=np.float64).reshape(np.shape(A)[0], -1),
        np.asarray(B, dtype=np.float64).reshape(np.shape(B)[0], -1),
        scaling,
    )
    f = np.asarray(m, dtype=np.float64) / np.asarray(weight_norm, dtype=np.float64)
    if wm.ndim > 2:
        out = ((wm.reshape(wm.shape[0], -1) - delta) / f[:, None]).reshape(wm.shape)
    elif fan_in_fan_out or embedding:
        out = ((wm.T - delta) / f[:, None]).T
    else:
        out = (wm - delta) / f[:, None]  # (W' − ΔW) / f instead of W'/f − ΔW
    return out if dtype is None else precision.round_to(out, dtype)


def _unmerge_dtype_ignored(W_merged, A, B, m, scaling, weight_norm, *, dtype=None, **kw):
    return D.unmerge(W_merged, A, B, m, scaling, weight_norm, **kw)


# ---------------------------------------------------------------------------- embedding, sequential, counts


def _embedding_norm_across_d(ids, E, A, B, m, scaling):
    """Each looked-up vector normalised across d (per token) instead of each column across the vocabulary."""
    D.embedding_forward(ids, E, A, B, m, scaling)
    e = np.asarray(E, dtype=np.float64)
    v = e + lora.delta(np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64), scaling).T  # (V, d)
    rows = v[np.asarray(ids)]
    return np.asarray(m, dtype=np.float64) * rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _sequential_cumulative_norm(x, W, adapters, *, bias=None, fan_in_fan_out=False):
    """Each adapter normed against the running merged weight instead of the bare base W."""
    D.forward_sequential(x, W, adapters, bias=bias, fan_in_fan_out=fan_in_fan_out)
    w = np.asarray(W, dtype=np.float64)
    w = w.T if fan_in_fan_out else w
    x_arr = np.asarray(x, dtype=np.float64)
    z = x_arr @ w.T
    running = w
    for ad in adapters:
        a, b = np.asarray(ad.A, dtype=np.float64), np.asarray(ad.B, dtype=np.float64)
        v = running + ad.scaling * (b @ a)
        f = np.asarray(ad.m, dtype=np.float64) / np.linalg.norm(v, axis=1)
        z = f * (z + ad.scaling * ((x_arr @ a.T) @ b.T))
        running = f[:, None] * v
    return z + (0.0 if bias is None else np.asarray(bias, dtype=np.float64))


def _sequential_summed_delta(x, W, adapters, *, bias=None, fan_in_fan_out=False):
    """One DoRA layer of the summed deltas with the last adapter's magnitude (not PEFT's composition)."""
    D.forward_sequential(x, W, adapters, bias=bias, fan_in_fan_out=fan_in_fan_out)
    if len(adapters) == 1:
        return D.forward_sequential(x, W, adapters, bias=bias, fan_in_fan_out=fan_in_fan_out)
    a = np.concatenate([np.asarray(ad.A, dtype=np.float64) * ad.scaling for ad in adapters])
    b = np.concatenate([np.asarray(ad.B, dtype=np.float64) for ad in adapters], axis=1)
    return D.forward(x, W, a, b, adapters[-1].m, 1.0, bias=bias, fan_in_fan_out=fan_in_fan_out)


def _param_count_groups_ignored(in_features, out_features, r, *, kernel_size=(), groups=1):
    return D.param_count(in_features, out_features, r, kernel_size=kernel_size, groups=1 if kernel_size else groups)


def _param_count_no_kernel(in_features, out_features, r, *, kernel_size=(), groups=1):
    n = D.param_count(in_features, out_features, r, kernel_size=kernel_size, groups=groups)
    return n - r * in_features * (int(np.prod(kernel_size)) - 1) if kernel_size else n  # lora_A without ∏k


MUTANTS: list[Mutant] = [
    Mutant("norm over the wrong axis (planted)", "dora.forward", "axes", _planted_column_norm),
    Mutant("epsilon inside the norm", "dora.forward", "precision", _fwd("eps")),
    Mutant("bias scaled by m/||V|| (torchtune)", "dora.forward", "scaling", _fwd("bias_scaled")),
    Mutant("train form: dropout on the base term", "dora.forward", "options", _fwd("dropout_on_base")),
    Mutant("norm drops columns after the last multiple of 16", "dora.forward", "tails", _fwd("tail16")),
    Mutant("rank clipped to min(out, in)", "dora.forward", "tails", _fwd("rank_clipped")),
    Mutant("path above 16 rows forgets s in the norm", "dora.forward", "path switch", _fwd("big_batch_norm_unscaled")),
    Mutant("Conv1D norm over the stored axis", "dora.forward", "transposition", _forward_fifo_norm_untransposed),
    Mutant("weight_norm ignores embedding", "dora.weight_norm", "options", _weight_norm_embedding_ignored),
    Mutant("weight_norm drops columns after 16", "dora.weight_norm", "tails", _weight_norm_tail16),
    Mutant("direction left in (out, in) layout", "dora.direction", "transposition", _direction_layout),
    Mutant("direction V/(||V|| + eps)", "dora.direction", "precision", _direction_eps),
    Mutant("init_magnitude ignores the storage dtype", "dora.init_magnitude", "options", _init_magnitude_dtype_ignored),
    Mutant(
        "init_magnitude rounds the float64 norm once", "dora.init_magnitude", "precision", _init_magnitude_rounds_once
    ),
    Mutant("backward: norm not detached", "dora.backward", "options", _backward_not_detached),
    Mutant("backward: full mode ignored", "dora.backward", "options", _backward_full_ignored),
    Mutant("backward: dm without 1/||V||", "dora.backward", "scaling", _backward_dm_no_norm),
    Mutant("backward: train-form dx from the eval formula", "dora.backward", "options", _backward_dx_eval_with_mask),
    Mutant("merge: norm against the merged weight (PEFT #3608)", "dora.merge", "merge rules", _merge_norm_of_merged),
    Mutant("DoRA merge: storage dtype ignored", "dora.merge", "precision", _merge_dtype_ignored),
    Mutant("merge: cached norm of W without the delta", "dora.merge", "merge rules", _merge_norm_returned_of_w),
    Mutant("unmerge: (W' - dW)/f instead of W'/f - dW", "dora.unmerge", "merge rules", _unmerge_wrong_order),
    Mutant("DoRA unmerge: storage dtype ignored", "dora.unmerge", "precision", _unmerge_dtype_ignored),
    Mutant(
        "embedding: norm across d instead of the vocabulary", "dora.embedding_forward", "axes", _embedding_norm_across_d
    ),
    Mutant(
        "sequential: norm against the running weight",
        "dora.forward_sequential",
        "merge rules",
        _sequential_cumulative_norm,
    ),
    Mutant(
        "sequential: one layer of the summed deltas", "dora.forward_sequential", "merge rules", _sequential_summed_delta
    ),
    Mutant("param_count: groups ignored", "dora.param_count", "options", _param_count_groups_ignored),
    Mutant("param_count: lora_A without the kernel", "dora.param_count", "axes", _param_count_no_kernel),
]
