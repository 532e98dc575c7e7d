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
Any rank r ≥ 1 is accepted, r > min(in, out) included, as in loralib and PEFT.
The formulas are the private functions of the "core" section; each public function
checks its operands with refimpl._linear_operands (shared with DoRA, QLoRA and the
kernels) and calls its core. See spec/lora.md for the written rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, precision
from refimpl._linear_operands import (
    Adapter,
    adapter_factors,
    base_weight,
    batched_operands,
    linear_layer,
    linear_operands,
    scaling_factor,
    token_ids,
)

#: the public API (the checks imported from refimpl._linear_operands are not part of it)
__all__ = [
    "INIT_METHODS",
    "LoraGrads",
    "LoraInit",
    "ModelCount",
    "backward",
    "delta",
    "dropout_mask",
    "embedding_forward",
    "forward",
    "forward_batched",
    "init",
    "merge",
    "model_param_count",
    "param_count",
    "scaling",
    "unmerge",
]

INIT_METHODS = ("default", "gaussian", "pissa", "olora")


# -------------------------------------------------------------------- core: the formulas (spec/lora.md §1, §3–§6, §11)


def _dropped(x: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """drop(x) = x ⊙ mask / (1 − p), with keep = mask / (1 − p); x itself in eval mode (no mask)."""
    return x if keep is None else x * keep


def _delta(A: np.ndarray, B: np.ndarray, s: float) -> np.ndarray:
    return s * (B @ A)  # ΔW = s · B A


def _forward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    s: float,
    bias: np.ndarray | None,
    keep: np.ndarray | None,
) -> np.ndarray:
    y = x @ W.T if bias is None else x @ W.T + bias
    return y + s * ((_dropped(x, keep) @ A.T) @ B.T)  # y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ  (eq. 3)


def _forward_batched(
    x: np.ndarray, W: np.ndarray, adapters: tuple[Adapter, ...], index: np.ndarray, bias: np.ndarray | None
) -> np.ndarray:
    """y_t = x_t Wᵀ + b + s_i (x_t A_iᵀ) B_iᵀ with i = index[t]; index −1 adds no adapter (spec/lora.md §11)."""
    y = x @ W.T if bias is None else x @ W.T + bias
    for i, ad in enumerate(adapters):
        t = index == i  # the tokens of adapter i
        y[t] += ad.scaling * ((x[t] @ ad.A.T) @ ad.B.T)
    return y


def _backward(
    x: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray, g: np.ndarray, s: float, keep: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(∂L/∂x, ∂L/∂A, ∂L/∂B) for x (N, in) and g = ∂L/∂y (N, out); keep (N, in) or None."""
    x_d = _dropped(x, keep)
    h = x_d @ A.T
    gb = s * (g @ B)  # ∂L/∂h
    dB = s * (g.T @ h)
    dA = gb.T @ x_d
    dx = g @ W + _dropped(gb @ A, keep)  # the LoRA branch's gradient passes through drop(·) again
    return dx, dA, dB


def _merge(W: np.ndarray, A: np.ndarray, B: np.ndarray, s: float) -> np.ndarray:
    return W + _delta(A, B, s)  # W' = W + s · B A


def _merge_rounded(W: np.ndarray, A: np.ndarray, B: np.ndarray, s: float, dtype: Any, safe: bool) -> np.ndarray:
    """PEFT's merge into a storage dtype: round(W + ΔW), or round(W + round(ΔW)) when ``safe``."""
    d = _delta(A, B, s)
    return precision.round_to(W + (precision.round_to(d, dtype) if safe else d), dtype)


def _unmerge(W_merged: np.ndarray, A: np.ndarray, B: np.ndarray, s: float, dtype: Any) -> np.ndarray:
    """W = W' − ΔW, or PEFT's round(W' − round(ΔW)) in a storage dtype."""
    d = _delta(A, B, s)
    return W_merged - d if dtype is None else precision.round_to(W_merged - precision.round_to(d, dtype), dtype)


def _embedding_forward(idx: np.ndarray, E: np.ndarray, A: np.ndarray, B: np.ndarray, s: float) -> np.ndarray:
    return E[idx] + s * (A.T[idx] @ B.T)  # y = E[ids] + s · Aᵀ[ids] Bᵀ


def _init_random(
    g: np.random.Generator, method: str, embedding: bool, in_f: int, out_f: int, r: int
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of "default" (A ~ U(±1/√in)) or "gaussian" (A ~ N(0, 1/r²)), B = 0; embedding: A = 0, B ~ N(0, 1)."""
    if embedding:
        return np.zeros((r, in_f)), g.standard_normal((out_f, r))
    bound = 1.0 / np.sqrt(in_f)
    a = g.uniform(-bound, bound, (r, in_f)) if method == "default" else g.normal(0.0, 1.0 / r, (r, in_f))
    return a, np.zeros((out_f, r))


def _init_pissa(W: np.ndarray, r: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """W = U S Vh, S_r ← S_r / s: A = diag(√S_r) Vh_r, B = U_r diag(√S_r) (k = min(r, in, out) triplets)."""
    u, sv, vh = np.linalg.svd(W, full_matrices=False)
    root = np.sqrt(sv[:r] / s)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def _init_olora(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """W = Q R: A = R[:r], B = Q[:, :r] (k = min(r, in, out) columns)."""
    q, r_factor = np.linalg.qr(W, mode="reduced")
    return r_factor[:r], q[:, :r]


# ---------------------------------------------------------------------------- scaling and delta


def scaling(alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """s = α / r (LoRA §4.1), or α / √r with rsLoRA (arXiv 2312.03732, Theorem 3.2)."""
    a = _checks.real(alpha, "alpha")
    rank = _checks.integer(r, "r", low=1)
    return a / np.sqrt(rank) if _checks.boolean(use_rslora, "use_rslora") else a / rank


@precision._overflow_checked
def delta(
    A: npt.ArrayLike, B: npt.ArrayLike, scaling: float, *, fan_in_fan_out: bool = False
) -> npt.NDArray[np.float64]:
    """ΔW = s · B A, shape (out, in); transposed to (in, out) when ``fan_in_fan_out``."""
    a, b = adapter_factors(A, B)
    d = _delta(a, b, scaling_factor(scaling))
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
    ops = linear_operands(
        x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    return _forward(ops.x, ops.W, ops.A, ops.B, ops.scaling, ops.bias, ops.keep)


@precision._overflow_checked
def forward_batched(
    x: npt.ArrayLike,
    W: npt.ArrayLike,
    adapters: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, float]],
    adapter_index: npt.ArrayLike,
    *,
    bias: npt.ArrayLike | None = None,
    fan_in_fan_out: bool = False,
) -> npt.NDArray[np.float64]:
    """Many adapters in one batch, eval form: the serving op of S-LoRA (arXiv 2311.03285), Punica (arXiv
    2310.18547) and vLLM,

        y_t = x_t Wᵀ + b + s_i · (x_t A_iᵀ) B_iᵀ,     i = adapter_index[t];  i = −1: y_t = x_t Wᵀ + b

    x is (T, in), one row per token; ``adapters`` is a sequence of (A_i (r_i, in), B_i (out, r_i), s_i)
    whose ranks and scalings may differ; ``adapter_index`` is (T,) integers in [−1, len(adapters)).
    Each row equals ``forward(x_t, W, A_i, B_i, s_i, bias=bias)``. The segment (SGMV) and gather (BGMV)
    forms of serving engines compute the same y (spec/lora.md §11).
    """
    ops = batched_operands(x, W, adapters, adapter_index, bias=bias, fan_in_fan_out=fan_in_fan_out)
    return _forward_batched(ops.x, ops.W, ops.adapters, ops.adapter_index, ops.bias)


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
    ops = linear_operands(
        x, W, A, B, scaling, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    g = _checks.float_array(grad_y, "grad_y", ndim=ops.x.ndim)
    _checks.check_shape(g, "grad_y", (*ops.x.shape[:-1], ops.out_features))
    want_dW, want_dbias = _checks.boolean(need_dW, "need_dW"), _checks.boolean(need_dbias, "need_dbias")
    x2, g2 = ops.x.reshape(-1, ops.in_features), g.reshape(-1, ops.out_features)  # sums over every leading axis
    keep2 = None if ops.keep is None else ops.keep.reshape(x2.shape)
    dx, dA, dB = _backward(x2, ops.W, ops.A, ops.B, g2, ops.scaling, keep2)
    dW = g2.T @ x2 if want_dW else None  # ∂L/∂W = gᵀ x in (out, in) layout
    if dW is not None and ops.fan_in_fan_out:
        dW = dW.T
    dbias = g2.sum(axis=0) if want_dbias else None
    return LoraGrads(dx=dx.reshape(ops.x.shape), dA=dA, dB=dB, dW=dW, dbias=dbias)


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
def embedding_forward(
    ids: npt.ArrayLike, E: npt.ArrayLike, A: npt.ArrayLike, B: npt.ArrayLike, scaling: float
) -> npt.NDArray[np.float64]:
    """Embedding LoRA (PEFT ``lora.Embedding``): y = E[ids] + s · Aᵀ[ids] Bᵀ.

    E is (V, d), A is (r, V), B is (d, r); ΔE = s·(B A)ᵀ. PEFT never applies dropout here.
    """
    e = _checks.float_array(E, "E", ndim=2)
    a, b = adapter_factors(A, B, *e.shape)
    return _embedding_forward(token_ids(ids, e.shape[0]), e, a, b, scaling_factor(scaling))


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
    layer = linear_layer(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out)
    safe_merge = _checks.boolean(safe, "safe")
    if dtype is None:
        return layer.to_caller(_merge(layer.W, layer.A, layer.B, layer.scaling))
    return layer.to_caller(_merge_rounded(layer.W, layer.A, layer.B, layer.scaling, dtype, safe_merge))


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
    layer = linear_layer(W_merged, A, B, scaling, fan_in_fan_out=fan_in_fan_out, w_name="W_merged")
    return layer.to_caller(_unmerge(layer.W, layer.A, layer.B, layer.scaling, dtype))


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

    Any r ≥ 1 (as loralib and PEFT): with r > min(in, out), "default" and "gaussian" give A (r, in) and
    B (out, r), while "pissa" and "olora" keep the k = min(in, out) components the SVD / QR has (A (k, in),
    B (out, k)) with s still α/r of the requested r, as PEFT 0.21.2 does (spec/lora.md §5).

    Draws: A = rng.uniform(−b, b, (r, in)) for "default"; A = rng.normal(0, 1/r, (r, in)) for
    "gaussian"; B = rng.standard_normal((d, r)) for embeddings. SVD and QR factors have free signs:
    compare them through B A and W_res.
    """
    m = _checks.choice(method, "method", INIT_METHODS)
    transposed = _checks.boolean(fan_in_fan_out, "fan_in_fan_out")  # W given (in, out)
    emb = _checks.boolean(embedding, "embedding")
    if emb and transposed:
        raise ValueError("fan_in_fan_out: an embedding table is already (V, d); pass fan_in_fan_out=False")
    if emb and m not in ("default", "gaussian"):
        raise ValueError(f"method: embedding LoRA supports 'default' and 'gaussian', got {m!r}")
    # Embedding: E is (V, d), and the adapter maps V -> d, like a (d, V) linear layer.
    w = base_weight(W, transposed or emb)
    out_f, in_f = w.shape
    rank = _checks.integer(r, "r", low=1)  # any r ≥ 1, r > min(in, out) included (spec/lora.md §1)
    s = scaling(alpha, rank, use_rslora=use_rslora)
    if m in ("default", "gaussian"):
        a, b = _init_random(_checks.rng(rng), m, emb, in_f, out_f, rank)
        return LoraInit(W=np.array(_checks.float_array(W, "W")), A=a, B=b)
    if m == "pissa" and s == 0.0:
        raise ValueError("alpha: PiSSA divides the singular values by s = α/r, so alpha must be non-zero")
    a, b = _init_pissa(w, rank, s) if m == "pissa" else _init_olora(w, rank)
    w_res = w - _delta(a, b, s)  # W_res = W − s · B A
    return LoraInit(W=w_res.T if transposed else w_res, A=a, B=b)


# ---------------------------------------------------------------------------- parameter counts


def param_count(in_features: int, out_features: int, r: int, *, lora_bias: bool = False, dora: bool = False) -> int:
    """Trainable parameters of one adapted layer: r·(in + out) [+ out for lora_bias] [+ out for DoRA's m].

    d = 4096, r = 8: 2·4096·8 = 65,536, a 256× reduction from d² = 16.7M (the lesson's numbers).
    Embedding: pass (V, d) as (in_features, out_features).
    """
    i = _checks.integer(in_features, "in_features", low=1)
    o = _checks.integer(out_features, "out_features", low=1)
    rank = _checks.integer(r, "r", low=1)
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
