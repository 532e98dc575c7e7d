"""LoRA: low-rank adaptation of a frozen linear map (Hu et al. 2021, arXiv 2106.09685).

Layout (PEFT and torch): W is (out, in) and the layer computes y = x Wᵀ + b. The
adapter is A (r, in) and B (out, r), with

    ΔW = s · B A,        s = α / r        (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732: s = α / √r)
    y  = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ                                          (LoRA eq. 3)

GPT-2's Conv1D stores W transposed, (in, out); ``fan_in_fan_out=True`` says so,
and only ΔW is transposed to match it (A and B keep their shapes). Embedding
LoRA (PEFT) has A (r, V) and B (d, r) and adds s·(B A)ᵀ, of shape (V, d), to the
table E; that is ``delta(..., fan_in_fan_out=True)``.

Everything is float64 NumPy. Dropout is inverted dropout on the input of the LoRA
branch only; its keep mask is an argument, never drawn behind the caller's back.
See spec/lora.md for the written rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, precision

INIT_METHODS = ("default", "gaussian", "pissa", "olora")


# ---------------------------------------------------------------------------- validation helpers


def _rank_range(r: Any, in_features: int, out_features: int, name: str = "r") -> int:
    return _checks.integer(r, name, low=1, high=min(in_features, out_features))


def _weight(W: Any, fan_in_fan_out: bool, name: str = "W") -> tuple[np.ndarray, int, int]:
    """Validate W and return it in (out, in) layout with (out, in)."""
    w = _checks.float_array(W, name, ndim=2)
    w = w.T if fan_in_fan_out else w
    return w, w.shape[0], w.shape[1]


def _factors(A: Any, B: Any, in_features: int | None, out_features: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate A (r, in) and B (out, r) against each other and the base shape."""
    a = _checks.float_array(A, "A", ndim=2)
    b = _checks.float_array(B, "B", ndim=2)
    r = a.shape[0]
    _checks.check_shape(a, "A", (None, in_features))
    _checks.check_shape(b, "B", (out_features, r))
    if r > min(a.shape[1], b.shape[0]):
        raise ValueError(f"A: rank r = {r} must be at most min(in, out) = {min(a.shape[1], b.shape[0])}")
    return a, b


def _scaling(scaling: Any) -> float:
    return _checks.real(scaling, "scaling")


def _dropout(x: np.ndarray, dropout_mask: Any, dropout_p: Any) -> np.ndarray:
    """Inverted dropout with an explicit keep mask: x ⊙ mask / (1 − p); x itself without a mask."""
    mask, p = _checks.keep_mask(dropout_mask, dropout_p, x.shape)
    return x if mask is None else x * mask / (1.0 - p)


# ---------------------------------------------------------------------------- scaling and delta


def scaling(alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """s = α / r (LoRA §4.1), or α / √r with rsLoRA (arXiv 2312.03732, Theorem 3.2)."""
    a = _checks.real(alpha, "alpha")
    rank = _checks.integer(r, "r", low=1)
    return a / np.sqrt(rank) if _checks.boolean(use_rslora, "use_rslora") else a / rank


@precision._overflow_checked
def delta(A: npt.ArrayLike, B: npt.ArrayLike, scaling: float, *,
          fan_in_fan_out: bool = False) -> npt.NDArray[np.float64]:
    """ΔW = s · B A, shape (out, in); transposed to (in, out) when ``fan_in_fan_out``."""
    a, b = _factors(A, B, None, None)
    d = _scaling(scaling) * (b @ a)
    return d.T if _checks.boolean(fan_in_fan_out, "fan_in_fan_out") else d


# ---------------------------------------------------------------------------- forward and backward


@precision._overflow_checked
def forward(
    x: npt.ArrayLike,
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    scaling: float,
    *,
    bias: npt.ArrayLike | None = None,
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> npt.NDArray[np.float64]:
    """y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ for x of shape (..., in).

    ``dropout_mask`` (shape of x, 0/1) with ``dropout_p`` gives drop(x) = x ⊙ mask / (1 − p),
    applied to the LoRA branch only (PEFT ``Linear.forward``); without a mask this is eval mode.
    """
    w, out_f, in_f = _weight(W, _checks.boolean(fan_in_fan_out, "fan_in_fan_out"))
    a, b = _factors(A, B, in_f, out_f)
    xx = _checks.float_array(x, "x", ndim=range(1, 33))
    _checks.check_shape(xx, "x", (*xx.shape[:-1], in_f))
    s = _scaling(scaling)
    y = xx @ w.T
    if bias is not None:
        bb = _checks.float_array(bias, "bias", ndim=1)
        _checks.check_shape(bb, "bias", (out_f,))
        y = y + bb
    return y + s * ((_dropout(xx, dropout_mask, dropout_p) @ a.T) @ b.T)


@dataclass(frozen=True)
class LoraGrads:
    """Gradients of a scalar loss through one LoRA layer (None where not requested)."""

    dx: np.ndarray
    dA: np.ndarray
    dB: np.ndarray
    dW: np.ndarray | None = None
    dbias: np.ndarray | None = None


@precision._overflow_checked
def backward(
    x: npt.ArrayLike,
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    grad_y: npt.ArrayLike,
    scaling: float,
    *,
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    need_dW: bool = False,
    need_dbias: bool = False,
) -> LoraGrads:
    """Reverse mode of ``forward``. With x̃ = drop(x), h = x̃ Aᵀ and g = ∂L/∂y:

        ∂L/∂B = s · gᵀ h            (out, r)
        ∂L/∂A = s · (g B)ᵀ x̃        (r, in)
        ∂L/∂x = g W + (s · g B A) ⊙ mask / (1 − p)
        ∂L/∂W = gᵀ x  (transposed for fan_in_fan_out),   ∂L/∂b = Σ g

    Sums run over every leading (batch, sequence) axis.
    """
    fifo = _checks.boolean(fan_in_fan_out, "fan_in_fan_out")
    w, out_f, in_f = _weight(W, fifo)
    a, b = _factors(A, B, in_f, out_f)
    xx = _checks.float_array(x, "x", ndim=range(1, 33))
    _checks.check_shape(xx, "x", (*xx.shape[:-1], in_f))
    g = _checks.float_array(grad_y, "grad_y", ndim=xx.ndim)
    _checks.check_shape(g, "grad_y", (*xx.shape[:-1], out_f))
    s = _scaling(scaling)
    mask, p = _checks.keep_mask(dropout_mask, dropout_p, xx.shape)
    xd = xx if mask is None else xx * mask / (1.0 - p)
    keep = None if mask is None else mask / (1.0 - p)

    x2, xd2, g2 = xx.reshape(-1, in_f), xd.reshape(-1, in_f), g.reshape(-1, out_f)
    h = xd2 @ a.T
    gb = s * (g2 @ b)  # ∂L/∂h
    dB = s * (g2.T @ h)
    dA = gb.T @ xd2
    dx_lora = gb @ a
    if keep is not None:
        dx_lora = dx_lora * keep.reshape(-1, in_f)
    dx = (g2 @ w + dx_lora).reshape(xx.shape)
    dW = None
    if _checks.boolean(need_dW, "need_dW"):
        dW = g2.T @ x2
        dW = dW.T if fifo else dW
    dbias = g2.sum(axis=0) if _checks.boolean(need_dbias, "need_dbias") else None
    return LoraGrads(dx=dx, dA=dA, dB=dB, dW=dW, dbias=dbias)


def dropout_mask(rng: np.random.Generator, shape: Sequence[int], p: float) -> npt.NDArray[np.float64]:
    """Draw a keep mask for inverted dropout: mask = (rng.random(shape) >= p), keep probability 1 − p.

    A convenience; every op takes the mask itself, so any other draw can be used.
    """
    g = _checks.rng(rng)
    pp = _checks.real(p, "p", low=0.0, high=1.0, high_inclusive=False)
    dims = tuple(_checks.integer(n, "shape", low=0) for n in shape)
    return (g.random(dims) >= pp).astype(np.float64)


# ---------------------------------------------------------------------------- embedding


@precision._overflow_checked
def embedding_forward(ids: npt.ArrayLike, E: npt.ArrayLike, A: npt.ArrayLike, B: npt.ArrayLike,
                      scaling: float) -> npt.NDArray[np.float64]:
    """Embedding LoRA (PEFT ``lora.Embedding``): y = E[ids] + s · Aᵀ[ids] Bᵀ.

    E is (V, d), A is (r, V), B is (d, r); ΔE = s·(B A)ᵀ. PEFT never applies dropout here.
    """
    e = _checks.float_array(E, "E", ndim=2)
    vocab, dim = e.shape
    a, b = _factors(A, B, vocab, dim)
    idx = np.asarray(ids)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"ids: expected an integer array of token ids, got {_checks.describe(idx)}")
    if idx.size and (idx.min() < 0 or idx.max() >= vocab):
        raise ValueError(f"ids: expected ids in [0, {vocab}), got values in [{idx.min()}, {idx.max()}]")
    return e[idx] + _scaling(scaling) * (a.T[idx] @ b.T)


# ---------------------------------------------------------------------------- merge


@precision._overflow_checked(storage_dtype="dtype")
def merge(
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    dtype: Any = None,
    safe: bool = False,
) -> npt.NDArray[np.float64]:
    """W' = W + ΔW (LoRA §4.1, "No Additional Inference Latency": none once merged).

    With ``dtype`` (the base weight's storage format) the merge rounds as PEFT does:
    unsafe ``round(W + ΔW)`` (one rounding) or, with ``safe=True``,
    ``round(W + round(ΔW))`` (ΔW rounded to the base dtype first: two roundings).
    """
    fifo = _checks.boolean(fan_in_fan_out, "fan_in_fan_out")
    w, out_f, in_f = _weight(W, fifo)
    a, b = _factors(A, B, in_f, out_f)
    d = _scaling(scaling) * (b @ a)
    if dtype is None:
        merged = w + d
    else:
        _checks.boolean(safe, "safe")
        merged = precision.round_to(w + (precision.round_to(d, dtype) if safe else d), dtype)
    return merged.T if fifo else merged


@precision._overflow_checked(storage_dtype="dtype")
def unmerge(
    W_merged: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    dtype: Any = None,
) -> npt.NDArray[np.float64]:
    """W = W' − ΔW; with ``dtype``, PEFT's ``round(W' − round(ΔW))`` (not exact in low precision)."""
    fifo = _checks.boolean(fan_in_fan_out, "fan_in_fan_out")
    w, out_f, in_f = _weight(W_merged, fifo, "W_merged")
    a, b = _factors(A, B, in_f, out_f)
    d = _scaling(scaling) * (b @ a)
    out = w - d if dtype is None else precision.round_to(w - precision.round_to(d, dtype), dtype)
    return out.T if fifo else out


# ---------------------------------------------------------------------------- initialisation


@dataclass(frozen=True)
class LoraInit:
    """Result of ``init``: the (possibly modified) base weight and the adapter factors."""

    W: np.ndarray
    A: np.ndarray
    B: np.ndarray


@precision._overflow_checked
def init(
    W: npt.ArrayLike,
    r: int,
    *,
    alpha: float,
    method: str = "default",
    rng: np.random.Generator | None = None,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
) -> LoraInit:
    """Initialise an adapter for base weight W as PEFT's ``init_lora_weights`` does.

    - "default": A ~ U(−1/√in, 1/√in) (kaiming_uniform with a = √5), B = 0; ΔW = 0. This is loralib's
      and PEFT's initialisation, not the paper's: LoRA §4.1 (and the lesson) draw A from a Gaussian,
      which is "gaussian" below (spec/lora.md §5).
    - "gaussian": A ~ N(0, (1/r)²), B = 0 (the std is 1/r, independent of in, as in PEFT).
    - embedding=True (W is the table E (V, d); A (r, V), B (d, r)), "default" or "gaussian":
      A = 0, B ~ N(0, 1) — the reverse of Linear.
    - "pissa" (Meng et al. 2024, arXiv 2404.02948): W = U S Vh; with S_r ← S_r / s,
      A = diag(√S_r) Vh_r, B = U_r diag(√S_r), W_res = W − s·B A (the tail singular triplets).
    - "olora" (Büyükakyüz 2024, arXiv 2406.01775): W = Q R; B = Q[:, :r], A = R[:r], W_res = W − s·B A
      (no division by s, as in PEFT).

    Draws: A = rng.uniform(−b, b, (r, in)) for "default"; A = rng.normal(0, 1/r, (r, in)) for
    "gaussian"; B = rng.standard_normal((d, r)) for embeddings. SVD and QR factors have free signs:
    compare them through B A and W_res.
    """
    m = _checks.choice(method, "method", INIT_METHODS)
    fifo = _checks.boolean(fan_in_fan_out, "fan_in_fan_out")
    emb = _checks.boolean(embedding, "embedding")
    if emb and fifo:
        raise ValueError("fan_in_fan_out: an embedding table is already (V, d); pass fan_in_fan_out=False")
    if emb and m not in ("default", "gaussian"):
        raise ValueError(f"method: embedding LoRA supports 'default' and 'gaussian', got {m!r}")
    # Embedding: E is (V, d), and the adapter maps V -> d, like a (d, V) linear layer.
    w, out_f, in_f = _weight(W, fifo or emb)
    rank = _rank_range(r, in_f, out_f)
    s = scaling(alpha, rank, use_rslora=use_rslora)

    if m in ("default", "gaussian"):
        g = _checks.rng(rng)
        if emb:
            a = np.zeros((rank, in_f))
            b = g.standard_normal((out_f, rank))
        else:
            a = (g.uniform(-1.0 / np.sqrt(in_f), 1.0 / np.sqrt(in_f), (rank, in_f)) if m == "default"
                 else g.normal(0.0, 1.0 / rank, (rank, in_f)))
            b = np.zeros((out_f, rank))
        return LoraInit(W=np.array(_checks.float_array(W, "W")), A=a, B=b)

    if m == "pissa":
        if s == 0.0:
            raise ValueError("alpha: PiSSA divides the singular values by s = α/r, so alpha must be non-zero")
        u, sv, vh = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(sv[:rank] / s)
        a = root[:, None] * vh[:rank]
        b = u[:, :rank] * root[None, :]
    else:  # olora
        q, rr = np.linalg.qr(w, mode="reduced")
        a, b = rr[:rank], q[:, :rank]
    w_res = w - s * (b @ a)
    return LoraInit(W=w_res.T if fifo else w_res, A=a, B=b)


# ---------------------------------------------------------------------------- parameter counts


def param_count(in_features: int, out_features: int, r: int, *, lora_bias: bool = False,
                dora: bool = False) -> int:
    """Trainable parameters of one adapted layer: r·(in + out) [+ out for lora_bias] [+ out for DoRA's m].

    d = 4096, r = 8: 2·4096·8 = 65,536, a 256× reduction from d² = 16.7M (the lesson's numbers).
    Embedding: pass (V, d) as (in_features, out_features).
    """
    i = _checks.integer(in_features, "in_features", low=1)
    o = _checks.integer(out_features, "out_features", low=1)
    rank = _rank_range(r, i, o)
    extra = o * int(_checks.boolean(lora_bias, "lora_bias")) + o * int(_checks.boolean(dora, "dora"))
    return rank * (i + o) + extra


@dataclass(frozen=True)
class ModelCount:
    """Parameter accounting for a whole model."""

    trainable: int  #: adapter parameters
    base: int  #: parameters of the listed linear layers (frozen)
    adapted_layers: tuple[str, ...]

    @property
    def fraction(self) -> float:
        """trainable / (base + trainable), as PEFT's ``print_trainable_parameters`` reports it."""
        return self.trainable / (self.base + self.trainable)


def _targets(name: str, target_modules: str | Sequence[str]) -> bool:
    if target_modules == "all-linear":
        return True
    # PEFT's rule for a list: the module name equals a key or ends with "." + key.
    return any(name == key or name.endswith("." + key) for key in target_modules)


def model_param_count(
    layers: Mapping[str, tuple[int, int]],
    r: int,
    target_modules: str | Sequence[str],
    *,
    lora_bias: bool = False,
    dora: bool = False,
) -> ModelCount:
    """Count adapter parameters over a model given its linear layers {name: (out, in)}.

    ``target_modules`` is "all-linear" or a list of names matched as PEFT matches them
    (equal, or a suffix after a dot: "q_proj" matches "layers.0.attn.q_proj").
    """
    if not isinstance(layers, Mapping) or not layers:
        raise TypeError(f"layers: expected a non-empty mapping name -> (out, in), got {_checks.describe(layers)}")
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(f"target_modules: expected 'all-linear' or a list of names, got {target_modules!r}")
    elif not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules: expected a list of str, got {target_modules!r}")
    trainable, base, hit = 0, 0, []
    for name, shape in layers.items():
        if not (isinstance(shape, Sequence) and len(shape) == 2):
            raise ValueError(f"layers[{name!r}]: expected (out, in), got {shape!r}")
        out_f = _checks.integer(shape[0], f"layers[{name!r}][0]", low=1)
        in_f = _checks.integer(shape[1], f"layers[{name!r}][1]", low=1)
        base += out_f * in_f
        if _targets(name, target_modules):
            trainable += param_count(in_f, out_f, r, lora_bias=lora_bias, dora=dora)
            hit.append(name)
    if not hit:
        raise ValueError(f"target_modules: {target_modules!r} matched none of the layers {list(layers)[:5]}...")
    return ModelCount(trainable=trainable, base=base, adapted_layers=tuple(hit))
