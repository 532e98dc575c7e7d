"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353), as PEFT 0.21.2 computes it.

DoRA splits the adapted weight into a trainable magnitude m and a direction
(DoRA eq. 5, written in PEFT's (out, in) layout):

    V  = W + s · B A                       (out, in)   the LoRA-adapted weight
    ‖V‖ = sqrt(Σ_j V_oj²)                  (out,)      norm of each output row over the input dimension
    W' = m ⊙ V / ‖V‖ = f ⊙ V,   f = m / ‖V‖           (the paper's "column-wise" ‖·‖_c in its d×k notation)

    eval form:   y = f ⊙ (x Vᵀ) + b
    train form:  y = x Wᵀ + b + (f − 1) ⊙ (x_d Wᵀ) + f ⊙ s·(x_d Aᵀ) Bᵀ,   x_d = x ⊙ mask / (1 − p)

The train form is PEFT's dropout formula (PR #1474, PR #2153, nbasyl/DoRA#2);
with no dropout both forms are equal. The magnitude starts at m = ‖W + s·B A‖,
so the layer equals its base at initialisation. The backward pass either treats
‖V‖ as a constant (paper §4.3, PEFT: ``mode="detached"``) or differentiates it
(``mode="full"``). Rows with ‖V‖ = 0 have no direction: every function that
divides by the norm raises ValueError (spec/dora.md, special values).

Embedding (PEFT ``lora.Embedding``): E is (V, d), A (r, V), B (d, r) and
ΔE = s·(B A)ᵀ — a Linear stored (in, out) with in = V, so ``embedding=True``
means ``fan_in_fan_out=True``: the norm runs across the vocabulary and m is (d,).
ConvNd: W (out, in, *k), A (r, in, *k), B (out, r, 1, …); the norm is over every
axis but the first, i.e. the Linear rule on the (out, in·∏k) reshapes.

Everything is float64 NumPy; ``dtype=`` options round a result once into a
storage format, as PEFT does. See spec/dora.md for the written rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, bounds, lora, precision

BACKWARD_MODES = ("detached", "full")


@dataclass(frozen=True)
class DoraGrads:
    """Gradients of a DoRA layer: dx like x, dA (r, in), dB (out, r), dm (out,)."""

    dx: np.ndarray
    dA: np.ndarray
    dB: np.ndarray
    dm: np.ndarray


@dataclass(frozen=True)
class DoraMerge:
    """A merged weight and the row norm ‖W_base + ΔW‖ that ``unmerge`` needs back."""

    W: np.ndarray
    weight_norm: np.ndarray


@dataclass(frozen=True)
class DoraAdapter:
    """One DoRA adapter of a layer, for ``forward_sequential``: A (r, in), B (out, r), m (out,), s."""

    A: Any
    B: Any
    m: Any
    scaling: float


# ---------------------------------------------------------------------------- validation helpers


@dataclass(frozen=True)
class _Layer:
    """Validated operands in (out, in) layout; ``shape`` restores the caller's layout of W."""

    w: np.ndarray  # (out, in)
    a: np.ndarray  # (r, in)
    b: np.ndarray  # (out, r)
    s: float
    transposed: bool
    shape: tuple[int, ...]

    def delta(self) -> np.ndarray:
        return lora.delta(self.a, self.b, self.s)

    def combined(self) -> np.ndarray:
        """V = W + s·B A in (out, in) layout."""
        return self.w + self.delta()

    def to_caller(self, w2: np.ndarray) -> np.ndarray:
        """An (out, in) array back in the caller's layout of W."""
        return (w2.T if self.transposed else w2).reshape(self.shape)


def _layer(W: Any, A: Any, B: Any, scaling: Any, fan_in_fan_out: Any, embedding: Any = False,
           *, allow_conv: bool = False, w_name: str = "W") -> _Layer:
    transposed = _checks.boolean(fan_in_fan_out, "fan_in_fan_out") | _checks.boolean(embedding, "embedding")
    w = _checks.float_array(W, w_name, ndim=range(2, 6) if allow_conv else 2)
    s = _checks.real(scaling, "scaling")
    if w.ndim > 2:  # ConvNd: (out, in, *k) with A (r, in, *k) and B (out, r, 1, …)
        if transposed:
            raise ValueError(f"fan_in_fan_out: a convolution weight has no transposed layout, got "
                             f"{_checks.describe(w)} with fan_in_fan_out/embedding set")
        a = _checks.float_array(A, "A", ndim=w.ndim)
        b = _checks.float_array(B, "B", ndim=w.ndim)
        _checks.check_shape(a, "A", (None, *w.shape[1:]))
        _checks.check_shape(b, "B", (w.shape[0], a.shape[0], *([1] * (w.ndim - 2))))
        w2, a2, b2 = w.reshape(w.shape[0], -1), a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    else:
        w2 = w.T if transposed else w
        a2 = _checks.float_array(A, "A", ndim=2)
        b2 = _checks.float_array(B, "B", ndim=2)
        _checks.check_shape(a2, "A", (None, w2.shape[1]))
        _checks.check_shape(b2, "B", (w2.shape[0], a2.shape[0]))
    r = a2.shape[0]
    if r < 1 or r > min(w2.shape):
        raise ValueError(f"A: rank r = {r} must be in [1, min(out, in) = {min(w2.shape)}]")
    return _Layer(w2, a2, b2, s, transposed, w.shape)


def _magnitude(m: Any, out_features: int) -> np.ndarray:
    mm = _checks.float_array(m, "m", ndim=1)
    _checks.check_shape(mm, "m", (out_features,))
    return mm


def _nonzero_norm(norm: np.ndarray, name: str = "W + s·B·A") -> np.ndarray:
    """The zero-norm policy: a row without a direction is an error, never a silent inf/NaN."""
    zero = np.flatnonzero(norm == 0)
    if zero.size:
        raise ValueError(
            f"{name}: row norm is zero at output row(s) {zero[:8].tolist()}"
            f"{' …' if zero.size > 8 else ''}; DoRA's direction V/‖V‖ is undefined there "
            "(PEFT returns inf/NaN; see spec/dora.md, special values)"
        )
    return norm


def _input(x: Any, in_features: int, name: str = "x") -> np.ndarray:
    xx = _checks.float_array(x, name, ndim=range(1, 33))
    if xx.shape[-1] != in_features:
        raise ValueError(f"{name}: expected a last axis of size in = {in_features}, got shape {xx.shape}")
    return xx


def _dropped(x: np.ndarray, dropout_mask: Any, dropout_p: Any) -> np.ndarray | None:
    """x_d = x ⊙ mask / (1 − p), or None for the eval form (no mask given)."""
    mask, p = _checks.keep_mask(dropout_mask, dropout_p, x.shape)
    return None if mask is None else x * mask / (1.0 - p)


def _bias(bias: Any, out_features: int) -> np.ndarray:
    if bias is None:
        return np.zeros(out_features)
    bb = _checks.float_array(bias, "bias", ndim=1)
    _checks.check_shape(bb, "bias", (out_features,))
    return bb


# ---------------------------------------------------------------------------- norm, direction, magnitude


@precision._overflow_checked
def weight_norm(W: npt.ArrayLike, A: npt.ArrayLike, B: npt.ArrayLike, scaling: float, *, fan_in_fan_out: bool = False,
                embedding: bool = False) -> npt.NDArray[np.float64]:
    """‖W + s·B A‖ per output row, over the input dimension (DoRA eq. 5's ‖V + ΔV‖_c); shape (out,).

    Embedding (``embedding=True``, E (V, d)): the norm of each column of E + ΔE
    across the vocabulary, shape (d,). ConvNd weights: over all axes but the first.
    """
    layer = _layer(W, A, B, scaling, fan_in_fan_out, embedding, allow_conv=True)
    return np.linalg.norm(layer.combined(), axis=1)


@precision._overflow_checked
def direction(W: npt.ArrayLike, A: npt.ArrayLike, B: npt.ArrayLike, scaling: float, *, fan_in_fan_out: bool = False,
              embedding: bool = False) -> npt.NDArray[np.float64]:
    """The unit-norm direction (W + s·B A) / ‖W + s·B A‖ (DoRA eq. 5), in the layout of W."""
    layer = _layer(W, A, B, scaling, fan_in_fan_out, embedding, allow_conv=True)
    v = layer.combined()
    return layer.to_caller(v / _nonzero_norm(np.linalg.norm(v, axis=1))[:, None])


@precision._overflow_checked(storage_dtype="dtype")
def init_magnitude(W: npt.ArrayLike, A: npt.ArrayLike, B: npt.ArrayLike, scaling: float, *,
                   fan_in_fan_out: bool = False, embedding: bool = False, dtype: Any = None) -> npt.NDArray[np.float64]:
    """m₀ = ‖W + s·B A‖ (DoRA §4.1: m initialised to the norm of the pre-trained weight), shape (out,).

    With the default LoRA init (B = 0) this is ‖W‖, so the layer starts equal to
    its base. ``dtype`` emulates PEFT, which computes m in the base dtype before
    upcasting the adapter: ``round(‖round(W + round(s·round(B A)))‖)``. In bfloat16
    that m is off by up to one rounding (|f − 1| ≤ u = 2⁻⁸), so PEFT's DoRA is not
    the identity at init there. A zero row gives m = 0 (allowed; forward then raises).
    """
    layer = _layer(W, A, B, scaling, fan_in_fan_out, embedding, allow_conv=True)
    if dtype is None:
        return np.linalg.norm(layer.combined(), axis=1)
    dt = precision.resolve_dtype(dtype)
    low_rank = precision.round_to(layer.s * precision.round_to(layer.b @ layer.a, dt), dt)
    v = precision.round_to(precision.round_to(layer.w, dt) + low_rank, dt)
    return precision.round_to(np.linalg.norm(v, axis=1), dt)


# ---------------------------------------------------------------------------- forward and backward


@precision._overflow_checked
def forward(
    x: npt.ArrayLike,
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    m: npt.ArrayLike,
    scaling: float,
    *,
    bias: npt.ArrayLike | None = None,
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> npt.NDArray[np.float64]:
    """DoRA layer output, shape (..., out), for x of shape (..., in).

    Eval form (no ``dropout_mask``; also PEFT's training without dropout):
        y = f ⊙ (x (W + s·B A)ᵀ) + b,                       f = m / ‖W + s·B A‖
    Train form (PEFT with ``lora_dropout`` > 0, keep mask given):
        y = x Wᵀ + b + (f − 1) ⊙ (x_d Wᵀ) + f ⊙ s·(x_d Aᵀ) Bᵀ,   x_d = x ⊙ mask / (1 − p)
    The base term x Wᵀ never sees dropout; with an all-ones mask and p = 0 the
    two forms agree. Liu et al. 2024 (arXiv 2402.09353) eq. 5; PEFT PR #1474.
    """
    layer = _layer(W, A, B, scaling, fan_in_fan_out)
    out_f, in_f = layer.w.shape
    mm = _magnitude(m, out_f)
    xx = _input(x, in_f)
    b = _bias(bias, out_f)
    v = layer.combined()
    f = mm / _nonzero_norm(np.linalg.norm(v, axis=1))
    xd = _dropped(xx, dropout_mask, dropout_p)
    if xd is None:
        return f * (xx @ v.T) + b
    return xx @ layer.w.T + b + (f - 1.0) * (xd @ layer.w.T) + f * (layer.s * ((xd @ layer.a.T) @ layer.b.T))


@precision._overflow_checked
def backward(
    x: npt.ArrayLike,
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    m: npt.ArrayLike,
    grad_y: npt.ArrayLike,
    scaling: float,
    *,
    mode: str = "detached",
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> DoraGrads:
    """Gradients of ⟨grad_y, forward(...)⟩ with respect to x, A, B and m (W and b are frozen).

    With G = grad_y (N, out), x_in = x (eval) or x_d (train), P = x_in Vᵀ, n = ‖V‖, f = m / n:

        dm = Σ_N G ⊙ P / n
        dV = (G ⊙ f)ᵀ x_in                                   ``mode="detached"`` (paper §4.3, PEFT)
        dV = (G ⊙ f)ᵀ x_in − (m ⊙ dm / n²) ⊙ V               ``mode="full"`` (∂n_o/∂V_oj = V_oj / n_o)
        dA = s · Bᵀ dV,   dB = s · dV Aᵀ
        dx = (G ⊙ f) V                                       eval form
        dx = G W + ((G ⊙ f) V − G W) ⊙ mask / (1 − p)        train form

    dm is the same in both modes: the norm does not depend on m.
    """
    layer = _layer(W, A, B, scaling, fan_in_fan_out)
    out_f, in_f = layer.w.shape
    mm = _magnitude(m, out_f)
    xx = _input(x, in_f)
    g = _checks.float_array(grad_y, "grad_y", ndim=xx.ndim)
    _checks.check_shape(g, "grad_y", (*xx.shape[:-1], out_f))
    how = _checks.choice(mode, "mode", BACKWARD_MODES)
    xd = _dropped(xx, dropout_mask, dropout_p)
    x_in = (xx if xd is None else xd).reshape(-1, in_f)
    g2 = g.reshape(-1, out_f)

    v = layer.combined()
    n = _nonzero_norm(np.linalg.norm(v, axis=1))
    f = mm / n
    gf = g2 * f
    dm = np.sum(g2 * (x_in @ v.T), axis=0) / n
    dV = gf.T @ x_in
    if how == "full":
        dV = dV - (mm * dm / n**2)[:, None] * v
    dA = layer.s * (layer.b.T @ dV)
    dB = layer.s * (dV @ layer.a.T)
    if xd is None:
        dx = gf @ v
    else:
        keep = np.asarray(dropout_mask, dtype=np.float64).reshape(-1, in_f) / (1.0 - float(dropout_p))
        dx = g2 @ layer.w + (gf @ v - g2 @ layer.w) * keep
    return DoraGrads(dx=dx.reshape(xx.shape), dA=dA, dB=dB, dm=dm)


@precision._overflow_checked
def embedding_forward(ids: npt.ArrayLike, E: npt.ArrayLike, A: npt.ArrayLike, B: npt.ArrayLike, m: npt.ArrayLike,
                      scaling: float) -> npt.NDArray[np.float64]:
    """DoRA Embedding (PEFT ``lora.Embedding`` with ``use_dora``): y = (f ⊙ (E + ΔE))[ids].

    E (V, d), A (r, V), B (d, r), ΔE = s·(B A)ᵀ, f = m / ‖E + ΔE‖ with the norm of
    each embedding dimension across the vocabulary, m of shape (d,). No dropout
    (PEFT never applies it to embeddings).
    """
    layer = _layer(E, A, B, scaling, False, True, w_name="E")
    dim, vocab = layer.w.shape
    mm = _magnitude(m, dim)
    idx = np.asarray(ids)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"ids: expected an integer array of token ids, got {_checks.describe(idx)}")
    if idx.size and (idx.min() < 0 or idx.max() >= vocab):
        raise ValueError(f"ids: expected ids in [0, {vocab}), got values in [{idx.min()}, {idx.max()}]")
    v = layer.combined()  # (d, V)
    f = mm / _nonzero_norm(np.linalg.norm(v, axis=1), "E + s·(B·A)ᵀ")
    return (f * v.T)[idx]


@precision._overflow_checked
def forward_sequential(x: npt.ArrayLike, W: npt.ArrayLike, adapters: Sequence[DoraAdapter], *,
                       bias: npt.ArrayLike | None = None, fan_in_fan_out: bool = False) -> npt.NDArray[np.float64]:
    """Several active DoRA adapters on one layer, composed as PEFT composes them (eval form).

        z₀ = x Wᵀ,   z_i = f_i ⊙ (z_{i−1} + s_i·(x A_iᵀ) B_iᵀ),   y = z_k + b,
        f_i = m_i / ‖W + s_i·B_i A_i‖   (each norm against the bare base W)

    PEFT feeds the running result to each adapter as its ``base_result``; the
    result is not a DoRA layer of the summed delta. ``merge`` with ``unmerged_base``
    gives the matching merged weight.
    """
    if isinstance(adapters, DoraAdapter) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError(f"adapters: expected a non-empty sequence of DoraAdapter, got {_checks.describe(adapters)}")
    fifo = _checks.boolean(fan_in_fan_out, "fan_in_fan_out")
    w = _checks.float_array(W, "W", ndim=2)
    w2 = w.T if fifo else w
    xx = _input(x, w2.shape[1])
    z = xx @ w2.T
    for i, ad in enumerate(adapters):
        if not isinstance(ad, DoraAdapter):
            raise TypeError(f"adapters[{i}]: expected a DoraAdapter, got {_checks.describe(ad)}")
        layer = _layer(W, ad.A, ad.B, ad.scaling, fifo)
        f = _magnitude(ad.m, w2.shape[0]) / _nonzero_norm(np.linalg.norm(layer.combined(), axis=1))
        z = f * (z + layer.s * ((xx @ layer.a.T) @ layer.b.T))
    return z + _bias(bias, w2.shape[0])


# ---------------------------------------------------------------------------- merge and unmerge


@precision._overflow_checked(storage_dtype="dtype")
def merge(
    W: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    m: npt.ArrayLike,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
    unmerged_base: npt.ArrayLike | None = None,
    dtype: Any = None,
) -> DoraMerge:
    """W_merged = f ⊙ (W + ΔW), f = m / ‖W_base + ΔW‖ per output row (PEFT ``merge``).

    Returns the merged weight (layout of W) and the norm ‖W_base + ΔW‖, which
    ``unmerge`` takes back: the merged weight alone does not determine it. W_base
    is ``unmerged_base`` when W already holds earlier merged adapters (PEFT ≥ 0.21
    norms against the unmerged base, fix #3609 for #3608), else W itself.
    ``dtype`` rounds the merged weight once into the base storage format (PEFT
    computes f ⊙ (W + ΔW) in float32 and casts; its safe and unsafe DoRA merges agree).
    """
    layer = _layer(W, A, B, scaling, fan_in_fan_out, embedding, allow_conv=True)
    mm = _magnitude(m, layer.w.shape[0])
    if unmerged_base is None:
        base = layer.w
    else:
        ub = _checks.float_array(unmerged_base, "unmerged_base", ndim=len(layer.shape))
        _checks.check_shape(ub, "unmerged_base", layer.shape)
        base = ub.reshape(layer.shape[0], -1) if ub.ndim > 2 else (ub.T if layer.transposed else ub)
    d = layer.delta()
    norm = _nonzero_norm(np.linalg.norm(base + d, axis=1))
    merged = layer.to_caller((mm / norm)[:, None] * (layer.w + d))
    if dtype is not None:
        merged = precision.round_to(merged, dtype)
    return DoraMerge(W=merged, weight_norm=norm)


@precision._overflow_checked(storage_dtype="dtype")
def unmerge(
    W_merged: npt.ArrayLike,
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    m: npt.ArrayLike,
    scaling: float,
    weight_norm: npt.ArrayLike,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
    dtype: Any = None,
) -> npt.NDArray[np.float64]:
    """W = W_merged / f − ΔW with f = m / weight_norm, the norm ``merge`` returned (PEFT's cached norm).

    Exact inverse of ``merge`` in exact arithmetic; in a low-precision ``dtype``
    (result rounded once) it is not, as in PEFT. A zero magnitude row cannot be
    unmerged (the merged row is 0 whatever W was): ValueError.
    """
    layer = _layer(W_merged, A, B, scaling, fan_in_fan_out, embedding, allow_conv=True, w_name="W_merged")
    out_f = layer.w.shape[0]
    mm = _magnitude(m, out_f)
    norm = _checks.float_array(weight_norm, "weight_norm", ndim=1)
    _checks.check_shape(norm, "weight_norm", (out_f,))
    if (norm <= 0).any():
        raise ValueError(f"weight_norm: expected positive row norms (as returned by merge), got "
                         f"{norm[norm <= 0][:4].tolist()} at rows {np.flatnonzero(norm <= 0)[:8].tolist()}")
    if (mm == 0).any():
        raise ValueError(f"m: zero magnitude at output row(s) {np.flatnonzero(mm == 0)[:8].tolist()}; "
                         "those merged rows are 0 and the base weight cannot be recovered")
    restored = layer.to_caller(layer.w / (mm / norm)[:, None] - layer.delta())
    return restored if dtype is None else precision.round_to(restored, dtype)


# ---------------------------------------------------------------------------- counts and bounds


def param_count(in_features: int, out_features: int, r: int, *, kernel_size: Sequence[int] = (),
                groups: int = 1) -> int:
    """Trainable parameters of one DoRA layer: r·(in + out) + out (A, B and m).

    Embedding: in = num_embeddings, out = embedding_dim. ConvNd (``kernel_size``):
    r·in·∏k + out·(r / groups) + out (PEFT's ``lora_B`` is grouped, ``lora_A`` not).
    """
    i = _checks.integer(in_features, "in_features", low=1)
    o = _checks.integer(out_features, "out_features", low=1)
    rr = _checks.integer(r, "r", low=1)
    g = _checks.integer(groups, "groups", low=1)
    ks = tuple(_checks.integer(k, "kernel_size", low=1) for k in kernel_size)
    if not ks:
        if g != 1:
            raise ValueError(f"groups: only convolutions are grouped; expected 1 without kernel_size, got {g}")
        return rr * (i + o) + o
    if rr % g:
        raise ValueError(f"r: expected a multiple of groups = {g} (PEFT requires r % groups == 0), got {rr}")
    return rr * i * math.prod(ks) + o * (rr // g) + o  # Python ints: no int64 overflow


@precision._overflow_checked
def forward_error_bound(x: npt.ArrayLike, W: npt.ArrayLike, A: npt.ArrayLike, B: npt.ArrayLike, m: npt.ArrayLike,
                        scaling: float, dtype: Any = "float32", *, bias: npt.ArrayLike | None = None,
                        fan_in_fan_out: bool = False) -> npt.NDArray[np.float64]:
    """Elementwise bound on |ŷ − y| for a kernel that evaluates the DoRA eval form in ``dtype``.

    Inputs are taken as exact. With P = |x||W|ᵀ, Q = |s|·(|x||A|ᵀ)|B|ᵀ, c = ‖|W| + |s||B||A|‖ / ‖V‖
    (the norm's condition number, ≥ 1) and k = in + r + 5 roundings on the longest chain
    (``refimpl.bounds.dora_forward_depth`` counts them; Higham §3.1):

        |ŷ − y| ≤ γ_k · [ (1 + |f − 1| + c|f|) P + (1 + c)|f| Q + (1 + |f − 1|)|b| ]

    It covers PEFT's order of evaluation (base, minus bias, (f − 1)·base + f·s·lora, plus
    base) and the direct f ⊙ (x Vᵀ) + b.
    """
    layer = _layer(W, A, B, scaling, fan_in_fan_out)
    out_f, in_f = layer.w.shape
    m_arr = _magnitude(m, out_f)
    x_arr = _input(x, in_f)
    b = None if bias is None else _bias(bias, out_f)
    _nonzero_norm(np.linalg.norm(layer.combined(), axis=1))
    return bounds.dora_forward(x_arr, layer.w, layer.a, layer.b, m_arr, layer.s, dtype, bias=b)


@precision._overflow_checked
def backward_error_bound(x: npt.ArrayLike, W: npt.ArrayLike, A: npt.ArrayLike, B: npt.ArrayLike, m: npt.ArrayLike,
                         grad_y: npt.ArrayLike, scaling: float, dtype: Any = "float64", *, mode: str = "detached",
                         dropout_mask: npt.ArrayLike | None = None, dropout_p: float = 0.0,
                         fan_in_fan_out: bool = False) -> DoraGrads:
    """Elementwise bounds on the errors of ``backward``'s formulas evaluated in ``dtype`` (inputs exact).

    Each gradient is bounded by γ_k times its formula evaluated on absolute values, with every
    1/n carrying the norm's condition number c = ‖|W| + |s||B||A|‖ / ‖V‖ and
    k = N + in + out + r + 20 (the longest chain of dot products and elementwise steps;
    ``refimpl.bounds.dora_backward``).
    """
    layer = _layer(W, A, B, scaling, fan_in_fan_out)
    out_f, in_f = layer.w.shape
    m_arr = _magnitude(m, out_f)
    x_arr = _input(x, in_f)
    g = _checks.float_array(grad_y, "grad_y", ndim=x_arr.ndim)
    _checks.check_shape(g, "grad_y", (*x_arr.shape[:-1], out_f))
    mode = _checks.choice(mode, "mode", BACKWARD_MODES)
    mask, p = _checks.keep_mask(dropout_mask, dropout_p, x_arr.shape)
    keep = None if mask is None else mask / (1.0 - p)
    x_in = x_arr if keep is None else x_arr * keep
    _nonzero_norm(np.linalg.norm(layer.combined(), axis=1))
    b = bounds.dora_backward(x_in.reshape(-1, in_f), layer.w, layer.a, layer.b, m_arr, g.reshape(-1, out_f),
                             layer.s, dtype, mode, None if keep is None else keep.reshape(-1, in_f))
    return DoraGrads(dx=b.dx.reshape(x_arr.shape), dA=b.dA, dB=b.dB, dm=b.dm)
