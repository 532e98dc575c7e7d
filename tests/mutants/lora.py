"""One-defect mutants of refimpl.lora: each is the reference op with one bug a LoRA-kernel author could ship.

Written from the causes (``tests/mutants/__init__.py``): α instead of α/r and √r swapped with r; dropout on the base
branch or without its 1/(1 − p) rescale; fan_in_fan_out ignored or B A transposed; the bias scaled or added twice; a
vector-width remainder (columns after the last multiple of 16) dropped; a large-batch path (more than 16 rows) that
forgets the scaling; a rank buffer sized by min(in, out) (r above it is legal); float32 arithmetic behind a float64
signature; merge's safe flag ignored and unmerge subtracting B A without s; init variants with the wrong bound, std,
SVD slice or scaling; embedding LoRA with A and B's roles swapped; a dropout mask that thresholds the other way;
PEFT's target-name rule read as a substring. Each ``fn`` takes the reference's keyword arguments.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import refimpl.lora as L
from refimpl import _checks, precision
from tests.mutants import Mutant


def _layer(x: Any, W: Any, A: Any, B: Any, fan_in_fan_out: bool) -> tuple[np.ndarray, ...]:
    """x, W in (out, in) layout, A, B as float64 (the reference's validation, through lora.forward's own checks)."""
    w = np.asarray(W, dtype=np.float64)
    w = w.T if fan_in_fan_out else w
    return (np.asarray(x, dtype=np.float64), w, np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64))


def _drop(x: np.ndarray, mask: Any, p: float, *, rescale: bool = True) -> np.ndarray:
    if mask is None:
        return x
    return x * np.asarray(mask, dtype=np.float64) / ((1.0 - p) if rescale else 1.0)


def _forward(
    x, W, A, B, scaling, *, bias=None, dropout_mask=None, dropout_p=0.0, fan_in_fan_out=False, defect: str = ""
) -> np.ndarray:
    """lora.forward with one optional defect (validation is the reference's, run first)."""
    L.forward(
        x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    x_arr, w, a, b = _layer(x, W, A, B, fan_in_fan_out)
    if defect == "rank_clipped":  # the (m, r) intermediate sized by min(in, out): rank components beyond it lost
        k = min(w.shape)
        a, b = a[:k], b[:, :k]
    s = float(scaling)
    rows = int(np.prod(x_arr.shape[:-1]))
    if defect == "float32":
        x_arr, w, a, b = (t.astype(np.float32) for t in (x_arr, w, a, b))
        s = np.float32(s)
    xd = _drop(x_arr, dropout_mask, dropout_p, rescale=defect != "no_rescale")
    base_in = xd if defect == "dropout_on_base" else x_arr
    if defect == "tail16" and w.shape[1] > 16:
        k = w.shape[1] // 16 * 16  # the vector loop's remainder columns are never reduced
        y = base_in[..., :k] @ w[:, :k].T
    else:
        y = base_in @ w.T
    if defect == "big_batch_no_scaling" and rows > 16:
        s = 1.0
    lora_y = s * ((xd @ a.T) @ b.T)
    if bias is not None:
        bias_arr = np.asarray(bias, dtype=np.float64)
        if defect == "bias_scaled":
            lora_y = lora_y + s * bias_arr  # bias folded into the scaled LoRA branch as well
        y = y + bias_arr
    return (y + lora_y).astype(np.float64)


def _fwd(defect: str):
    def fn(**kw: Any) -> np.ndarray:
        return _forward(**kw, defect=defect)

    return fn


# ---------------------------------------------------------------------------- scaling


def _scaling_alpha(alpha, r, *, use_rslora=False):
    return float(alpha)  # forgot to divide by r (or √r): the planted bug


def _scaling_sqrt_swapped(alpha, r, *, use_rslora=False):
    return float(alpha) / (r if use_rslora else np.sqrt(r))  # rsLoRA's √r and LoRA's r swapped


def _scaling_rslora_ignored(alpha, r, *, use_rslora=False):
    return float(alpha) / r


# ---------------------------------------------------------------------------- delta, merge, unmerge


def _delta_transposed(A, B, scaling, *, fan_in_fan_out=False):
    d = L.delta(A, B, scaling, fan_in_fan_out=fan_in_fan_out)
    # A Bᵀ-style index slip: the (out, in) result written transposed and reshaped back into the shape
    return d.T.reshape(d.shape)


def _delta_fifo_ignored(A, B, scaling, *, fan_in_fan_out=False):
    return L.delta(A, B, scaling)


def _merge_safe_ignored(W, A, B, scaling, *, fan_in_fan_out=False, dtype=None, safe=False):
    return L.merge(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, dtype=dtype, safe=False)


def _merge_dtype_not_rounded(W, A, B, scaling, *, fan_in_fan_out=False, dtype=None, safe=False):
    return L.merge(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out)  # the storage format is ignored


def _unmerge_unscaled(W_merged, A, B, scaling, *, fan_in_fan_out=False, dtype=None):
    # subtracts B A without s (s = 1 hides it)
    return L.unmerge(W_merged, A, B, 1.0, fan_in_fan_out=fan_in_fan_out, dtype=dtype)


def _unmerge_one_rounding(W_merged, A, B, scaling, *, fan_in_fan_out=False, dtype=None):
    out = L.unmerge(W_merged, A, B, scaling, fan_in_fan_out=fan_in_fan_out)
    return out if dtype is None else precision.round_to(out, dtype)  # round(W' − ΔW): ΔW not rounded first


# ---------------------------------------------------------------------------- backward


def _backward_mask_not_on_dx(
    x,
    W,
    A,
    B,
    grad_y,
    scaling,
    *,
    dropout_mask=None,
    dropout_p=0.0,
    fan_in_fan_out=False,
    need_dW=False,
    need_dbias=False,
):
    """dx's LoRA part not multiplied by the keep mask / (1 − p)."""
    g = L.backward(
        x,
        W,
        A,
        B,
        grad_y,
        scaling,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
        fan_in_fan_out=fan_in_fan_out,
        need_dW=need_dW,
        need_dbias=need_dbias,
    )
    if dropout_mask is None:
        return g
    x_arr, w, a, b = _layer(x, W, A, B, fan_in_fan_out)
    g2 = np.asarray(grad_y, dtype=np.float64).reshape(-1, w.shape[0])
    dx = (g2 @ w + float(scaling) * (g2 @ b) @ a).reshape(x_arr.shape)
    return L.LoraGrads(dx=dx, dA=g.dA, dB=g.dB, dW=g.dW, dbias=g.dbias)


def _backward_dB_unscaled(x, W, A, B, grad_y, scaling, **kw):
    g = L.backward(x, W, A, B, grad_y, scaling, **kw)
    s = float(scaling)
    return L.LoraGrads(dx=g.dx, dA=g.dA, dB=g.dB / s if s != 0 else g.dB, dW=g.dW, dbias=g.dbias)


def _backward_dA_undropped(
    x,
    W,
    A,
    B,
    grad_y,
    scaling,
    *,
    dropout_mask=None,
    dropout_p=0.0,
    fan_in_fan_out=False,
    need_dW=False,
    need_dbias=False,
):
    """dA from x instead of the dropped x̃ (the mask applied in forward, forgotten in backward)."""
    g = L.backward(
        x,
        W,
        A,
        B,
        grad_y,
        scaling,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
        fan_in_fan_out=fan_in_fan_out,
        need_dW=need_dW,
        need_dbias=need_dbias,
    )
    x_arr, w, _, b = _layer(x, W, A, B, fan_in_fan_out)
    g2 = np.asarray(grad_y, dtype=np.float64).reshape(-1, w.shape[0])
    dA = (float(scaling) * (g2 @ b)).T @ x_arr.reshape(-1, w.shape[1])
    return L.LoraGrads(dx=g.dx, dA=dA, dB=g.dB, dW=g.dW, dbias=g.dbias)


def _backward_dW_fifo_untransposed(x, W, A, B, grad_y, scaling, *, fan_in_fan_out=False, need_dW=False, **kw):
    g = L.backward(x, W, A, B, grad_y, scaling, fan_in_fan_out=fan_in_fan_out, need_dW=need_dW, **kw)
    if g.dW is None or not fan_in_fan_out:
        return g
    return L.LoraGrads(dx=g.dx, dA=g.dA, dB=g.dB, dW=g.dW.T.reshape(g.dW.shape), dbias=g.dbias)


# ---------------------------------------------------------------------------- embedding


def _embedding_roles_swapped(ids, E, A, B, scaling):
    """ΔE built as a Linear's (d, V) delta and reshaped (not transposed) to the table's (V, d)."""
    L.embedding_forward(ids, E, A, B, scaling)
    e = np.asarray(E, dtype=np.float64)
    delta = (float(scaling) * (np.asarray(B, dtype=np.float64) @ np.asarray(A, dtype=np.float64))).reshape(e.shape)
    return (e + delta)[np.asarray(ids)]


def _embedding_scaling_on_table(ids, E, A, B, scaling):
    y = L.embedding_forward(ids, E, A, B, scaling)
    return y + (float(scaling) - 1.0) * np.asarray(E, dtype=np.float64)[np.asarray(ids)]


# ---------------------------------------------------------------------------- init


def _init_kaiming_fan_out(
    W, r, *, alpha, method="default", rng=None, use_rslora=False, fan_in_fan_out=False, embedding=False
):
    out = L.init(
        W,
        r,
        alpha=alpha,
        method=method,
        rng=rng,
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        embedding=embedding,
    )
    if method != "default" or embedding:
        return out
    w = np.asarray(W)
    n_out, n_in = (w.shape[1], w.shape[0]) if fan_in_fan_out else w.shape
    return L.LoraInit(W=out.W, A=out.A * np.sqrt(n_in) / np.sqrt(n_out), B=out.B)  # bound 1/√out


def _init_gaussian_std(W, r, *, alpha, method="default", rng=None, **kw):
    out = L.init(W, r, alpha=alpha, method=method, rng=rng, **kw)
    if method != "gaussian" or kw.get("embedding"):
        return out
    return L.LoraInit(W=out.W, A=out.A * r / np.sqrt(r), B=out.B)  # std 1/√r instead of 1/r


def _init_embedding_linear_roles(
    W, r, *, alpha, method="default", rng=None, use_rslora=False, fan_in_fan_out=False, embedding=False
):
    """Embedding adapters initialised like Linear's (A random, B zero) instead of the reverse."""
    if not embedding:
        return L.init(W, r, alpha=alpha, method=method, rng=rng, use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out)
    e = np.asarray(W, dtype=np.float64)
    L.init(W, r, alpha=alpha, method=method, rng=np.random.default_rng(0), use_rslora=use_rslora, embedding=True)
    vocab, dim = e.shape
    return L.LoraInit(W=e, A=rng.standard_normal((r, vocab)), B=np.zeros((dim, r)))


def _init_pissa(W, r, *, alpha, use_rslora=False, fan_in_fan_out=False, defect: str):
    w = np.asarray(W, dtype=np.float64)
    w = w.T if fan_in_fan_out else w
    s = L.scaling(alpha, r, use_rslora=use_rslora)
    u, sv, vh = np.linalg.svd(w, full_matrices=False)
    sl = slice(sv.size - r, sv.size) if defect == "tail_slice" else slice(0, r)
    root = np.sqrt(sv[sl] if defect == "no_divide" else sv[sl] / s)
    a, b = root[:, None] * vh[sl], u[:, sl] * root[None, :]
    w_res = w - s * (b @ a)
    return L.LoraInit(W=w_res.T if fan_in_fan_out else w_res, A=a, B=b)


def _init_pissa_mutant(defect: str):
    def fn(W, r, *, alpha, method="default", rng=None, use_rslora=False, fan_in_fan_out=False, embedding=False):
        out = L.init(
            W,
            r,
            alpha=alpha,
            method=method,
            rng=rng,
            use_rslora=use_rslora,
            fan_in_fan_out=fan_in_fan_out,
            embedding=embedding,
        )
        if method != "pissa":
            return out
        return _init_pissa(W, r, alpha=alpha, use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out, defect=defect)

    return fn


def _init_olora_unscaled(
    W, r, *, alpha, method="default", rng=None, use_rslora=False, fan_in_fan_out=False, embedding=False
):
    out = L.init(
        W,
        r,
        alpha=alpha,
        method=method,
        rng=rng,
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        embedding=embedding,
    )
    if method != "olora":
        return out
    s = L.scaling(alpha, r, use_rslora=use_rslora)
    delta = (out.B @ out.A).T if fan_in_fan_out else out.B @ out.A
    return L.LoraInit(W=out.W + s * delta - delta, A=out.A, B=out.B)  # W_res = W − B A (s dropped)


def _init_rslora_ignored(W, r, *, alpha, use_rslora=False, **kw):
    return L.init(W, r, alpha=alpha, use_rslora=False, **kw)


# ---------------------------------------------------------------------------- masks and counts


def _dropout_mask_other_threshold(rng, shape, p):
    g = _checks.rng(rng)
    pp = _checks.real(p, "p", low=0.0, high=1.0, high_inclusive=False)
    dims = tuple(_checks.integer(n, "shape", low=0) for n in shape)
    return (g.random(dims) < 1.0 - pp).astype(np.float64)  # keep when u < 1 − p: same rate, other elements


def _param_count_dora_in(in_features, out_features, r, *, lora_bias=False, dora=False):
    n = L.param_count(in_features, out_features, r, lora_bias=lora_bias, dora=dora)
    return n - out_features + in_features if dora else n  # m counted over the input axis


def _model_count_substring(layers, r, target_modules, *, lora_bias=False, dora=False):
    if target_modules == "all-linear":
        return L.model_param_count(layers, r, target_modules, lora_bias=lora_bias, dora=dora)
    hit = [n for n in layers if any(k in n for k in target_modules)]  # substring instead of PEFT's suffix rule
    if not hit:
        raise ValueError("target_modules: matched none of the layers")
    trainable = sum(L.param_count(layers[n][1], layers[n][0], r, lora_bias=lora_bias, dora=dora) for n in hit)
    base = sum(o * i for o, i in layers.values())
    return L.ModelCount(trainable=trainable, base=base, adapted_layers=tuple(hit))


MUTANTS: list[Mutant] = [
    Mutant("alpha instead of alpha/r", "lora.scaling", "scaling", _scaling_alpha),
    Mutant("rsLoRA sqrt(r) and r swapped", "lora.scaling", "scaling", _scaling_sqrt_swapped),
    Mutant("use_rslora ignored", "lora.scaling", "options", _scaling_rslora_ignored),
    Mutant("delta written transposed", "lora.delta", "transposition", _delta_transposed),
    Mutant("delta ignores fan_in_fan_out", "lora.delta", "options", _delta_fifo_ignored),
    Mutant("dropout applied to the base branch too", "lora.forward", "options", _fwd("dropout_on_base")),
    Mutant("dropout not rescaled by 1/(1-p)", "lora.forward", "scaling", _fwd("no_rescale")),
    Mutant("bias also added inside the scaled branch", "lora.forward", "scaling", _fwd("bias_scaled")),
    Mutant("in-feature columns after the last multiple of 16 dropped", "lora.forward", "tails", _fwd("tail16")),
    Mutant("path above 16 rows forgets the scaling", "lora.forward", "path switch", _fwd("big_batch_no_scaling")),
    Mutant("forward computed in float32 behind a float64 signature", "lora.forward", "precision", _fwd("float32")),
    Mutant("rank clipped to min(in, out)", "lora.forward", "tails", _fwd("rank_clipped")),
    Mutant("backward: dx's LoRA part not masked", "lora.backward", "options", _backward_mask_not_on_dx),
    Mutant("backward: dB without s", "lora.backward", "scaling", _backward_dB_unscaled),
    Mutant("backward: dA from the undropped x", "lora.backward", "options", _backward_dA_undropped),
    Mutant("backward: dW not transposed for Conv1D", "lora.backward", "transposition", _backward_dW_fifo_untransposed),
    Mutant("merge: safe flag ignored", "lora.merge", "options", _merge_safe_ignored),
    Mutant("merge: storage dtype ignored", "lora.merge", "precision", _merge_dtype_not_rounded),
    Mutant("unmerge subtracts B A without s", "lora.unmerge", "scaling", _unmerge_unscaled),
    Mutant("unmerge rounds once (ΔW not rounded first)", "lora.unmerge", "precision", _unmerge_one_rounding),
    Mutant(
        "embedding: A/B roles swapped (reshape, not transpose)",
        "lora.embedding_forward",
        "transposition",
        _embedding_roles_swapped,
    ),
    Mutant("embedding: table scaled by s too", "lora.embedding_forward", "scaling", _embedding_scaling_on_table),
    Mutant("init default: kaiming bound 1/sqrt(out)", "lora.init", "axes", _init_kaiming_fan_out),
    Mutant("init gaussian: std 1/sqrt(r)", "lora.init", "scaling", _init_gaussian_std),
    Mutant("init embedding: Linear's roles (A random, B zero)", "lora.init", "options", _init_embedding_linear_roles),
    Mutant("init PiSSA: singular values not divided by s", "lora.init", "scaling", _init_pissa_mutant("no_divide")),
    Mutant("init PiSSA: last r singular triplets", "lora.init", "axes", _init_pissa_mutant("tail_slice")),
    Mutant("init OLoRA: residual W - B A without s", "lora.init", "scaling", _init_olora_unscaled),
    Mutant("init: use_rslora ignored", "lora.init", "options", _init_rslora_ignored),
    Mutant("dropout_mask keeps u < 1-p", "lora.dropout_mask", "thresholds", _dropout_mask_other_threshold),
    Mutant("param_count: DoRA m over in", "lora.param_count", "axes", _param_count_dora_in),
    Mutant("model_param_count: substring match", "lora.model_param_count", "options", _model_count_substring),
]


# ---------------------------------------------------------------------------- forward_batched (many adapters)
# Causes from serving kernels (S-LoRA, Punica, vLLM): an adapter id read off by one, the −1 sentinel read as an
# adapter (Python's negative indexing wraps it to the last one; a clamp sends it to adapter 0), one scaling for
# every adapter, ranks padded to the largest one with uninitialised values instead of zeros, segments assumed
# contiguous (tokens never sorted), a segment table that skips unused adapters, the bias only on adapter tokens,
# a large-batch path that forgets the indices, W's (in, out) layout ignored, float32 behind a float64 signature.


def _batched(x, W, adapters, adapter_index, *, bias=None, fan_in_fan_out=False, defect: str = "") -> np.ndarray:
    """lora.forward_batched with one optional defect (validation is the reference's, run first)."""
    L.forward_batched(x, W, adapters, adapter_index, bias=bias, fan_in_fan_out=fan_in_fan_out)
    x_arr = np.asarray(x, dtype=np.float64)
    w = np.asarray(W, dtype=np.float64)
    w = w.T if fan_in_fan_out and defect != "fifo_ignored" else w
    ads = [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), float(s)) for a, b, s in adapters]
    idx = np.asarray(adapter_index).astype(np.int64)
    n = len(ads)
    if defect == "float32":
        x_arr, w = x_arr.astype(np.float32), w.astype(np.float32)
        ads = [(a.astype(np.float32), b.astype(np.float32), np.float32(s)) for a, b, s in ads]
    if defect == "fifo_ignored" and w.shape[1] != x_arr.shape[1]:
        w = w.T  # the kernel reads W as (out, in) whatever its layout; a non-square W still has to fit
    y = x_arr @ w.T
    if bias is not None and defect != "bias_on_adapter_tokens_only":
        y = y + np.asarray(bias, dtype=np.float64)
    if defect == "padded_garbage" and ads:
        r_max = max(a.shape[0] for a, _, _ in ads)
        ads = [
            (
                np.vstack([a, np.ones((r_max - a.shape[0], a.shape[1]))]),
                np.hstack([b, np.ones((b.shape[0], r_max - b.shape[1]))]),
                s,
            )
            for a, b, s in ads
        ]
    if defect == "big_batch_ignores_index" and len(idx) > 16 and n:
        idx = np.zeros_like(idx)
    used = sorted(set(idx[idx >= 0].tolist()))
    if defect == "unsorted_segments":  # adapter i applied to rows [first_i, first_i + count_i) as given
        for i in used:
            first, count = int(np.flatnonzero(idx == i)[0]), int(np.count_nonzero(idx == i))
            a, b, s = ads[i]
            y[first : first + count] += s * ((x_arr[first : first + count] @ a.T) @ b.T)
        return np.asarray(y, dtype=np.float64)
    for t in range(len(idx)):
        i = int(idx[t])
        if defect == "one_based":
            i -= 1  # ids read as 1-based: index 0 gets no adapter, i gets adapter i − 1
        elif defect == "minus_one_wraps" and i == -1 and n:
            i = n - 1  # adapters[-1] in Python is the last adapter
        elif defect == "minus_one_is_zero" and i == -1 and n:
            i = 0
        elif defect == "segment_of_used" and i >= 0:
            i = used.index(i)  # the segment's position among used adapters taken for the adapter id
        if i < 0:
            continue
        a, b, s = ads[i]
        if defect == "one_scaling":
            s = ads[0][2]
        if defect == "bias_on_adapter_tokens_only" and bias is not None:
            y[t] = y[t] + np.asarray(bias, dtype=np.float64)
        y[t] = y[t] + s * ((x_arr[t] @ a.T) @ b.T)
    return np.asarray(y, dtype=np.float64)


def _fwd_batched(defect: str):
    def fn(**kw: Any) -> np.ndarray:
        return _batched(**kw, defect=defect)

    return fn


MUTANTS += [
    Mutant("batched: adapter ids read one-based", "lora.forward_batched", "options", _fwd_batched("one_based")),
    Mutant(
        "batched: index -1 wraps to the last adapter",
        "lora.forward_batched",
        "special values",
        _fwd_batched("minus_one_wraps"),
    ),
    Mutant(
        "batched: index -1 treated as adapter 0",
        "lora.forward_batched",
        "special values",
        _fwd_batched("minus_one_is_zero"),
    ),
    Mutant(
        "batched: adapter 0's scaling for every adapter", "lora.forward_batched", "scaling", _fwd_batched("one_scaling")
    ),
    Mutant(
        "batched: ranks padded to the largest with garbage, not zeros",
        "lora.forward_batched",
        "tails",
        _fwd_batched("padded_garbage"),
    ),
    Mutant(
        "batched: segments assumed contiguous (tokens never sorted)",
        "lora.forward_batched",
        "axes",
        _fwd_batched("unsorted_segments"),
    ),
    Mutant(
        "batched: segment table skips unused adapters",
        "lora.forward_batched",
        "path switch",
        _fwd_batched("segment_of_used"),
    ),
    Mutant(
        "batched: bias only on tokens with an adapter",
        "lora.forward_batched",
        "options",
        _fwd_batched("bias_on_adapter_tokens_only"),
    ),
    Mutant(
        "batched: path above 16 tokens puts every token on adapter 0",
        "lora.forward_batched",
        "path switch",
        _fwd_batched("big_batch_ignores_index"),
    ),
    Mutant("batched: fan_in_fan_out ignored", "lora.forward_batched", "transposition", _fwd_batched("fifo_ignored")),
    Mutant(
        "batched: computed in float32 behind a float64 signature",
        "lora.forward_batched",
        "precision",
        _fwd_batched("float32"),
    ),
]
