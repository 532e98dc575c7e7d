"""Operand checks of the linear family: LoRA, DoRA and QLoRA, and their numba and CuPy kernels.

Every op of the family starts here: ``linear_operands`` (a layer's input, weight, adapter and options),
``linear_layer`` (a weight and its adapter, for ops without an input: delta, merge, init, DoRA's norms) or
``adapter_operands`` (an input and an adapter over a base weight given some other way, e.g. 4-bit codes).
Each returns a frozen record of validated float64 arrays in PEFT's layout, W (out, in), A (r, in),
B (out, r), so that an op's core reads as its formula and every kernel that calls the same check raises
the same ValueError/TypeError for the same bad input.

The rank r is any r ≥ 1: r > min(in, out) is legal, as in loralib and PEFT (B A then has rank at most
min(in, out), and the adapter has more parameters than it can use; spec/lora.md §1).

Dropout is inverted dropout with an explicit 0/1 keep mask: the record holds the keep factor
mask / (1 − p) (0 or 1/(1 − p) per element), and drop(x) = x ⊙ keep — the product torch's dropout forms
(its Bernoulli mask divided by 1 − p, then multiplied into x), and the factor the backward pass multiplies
into ∂L/∂x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refimpl import _checks


@dataclass(frozen=True)
class LinearLayer:
    """A base weight and its adapter, validated, in (out, in) layout.

    ``w_shape`` is the caller's shape of W and ``transposed`` says it was stored (in, out)
    (``fan_in_fan_out`` or an embedding table); ``to_caller`` puts an (out, in) result back.
    A ConvNd weight (out, in, *k) is held as its (out, in·∏k) reshape, A and B likewise.
    """

    W: np.ndarray  # (out, in)
    A: np.ndarray  # (r, in)
    B: np.ndarray  # (out, r)
    scaling: float
    transposed: bool
    w_shape: tuple[int, ...]

    @property
    def out_features(self) -> int:
        return int(self.W.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.W.shape[1])

    def to_caller(self, w: np.ndarray) -> np.ndarray:
        """An (out, in) array back in the caller's layout of W."""
        return (w.T if self.transposed else w).reshape(self.w_shape)


@dataclass(frozen=True)
class AdapterOperands:
    """An input batch and an adapter: x (..., in), A (r, in), B (out, r), s, bias (out,) or None, and the
    dropout keep factor mask / (1 − p) of x's shape, or None for the eval form (no mask)."""

    x: np.ndarray
    A: np.ndarray
    B: np.ndarray
    scaling: float
    bias: np.ndarray | None
    keep: np.ndarray | None

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class LinearOperands(AdapterOperands):
    """``AdapterOperands`` plus the base weight W in (out, in) layout and whether it was stored (in, out)."""

    W: np.ndarray
    fan_in_fan_out: bool


# ---------------------------------------------------------------------------- single checks


def adapter_factors(
    A: Any, B: Any, in_features: int | None = None, out_features: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A (r, in) and B (out, r), checked against each other and, where given, the base's (in, out).

    Any rank r ≥ 1 (A is non-empty) is accepted, r > min(in, out) included.
    """
    a = _checks.float_array(A, "A", ndim=2)
    b = _checks.float_array(B, "B", ndim=2)
    _checks.check_shape(a, "A", (None, in_features))
    _checks.check_shape(b, "B", (out_features, a.shape[0]))
    return a, b


def scaling_factor(scaling: Any) -> float:
    """The adapter's scale s (α/r or α/√r, computed by the caller): any finite real."""
    return _checks.real(scaling, "scaling")


def layer_input(x: Any, in_features: int, name: str = "x") -> np.ndarray:
    """x of shape (..., in): 1 to 32 axes, the last of size in."""
    x_arr = _checks.float_array(x, name, ndim=_checks.BATCHED_NDIM)
    if x_arr.shape[-1] != in_features:
        want = ", ".join(map(str, (*x_arr.shape[:-1], in_features)))
        raise ValueError(
            f"{name}: expected shape ({want}{',' if x_arr.ndim == 1 else ''}) (a last axis of size "
            f"in = {in_features}), got shape {x_arr.shape}"
        )
    return x_arr


def bias_vector(bias: Any, out_features: int) -> np.ndarray | None:
    """The layer's bias (out,), or None."""
    if bias is None:
        return None
    b = _checks.float_array(bias, "bias", ndim=1)
    _checks.check_shape(b, "bias", (out_features,))
    return b


def keep_factor(dropout_mask: Any, dropout_p: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The inverted-dropout keep factor mask / (1 − p) (0 or 1/(1 − p) per element), or None without a mask."""
    mask, p = _checks.keep_mask(dropout_mask, dropout_p, shape)
    return None if mask is None else mask / (1.0 - p)


def base_weight(W: Any, fan_in_fan_out: Any, name: str = "W") -> np.ndarray:
    """A 2-D base weight in (out, in) layout (given (in, out) when ``fan_in_fan_out``)."""
    w = _checks.float_array(W, name, ndim=2)
    return w.T if _checks.boolean(fan_in_fan_out, "fan_in_fan_out") else w


# ---------------------------------------------------------------------------- records


def adapter_operands(
    x: Any,
    A: Any,
    B: Any,
    scaling: Any,
    *,
    in_features: int,
    out_features: int,
    bias: Any = None,
    dropout_mask: Any = None,
    dropout_p: Any = 0.0,
) -> AdapterOperands:
    """Check an input batch and an adapter against a base of shape (out, in) given some other way."""
    a, b = adapter_factors(A, B, in_features, out_features)
    x_arr = layer_input(x, in_features)
    return AdapterOperands(
        x=x_arr,
        A=a,
        B=b,
        scaling=scaling_factor(scaling),
        bias=bias_vector(bias, out_features),
        keep=keep_factor(dropout_mask, dropout_p, x_arr.shape),
    )


def linear_operands(
    x: Any,
    W: Any,
    A: Any,
    B: Any,
    scaling: Any,
    *,
    bias: Any = None,
    dropout_mask: Any = None,
    dropout_p: Any = 0.0,
    fan_in_fan_out: Any = False,
) -> LinearOperands:
    """Check a linear layer's operands: x (..., in), W (out, in) or (in, out) with ``fan_in_fan_out``,
    A (r, in), B (out, r), scaling, bias (out,) and a 0/1 keep mask of x's shape with p in [0, 1)."""
    transposed = _checks.boolean(fan_in_fan_out, "fan_in_fan_out")
    w = base_weight(W, transposed)
    ops = adapter_operands(
        x,
        A,
        B,
        scaling,
        in_features=w.shape[1],
        out_features=w.shape[0],
        bias=bias,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
    )
    return LinearOperands(
        x=ops.x, A=ops.A, B=ops.B, scaling=ops.scaling, bias=ops.bias, keep=ops.keep, W=w, fan_in_fan_out=transposed
    )


def linear_layer(
    W: Any,
    A: Any,
    B: Any,
    scaling: Any,
    *,
    fan_in_fan_out: Any = False,
    embedding: Any = False,
    allow_conv: bool = False,
    w_name: str = "W",
) -> LinearLayer:
    """Check a weight and its adapter (no input): W (out, in), (in, out) with ``fan_in_fan_out``, an
    embedding table E (V, d) with ``embedding`` (a Linear stored (in, out) with in = V), or, with
    ``allow_conv``, a ConvNd weight (out, in, *k) with A (r, in, *k) and B (out, r, 1, …)."""
    transposed = _checks.boolean(fan_in_fan_out, "fan_in_fan_out") | _checks.boolean(embedding, "embedding")
    w = _checks.float_array(W, w_name, ndim=range(2, 6) if allow_conv else 2)
    s = scaling_factor(scaling)
    if w.ndim == 2:
        w2 = w.T if transposed else w
        a2, b2 = adapter_factors(A, B, w2.shape[1], w2.shape[0])
        return LinearLayer(W=w2, A=a2, B=b2, scaling=s, transposed=transposed, w_shape=w.shape)
    if transposed:
        raise ValueError(
            f"fan_in_fan_out: a convolution weight has no transposed layout, got "
            f"{_checks.describe(w)} with fan_in_fan_out/embedding set"
        )
    a = _checks.float_array(A, "A", ndim=w.ndim)
    b = _checks.float_array(B, "B", ndim=w.ndim)
    _checks.check_shape(a, "A", (None, *w.shape[1:]))
    _checks.check_shape(b, "B", (w.shape[0], a.shape[0], *([1] * (w.ndim - 2))))
    return LinearLayer(
        W=w.reshape(w.shape[0], -1),
        A=a.reshape(a.shape[0], -1),
        B=b.reshape(b.shape[0], -1),
        scaling=s,
        transposed=False,
        w_shape=w.shape,
    )


def token_ids(ids: Any, vocab: int) -> np.ndarray:
    """Integer token ids (any shape, 0-D included) in [0, V)."""
    idx = np.asarray(ids)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"ids: expected an integer array of token ids, got {_checks.describe(idx)}")
    if idx.size and (idx.min() < 0 or idx.max() >= vocab):
        raise ValueError(f"ids: expected ids in [0, {vocab}), got values in [{idx.min()}, {idx.max()}]")
    return idx


# ---------------------------------------------------------------------------- many adapters in one batch


@dataclass(frozen=True)
class Adapter:
    """One adapter of a batch: A (r, in), B (out, r) and its scale s (α/r or α/√r)."""

    A: np.ndarray
    B: np.ndarray
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class BatchedOperands:
    """A multi-adapter batch (``lora.forward_batched``): tokens x (T, in), W (out, in), the adapters, one
    adapter index per token (int64, −1 for the base layer alone) and the bias (out,) or None."""

    x: np.ndarray
    W: np.ndarray
    adapters: tuple[Adapter, ...]
    adapter_index: np.ndarray
    bias: np.ndarray | None
    fan_in_fan_out: bool

    @property
    def out_features(self) -> int:
        return int(self.W.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.W.shape[1])


def batch_adapters(adapters: Any, in_features: int, out_features: int) -> tuple[Adapter, ...]:
    """A sequence of (A, B, scaling) triples, each A (r_i, in), B (out, r_i), s_i finite; ranks may differ."""
    if isinstance(adapters, (str, bytes, np.ndarray)) or not isinstance(adapters, (list, tuple)):
        raise TypeError(
            f"adapters: expected a list or tuple of (A, B, scaling) triples, got {_checks.describe(adapters)}"
        )
    out = []
    for i, item in enumerate(adapters):
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise TypeError(f"adapters[{i}]: expected an (A, B, scaling) triple, got {_checks.describe(item)}")
        a = _checks.float_array(item[0], f"adapters[{i}] A", ndim=2)
        b = _checks.float_array(item[1], f"adapters[{i}] B", ndim=2)
        _checks.check_shape(a, f"adapters[{i}] A", (None, in_features))
        _checks.check_shape(b, f"adapters[{i}] B", (out_features, a.shape[0]))
        out.append(Adapter(A=a, B=b, scaling=_checks.real(item[2], f"adapters[{i}] scaling")))
    return tuple(out)


def adapter_indices(adapter_index: Any, n_tokens: int, n_adapters: int) -> np.ndarray:
    """One integer per token in [−1, n_adapters): −1 is the base layer alone, i ≥ 0 selects adapters[i]."""
    idx = np.asarray(adapter_index)
    if idx.dtype.kind not in "iu":
        raise TypeError(
            f"adapter_index: expected an integer array (one adapter index per token), got {_checks.describe(idx)}"
        )
    if idx.shape != (n_tokens,):
        raise ValueError(
            f"adapter_index: expected shape ({n_tokens},) (one index per token of x), got shape {idx.shape}"
        )
    if idx.size and (idx.min() < -1 or idx.max() >= n_adapters):
        raise ValueError(
            f"adapter_index: expected values in [-1, {n_adapters}) (−1: no adapter; {n_adapters} adapters given), "
            f"got values in [{idx.min()}, {idx.max()}]"
        )
    return idx.astype(np.int64)


def batched_operands(
    x: Any, W: Any, adapters: Any, adapter_index: Any, *, bias: Any = None, fan_in_fan_out: Any = False
) -> BatchedOperands:
    """Check a multi-adapter batch: x (T, in), W (out, in) or (in, out) with ``fan_in_fan_out``, adapters a
    sequence of (A_i (r_i, in), B_i (out, r_i), s_i), adapter_index (T,) integers in [−1, n), bias (out,)."""
    transposed = _checks.boolean(fan_in_fan_out, "fan_in_fan_out")
    w = base_weight(W, transposed)
    out_f, in_f = w.shape
    x_arr = _checks.float_array(x, "x", ndim=2)
    if x_arr.shape[1] != in_f:
        raise ValueError(f"x: expected shape (T, {in_f}) (T tokens of in = {in_f} features), got shape {x_arr.shape}")
    ads = batch_adapters(adapters, in_f, out_f)
    return BatchedOperands(
        x=x_arr,
        W=w,
        adapters=ads,
        adapter_index=adapter_indices(adapter_index, x_arr.shape[0], len(ads)),
        bias=bias_vector(bias, out_f),
        fan_in_fan_out=transposed,
    )
