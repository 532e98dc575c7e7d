"""mergekit 0.1.5 as a conformance target (``merge_methods/generalized_task_arithmetic.py``, ``sparsify.py``).

Each op runs mergekit's own per-tensor merge, ``GeneralizedTaskArithmeticMerge.merge_group``,
on a ``TensorGroup`` whose base is zeros and whose inputs are the task vectors (so
θ_t − θ₀ = τ_t exactly), in float64 on CPU, and is compared with refimpl's
``profile="mergekit"``:

* ``merging.task_arithmetic``: method ``task_arithmetic`` (weights, ``lambda``, ``normalize``);
* ``merging.ties``: method ``ties`` (magnitude sparsification, sum consensus, normalize=True);
* ``merging.dare``: ``dare_linear`` / ``dare_ties`` (Bernoulli sparsification with the L1
  rescale); mergekit's ``torch.bernoulli`` draw is replaced by the case's keep masks, one per
  task in input order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np


def _merge(method: str, task_vectors, weights, densities=None, **params: Any) -> np.ndarray:
    import torch
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    taus = [torch.tensor(np.asarray(t, dtype=np.float64)) for t in task_vectors]
    base = torch.zeros_like(taus[0])
    group = TensorGroup.from_tensors([base, *taus], base_index=0)
    ids = range(1, len(taus) + 1)
    w = [1.0] * len(taus) if weights is None else [float(v) for v in weights]
    parameters: dict[str, Any] = {"int8_mask": False, "weight": dict(zip(ids, w, strict=True))}
    if densities is not None:
        parameters["density"] = dict(zip(ids, densities, strict=True))
    else:
        parameters["density"] = dict.fromkeys(ids, 1.0)
    parameters.update(params)
    out = registry.get(method).merge_group(group, **parameters)
    return out.detach().numpy().astype(np.float64)


def _densities(density, n: int) -> list[float]:
    if isinstance(density, (list, tuple, np.ndarray)):
        return [float(d) for d in density]
    return [float(density)] * n


_MERGEKIT_OPTIONS: dict[str, dict[str, Any]] = {
    "merging.ties": {
        "profile": "mergekit",
        **dict.fromkeys(("k_rule", "elect", "zero_sign", "weight_stage", "divisor", "rescale")),
    },
    "merging.dare": {
        "profile": "mergekit",
        **dict.fromkeys(("rescale", "normalize", "ties_density", "elect", "zero_sign", "weight_stage", "divisor")),
    },
}


class MergekitTarget:
    """Adapts mergekit's generalized task arithmetic to refimpl.merging's op names."""

    name = "mergekit"

    def __init__(self) -> None:
        import mergekit.merge_methods.registry  # noqa: F401 - fail early when the peer is missing

        self._ops: dict[str, Callable[..., Any]] = {
            "merging.task_arithmetic": self.task_arithmetic,
            "merging.ties": self.ties,
            "merging.dare": self.dare,
        }

    def lookup(self, op: str) -> Callable[..., Any] | None:
        return self._ops.get(op)

    def options(self, op: str) -> dict[str, Any]:
        """The ``mergekit`` profile with refimpl's rule options at the profile's values (λ stays free)."""
        return dict(_MERGEKIT_OPTIONS.get(op, {}))

    def compute_dtype(self, op: str) -> str:
        # sparsify.bernoulli works in float32 on CPU (mergekit 0.1.5 ``sparsify.bernoulli``), so DARE rounds to float32
        return "float32" if op == "merging.dare" else "float64"

    def task_arithmetic(self, task_vectors, weights=None, *, lam=1.0, normalize=False):
        return _merge(
            "task_arithmetic", task_vectors, weights, normalize=bool(normalize), rescale=False, **{"lambda": float(lam)}
        )

    def ties(self, task_vectors, weights=None, *, density, profile="mergekit", lam=1.0, **options):
        if profile != "mergekit" or any(v is not None for v in options.values()):
            raise NotImplementedError("the mergekit target is compared with profile='mergekit' defaults")
        return _merge(
            "ties",
            task_vectors,
            weights,
            _densities(density, len(task_vectors)),
            normalize=True,
            rescale=False,
            **{"lambda": float(lam)},
        )

    def dare(
        self,
        task_vectors,
        weights=None,
        *,
        density,
        masks=None,
        rng=None,
        merge="linear",
        profile="mergekit",
        lam=1.0,
        **options,
    ):
        if masks is None or profile != "mergekit" or any(v is not None for v in options.values()):
            raise NotImplementedError("the mergekit target needs masks and profile='mergekit' defaults")
        method = "dare_linear" if merge == "linear" else "dare_ties"
        with _injected_bernoulli([np.asarray(m, dtype=np.float64) for m in masks]):
            return _merge(
                method,
                task_vectors,
                weights,
                _densities(density, len(task_vectors)),
                normalize=False,
                rescale=True,
                **{"lambda": float(lam)},
            )


@contextlib.contextmanager
def _injected_bernoulli(masks: list[np.ndarray]):
    """mergekit.sparsify.bernoulli draws one torch.bernoulli mask per task, in input order."""
    import torch

    queue = list(masks)

    def fake(p, *args: Any, **kwargs: Any):
        if not queue:
            raise RuntimeError("more Bernoulli draws than masks")
        return torch.tensor(queue.pop(0)).to(p.dtype)

    with mock.patch.object(torch, "bernoulli", fake):
        yield
