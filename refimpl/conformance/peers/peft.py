"""PEFT 0.21.2 as a conformance target (spec/lora.md, spec/dora.md, spec/merging.md).

Each call builds the PEFT layer the op describes, in float64 on CPU, loads the
case's tensors into it and reads the result back:

* ``lora.*``: ``peft.tuners.lora.layer.Linear`` over ``torch.nn.Linear`` (or GPT-2
  ``Conv1D`` when ``fan_in_fan_out``), ``Embedding`` over ``nn.Embedding``; the
  case's ``scaling`` is written into ``layer.scaling`` (``lora.scaling`` reads
  PEFT's own α/r or α/√r); dropout is PEFT's module slot filled with the case's
  keep mask (x ⊙ mask / (1 − p)) in training mode; backward is torch autograd.
* ``dora.forward`` / ``dora.merge``: the same layer with ``use_dora=True`` and
  the case's magnitude in ``lora_magnitude_vector``.
* ``merging.ties`` / ``magnitude_prune`` / ``task_arithmetic`` / ``dare``:
  ``peft.utils.merge_utils`` on stacked torch tensors, compared with refimpl's
  ``profile="peft"``; DARE's Bernoulli draw is replaced by the case's masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from refimpl.conformance.peers._torch_io import array as _np
from refimpl.conformance.peers._torch_io import keep_mask_dropout
from refimpl.conformance.peers._torch_io import tensor as _t
from refimpl.dora import DoraMerge
from refimpl.lora import LoraGrads

if TYPE_CHECKING:
    import torch

_ADAPTER = "default"


def _torch():
    import torch

    return torch


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """``module.weight`` of a layer that has a weight Parameter (lora_A / lora_B's nn.Linear, DoRA's magnitude
    layer); typed, as ``Module.__getattr__`` is ``Tensor | Module``."""
    import torch

    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def _linear_layer(
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
    *,
    fan_in_fan_out: bool,
    bias: np.ndarray | None = None,
    m: np.ndarray | None = None,
    dropout_mask: np.ndarray | None = None,
    dropout_p: float = 0.0,
):
    torch = _torch()
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    r = A.shape[0]
    n_out, n_in = B.shape[0], A.shape[1]
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(n_out, n_in).to(torch.float64)
    else:
        base = torch.nn.Linear(n_in, n_out, bias=bias is not None, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(_t(W))
        if bias is not None:
            base.bias.copy_(_t(bias))
        elif getattr(base, "bias", None) is not None:
            base.bias.zero_()
    cfg = LoraConfig(
        r=r,
        lora_alpha=r,
        fan_in_fan_out=fan_in_fan_out,
        use_dora=m is not None,
        lora_dropout=0.5 if dropout_mask is not None else 0.0,
    )
    layer = Linear(
        base,
        _ADAPTER,
        cfg,
        r=r,
        lora_alpha=r,
        fan_in_fan_out=fan_in_fan_out,
        is_target_conv_1d_layer=fan_in_fan_out,
        use_dora=m is not None,
        lora_dropout=0.5 if dropout_mask is not None else 0.0,
    )
    layer.to(torch.float64)
    with torch.no_grad():
        _weight(layer.lora_A[_ADAPTER]).copy_(_t(A))
        _weight(layer.lora_B[_ADAPTER]).copy_(_t(B))
        if m is not None:
            _weight(layer.lora_magnitude_vector[_ADAPTER]).copy_(_t(m))
    layer.scaling[_ADAPTER] = float(scaling)
    if dropout_mask is not None:
        layer.lora_dropout[_ADAPTER] = keep_mask_dropout(dropout_mask, dropout_p)
        layer.train()
    else:
        layer.eval()
    return layer


_TIES_RULES = ("k_rule", "elect", "zero_sign", "weight_stage", "divisor", "rescale")
_DARE_RULES = ("rescale", "normalize", "ties_density", "elect", "zero_sign", "weight_stage", "divisor")
_PEFT_OPTIONS: dict[str, dict[str, Any]] = {
    "merging.task_arithmetic": {"lam": 1.0, "normalize": False},
    "merging.ties": {"profile": "peft", "lam": 1.0, **dict.fromkeys(_TIES_RULES)},
    "merging.magnitude_prune": {"profile": "peft", "lam": 1.0, "k_rule": None, "rescale": None},
    "merging.dare": {"profile": "peft", "lam": 1.0, **dict.fromkeys(_DARE_RULES)},
}


class PeftTarget:
    """Adapts PEFT's layers and merge utilities to refimpl's op names."""

    name = "peft"

    def __init__(self) -> None:
        import peft  # noqa: F401 - fail early with ImportError when the peer is missing

        self._ops: dict[str, Callable[..., Any]] = {
            "lora.scaling": self.scaling,
            "lora.delta": self.delta,
            "lora.forward": self.forward,
            "lora.backward": self.backward,
            "lora.merge": self.merge,
            "lora.unmerge": self.unmerge,
            "lora.embedding_forward": self.embedding_forward,
            "dora.forward": self.dora_forward,
            "dora.merge": self.dora_merge,
            "merging.task_arithmetic": self.task_arithmetic,
            "merging.ties": self.ties,
            "merging.magnitude_prune": self.magnitude_prune,
            "merging.dare": self.dare,
        }

    def lookup(self, op: str) -> Callable[..., Any] | None:
        f = self._ops.get(op)
        return None if f is None else _quiet(f)

    def unsupported(self, op: str, case: dict[str, Any]) -> str | None:
        """Cases this adapter does not build PEFT layers for (reported as outside its declared domain)."""
        if op in ("lora.merge", "lora.unmerge") and case.get("dtype") is not None:
            return "the adapter builds float64 PEFT layers only (PEFT's bf16 merges: tests/test_lora_peft.py)"
        if op == "dora.merge":
            if case.get("dtype") is not None:
                return "the adapter builds float64 PEFT layers only"
            if case.get("embedding") or case.get("unmerged_base") is not None:
                return "the adapter wraps one Linear DoRA layer (no Embedding, no earlier merged adapter)"
            W = case.get("W")
            if W is None or np.ndim(W) != 2:
                return "the adapter wraps a Linear DoRA layer (PEFT's ConvNd DoRA layers are not adapted)"
        return None

    def options(self, op: str) -> dict[str, Any]:
        """PEFT's merge_utils have no λ, no normalize and none of refimpl's rule options: those are pinned to
        the ``peft`` profile's values (None = the profile's rule) for reference and target alike."""
        return dict(_PEFT_OPTIONS.get(op, {}))

    def compute_dtype(self, op: str) -> str:
        return "float64"

    # ------------------------------------------------------------------ LoRA

    def scaling(self, alpha: float, r: int, *, use_rslora: bool = False) -> float:
        torch = _torch()
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear

        base = torch.nn.Linear(r, r, bias=False, device="meta")
        # PEFT annotates lora_alpha as int but takes any real α (it computes α/r, α/√r in float)
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora)  # type: ignore[arg-type]
        layer = Linear(base, _ADAPTER, cfg, r=r, lora_alpha=alpha, use_rslora=use_rslora)  # type: ignore[arg-type]
        return float(layer.scaling[_ADAPTER])

    def delta(self, A, B, scaling, *, fan_in_fan_out=False):
        n_out, n_in = B.shape[0], A.shape[1]
        W = np.zeros((n_in, n_out) if fan_in_fan_out else (n_out, n_in))
        layer = _linear_layer(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out)
        return _np(layer.get_delta_weight(_ADAPTER))

    def forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None, dropout_p=0.0, fan_in_fan_out=False):
        layer = _linear_layer(
            W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p
        )
        with _torch().no_grad():
            return _np(layer(_t(x)))

    def backward(
        self,
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
        layer = _linear_layer(
            W,
            A,
            B,
            scaling,
            fan_in_fan_out=fan_in_fan_out,
            bias=np.zeros(B.shape[0]) if need_dbias else None,
            dropout_mask=dropout_mask,
            dropout_p=dropout_p,
        )
        base = layer.get_base_layer()
        base.weight.requires_grad_(bool(need_dW))
        if need_dbias:
            base.bias.requires_grad_(True)
        xt = _t(x, requires_grad=True)
        layer(xt).backward(_t(grad_y))
        return LoraGrads(
            dx=_np(xt.grad),
            dA=_np(layer.lora_A[_ADAPTER].weight.grad),
            dB=_np(layer.lora_B[_ADAPTER].weight.grad),
            dW=_np(base.weight.grad) if need_dW else None,
            dbias=_np(base.bias.grad) if need_dbias else None,
        )

    def merge(self, W, A, B, scaling, *, fan_in_fan_out=False, dtype=None, safe=False):
        if dtype is not None:
            raise NotImplementedError("the PEFT target merges in float64 only")
        layer = _linear_layer(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out)
        layer.merge(safe_merge=bool(safe))
        return _np(layer.get_base_layer().weight)

    def unmerge(self, W_merged, A, B, scaling, *, fan_in_fan_out=False, dtype=None):
        if dtype is not None:
            raise NotImplementedError("the PEFT target unmerges in float64 only")
        layer = _linear_layer(W_merged, A, B, scaling, fan_in_fan_out=fan_in_fan_out)
        layer.merged_adapters.append(_ADAPTER)
        layer.unmerge()
        return _np(layer.get_base_layer().weight)

    def embedding_forward(self, ids, E, A, B, scaling):
        torch = _torch()
        from peft import LoraConfig
        from peft.tuners.lora.layer import Embedding

        r = A.shape[0]
        base = torch.nn.Embedding(E.shape[0], E.shape[1], dtype=torch.float64)
        with torch.no_grad():
            base.weight.copy_(_t(E))
        layer = Embedding(base, _ADAPTER, LoraConfig(r=r, lora_alpha=r), r=r, lora_alpha=r)
        layer.to(torch.float64)
        with torch.no_grad():
            layer.lora_embedding_A[_ADAPTER].copy_(_t(A))
            layer.lora_embedding_B[_ADAPTER].copy_(_t(B))
        layer.scaling[_ADAPTER] = float(scaling)
        layer.eval()
        with torch.no_grad():
            return _np(layer(torch.tensor(np.asarray(ids), dtype=torch.long)))

    # ------------------------------------------------------------------ DoRA

    def dora_forward(
        self, x, W, A, B, m, scaling, *, bias=None, dropout_mask=None, dropout_p=0.0, fan_in_fan_out=False
    ):
        layer = _linear_layer(
            W,
            A,
            B,
            scaling,
            fan_in_fan_out=fan_in_fan_out,
            bias=bias,
            m=m,
            dropout_mask=dropout_mask,
            dropout_p=dropout_p,
        )
        with _torch().no_grad():
            return _np(layer(_t(x)))

    def dora_merge(self, W, A, B, m, scaling, *, fan_in_fan_out=False, embedding=False, unmerged_base=None, dtype=None):
        if embedding or unmerged_base is not None or dtype is not None:
            raise NotImplementedError("the PEFT target merges one Linear DoRA adapter in float64")
        layer = _linear_layer(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, m=m)
        layer.merge()
        norm = layer._cache_pop(f"{_ADAPTER}-weight_norm")
        return DoraMerge(W=_np(layer.get_base_layer().weight), weight_norm=_np(norm))

    # ------------------------------------------------------------------ merging (merge_utils)

    @staticmethod
    def _stack(task_vectors, weights):
        torch = _torch()
        tensors = [_t(t) for t in task_vectors]
        w = torch.ones(len(tensors), dtype=torch.float64) if weights is None else _t(np.asarray(weights, float))
        return tensors, w

    def task_arithmetic(self, task_vectors, weights=None, *, lam=1.0, normalize=False):
        from peft.utils import merge_utils

        if normalize or lam != 1.0:
            raise NotImplementedError("PEFT's task_arithmetic has no λ and no normalisation")
        tensors, w = self._stack(task_vectors, weights)
        return _np(merge_utils.task_arithmetic(tensors, w))

    def ties(self, task_vectors, weights=None, *, density, profile="peft", lam=1.0, **options):
        from peft.utils import merge_utils

        if profile != "peft" or lam != 1.0 or any(v is not None for v in options.values()):
            raise NotImplementedError("the PEFT target is compared with profile='peft' defaults")
        tensors, w = self._stack(task_vectors, weights)
        return _np(merge_utils.ties(tensors, w, float(density), majority_sign_method="total"))

    def magnitude_prune(self, task_vectors, weights=None, *, density, profile="peft", lam=1.0, **options):
        from peft.utils import merge_utils

        if profile != "peft" or lam != 1.0 or any(v is not None for v in options.values()):
            raise NotImplementedError("the PEFT target is compared with profile='peft' defaults")
        tensors, w = self._stack(task_vectors, weights)
        return _np(merge_utils.magnitude_prune(tensors, w, float(density)))

    def dare(
        self,
        task_vectors,
        weights=None,
        *,
        density,
        masks=None,
        rng=None,
        merge="linear",
        profile="peft",
        lam=1.0,
        **options,
    ):
        from peft.utils import merge_utils

        if masks is None or profile != "peft" or lam != 1.0 or any(v is not None for v in options.values()):
            raise NotImplementedError("the PEFT target needs masks and profile='peft' defaults")
        tensors, w = self._stack(task_vectors, weights)
        with _injected_bernoulli([np.asarray(mk, dtype=np.float64) for mk in masks]):
            if merge == "linear":
                return _np(merge_utils.dare_linear(tensors, w, float(density)))
            return _np(merge_utils.dare_ties(tensors, w, float(density), majority_sign_method="total"))


def _quiet(f: Callable[..., Any]) -> Callable[..., Any]:
    """PEFT warns on every call for some inputs (density ≥ 1, meta tensors): keep the report readable."""
    import functools
    import warnings

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return f(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _injected_bernoulli(masks: list[np.ndarray]):
    """Replace torch.bernoulli for the duration of one PEFT DARE call: the i-th draw returns masks[i]
    (PEFT draws one Bernoulli tensor per task, in task order; ``utils/merge_utils.py`` ``random_pruning``)."""
    torch = _torch()
    original = torch.bernoulli
    queue = list(masks)

    def fake(p, *args, **kwargs):
        if not queue:
            raise RuntimeError("more Bernoulli draws than masks")
        return _t(queue.pop(0)).to(p.dtype)

    torch.bernoulli = fake
    try:
        yield
    finally:
        torch.bernoulli = original
