"""Task vectors, task arithmetic and the linear (weight-averaging) merge.

Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv 2212.04089.
Linear merge ("model soups"): Wortsman et al., arXiv 2203.05482.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import _checks, precision
from refimpl.merging import operands


def _is_float_array(x: Any) -> bool:
    """True for floating tensors (float16/bfloat16/float32/float64); integer and bool buffers are not."""
    return np.dtype(_checks._to_numpy(x, "x").dtype) in _checks.FLOAT_DTYPES


@precision._overflow_checked
def task_vector(
    finetuned: npt.ArrayLike | Mapping[str, npt.ArrayLike], base: npt.ArrayLike | Mapping[str, npt.ArrayLike]
) -> npt.NDArray[np.float64] | dict[str, npt.NDArray[np.float64]]:
    """τ = θ_t − θ₀ (Ilharco et al. 2023, §2), in float64.

    Arrays: both must be floating point, of one shape and one dtype.
    Mappings (state dicts): τ has one entry per *floating* key of ``base``;
    integer/bool buffers (e.g. ``position_ids``) are skipped, as in the official
    ``task_vectors`` code. A floating key of ``base`` missing from ``finetuned``,
    or of another shape, raises ValueError.
    """
    if isinstance(base, Mapping) or isinstance(finetuned, Mapping):
        if not (isinstance(base, Mapping) and isinstance(finetuned, Mapping)):
            raise TypeError(
                "finetuned, base: expected two arrays or two mappings, got "
                f"{_checks.describe(finetuned)} and {_checks.describe(base)}"
            )
        out: dict[str, npt.NDArray[np.float64]] = {}
        for key, b in base.items():
            if not _is_float_array(b):
                continue
            if key not in finetuned:
                raise ValueError(f"finetuned: expected key {key!r} (a floating tensor of base), it is missing")
            out[key] = _array_task_vector(finetuned[key], b)
        return out
    return _array_task_vector(finetuned, base)


def _array_task_vector(finetuned: npt.ArrayLike, base: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """τ = θ_t − θ₀ of two float arrays of one shape and one dtype."""
    b, b_dtype = operands.as_float(base, "base")
    f, f_dtype = operands.as_float(finetuned, "finetuned")
    _checks.same_shape(b, "base", f, "finetuned")
    if f_dtype != b_dtype:
        raise ValueError(f"finetuned: expected dtype {b_dtype} (the dtype of base), got dtype {f_dtype}")
    return f - b


@precision._overflow_checked
def task_arithmetic(
    task_vectors: Sequence[npt.ArrayLike],
    weights: npt.ArrayLike | None = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
) -> npt.NDArray[np.float64]:
    """Merged task vector λ·Σ_t w_t τ_t (add it to θ₀ to get the merged model).

    Ilharco et al. 2023 (arXiv 2212.04089) eq. θ = θ₀ + λ Σ_t τ_t has one λ and
    no per-task weights (w_t = 1); PEFT's ``task_arithmetic`` is Σ_t w_t τ_t
    (λ = 1); mergekit's ``task_arithmetic`` is λ·Σ_t w_t τ_t, divided by Σ_t w_t
    when ``normalize`` (mergekit replaces |Σ w| < 1e-8 by 1; here that raises).
    Negation is a negative weight or a negative λ: θ = θ₀ − λ τ.
    """
    ops = operands.task_operands(task_vectors, weights, lam=lam)
    if _checks.boolean(normalize, "normalize"):
        operands.normalizable(ops.weights)
    return _task_arithmetic(ops.taus, ops.weights, ops.lam, normalize)


# core: the formula (spec/merging.md §3)


def _task_arithmetic(taus: list[np.ndarray], weights: np.ndarray, lam: float, normalize: bool) -> np.ndarray:
    """λ·Σ_t w_t τ_t (÷ Σ_t w_t with ``normalize``), summed in task order."""
    merged = np.zeros(taus[0].shape)
    for tau, w in zip(taus, weights, strict=True):
        merged += w * tau
    if normalize:
        merged /= weights.sum()
    merged *= lam
    return merged


@precision._overflow_checked
def linear(
    tensors: Sequence[npt.ArrayLike], weights: npt.ArrayLike | None = None, *, normalize: bool = True
) -> npt.NDArray[np.float64]:
    """Weighted average of full weights, Σ_t w_t θ_t / Σ_t w_t (``normalize``), else Σ_t w_t θ_t.

    mergekit ``linear`` (Wortsman et al., "Model soups", arXiv 2203.05482).
    mergekit divides by Σ w with no guard (inf/NaN when Σ w = 0); here Σ w = 0
    with ``normalize`` raises ValueError.
    """
    thetas = operands.task_list(tensors, "tensors")
    w = operands.weight_vector(weights, len(thetas))
    normalize = _checks.boolean(normalize, "normalize")
    stacked = operands.stack(thetas)
    merged = (stacked * operands.bcast(w, stacked.ndim)).sum(axis=0)
    if normalize:
        total = float(w.sum())
        if total == 0.0:
            raise ValueError("weights: normalize=True needs Σ w ≠ 0, got Σ w = 0")
        merged = merged / total
    return merged


@dataclass(frozen=True)
class ModelLayout:
    """How a flattened model vector maps back to named tensors (sorted key order)."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(int(n) for n in s) for s in self.shapes)  # Python ints: no int64 overflow


def flatten_model(
    state: Mapping[str, npt.ArrayLike], *, remove_keys: Sequence[str] = ()
) -> tuple[npt.NDArray[np.float64], ModelLayout]:
    """Concatenate a model's floating tensors, keys sorted by name, into one float64 vector.

    This is the official TIES / MergeLM "whole model" scope (``state_dict_to_vector``):
    a trim or sign election applied to the vector sees every parameter at once.
    ``remove_keys`` drops tied copies (the official code lists T5's tied embeddings).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping of name -> array, got {_checks.describe(state)}")
    removed = set(remove_keys)
    keys = tuple(sorted(k for k, v in state.items() if k not in removed and _is_float_array(v)))
    if not keys:
        raise ValueError("state: expected at least one floating tensor, got none")
    parts = [operands.as_float(state[k], f"state[{k!r}]")[0] for k in keys]
    layout = ModelLayout(keys, tuple(p.shape for p in parts))
    return np.concatenate([p.ravel() for p in parts]), layout


def unflatten_model(vector: npt.ArrayLike, layout: ModelLayout) -> dict[str, npt.NDArray[np.float64]]:
    """Split a flattened model vector back into named tensors (inverse of ``flatten_model``)."""
    if not isinstance(layout, ModelLayout):
        raise TypeError(f"layout: expected a ModelLayout, got {_checks.describe(layout)}")
    vec = _checks.float_array(vector, "vector", ndim=1, allow_nonfinite=True)
    total = sum(layout.sizes)
    if vec.size != total:
        raise ValueError(f"vector: expected {total} elements (the layout's total), got {vec.size}")
    out, start = {}, 0
    for key, shape, size in zip(layout.keys, layout.shapes, layout.sizes, strict=True):
        out[key] = vec[start : start + size].reshape(shape)
        start += size
    return out
