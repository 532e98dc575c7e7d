"""torchtune's LoRA and DoRA layers (``torchtune.modules.peft``, torchtune 0.6.1) as a conformance target.

Each call builds the torchtune layer the op describes, in float64 on CPU, loads the case's tensors into
it and reads the result back:

* ``lora.scaling``: ``LoRALinear(…, rank=r, alpha=α)``'s α/r (torchtune has no rsLoRA).
* ``lora.forward`` / ``lora.backward``: ``LoRALinear`` (``use_bias`` when the case has a bias); the
  case's scaling becomes α = s·r (nudged by an ulp where (s·r)/r ≠ s); dropout is the layer's
  ``dropout`` slot filled with the case's keep mask (x ⊙ mask / (1 − p)); backward is torch autograd.
* ``lora.merge``: ``get_merged_lora_ckpt`` on the layer's state dict.
* ``dora.forward``: ``DoRALinear`` with the case's magnitude; ``dora.merge``: ``get_merged_lora_ckpt``
  with the magnitude in the state dict, and the layer's own ``_get_weight_norm`` for ‖W + s·B A‖.

torchtune stores W as (out, in) only: ``fan_in_fan_out`` cases are outside its domain, as are merges
into another storage dtype (the adapter builds float64 layers); ``supports`` declares the domain, so the
properties tier draws only inside it and the report names the rest.

Findings (``known_divergences.toml``, bench/reproducers/):

* a bug: ``DoRALinear.forward`` returns (m/‖V‖ − 1)·base_out + … + base_out with base_out = x Wᵀ + b,
  so the bias is scaled by m/‖V‖: y = f ⊙ (x Wᵀ + b) + f ⊙ s·(x Aᵀ) Bᵀ instead of … + b. These cases
  stay failures (bench/reproducers/torchtune_dora_bias.py);
* a bug: for an unbatched x of shape (in,) ``DoRALinear.forward`` returns shape (1, out), not the (out,) its
  docstring promises (``(m / ‖V‖).view(1, -1)`` broadcast against the output); nn.Linear and LoRALinear
  keep (out,). These cases stay failures (bench/reproducers/torchtune_dora_unbatched_shape.py);
* a design difference: with dropout torchtune computes f ⊙ (x Wᵀ) + b + f ⊙ s·(x_d Aᵀ) Bᵀ (the base
  term sees the magnitude scale but not the dropout) where PEFT and refimpl's train form have
  x Wᵀ + b + (f − 1) ⊙ (x_d Wᵀ) + f ⊙ s·(x_d Aᵀ) Bᵀ; ``dora_dropout_model`` reproduces it bit for bit
  for bias-free layers (with a bias, the bias bug makes the case a failure).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from refimpl.conformance.peers._torch_io import array as _np
from refimpl.conformance.peers._torch_io import keep_mask_dropout
from refimpl.conformance.peers._torch_io import tensor as _t
from refimpl.dora import DoraMerge
from refimpl.lora import LoraGrads

#: the version this adapter was written against
TESTED_VERSION = "0.6.1"


def _torch():
    import torch

    return torch


def alpha_for(scaling: float, r: int) -> float:
    """An α with α / r == scaling exactly in float64 (s·r, or a neighbour of it), so that torchtune's
    α/r is the case's scaling."""
    s = float(scaling)
    base = s * r
    for cand in (base, np.nextafter(base, np.inf), np.nextafter(base, -np.inf)):
        if float(cand) / r == s:
            return float(cand)
    return base


def _layer(W, A, B, scaling, *, bias=None, m=None, dropout_mask=None, dropout_p=0.0):
    """A float64 torchtune LoRALinear (m None) or DoRALinear holding the case's tensors."""
    torch = _torch()
    from torchtune.modules.peft import DoRALinear, LoRALinear

    r, n_in = np.shape(A)
    n_out = np.shape(B)[0]
    cls = LoRALinear if m is None else DoRALinear
    layer = cls(n_in, n_out, rank=r, alpha=alpha_for(scaling, r), dropout=0.0, use_bias=bias is not None)
    layer.to(torch.float64)
    with torch.no_grad():
        layer.weight.copy_(_t(W))
        if bias is not None:
            layer.bias.copy_(_t(bias))
        layer.lora_a.weight.copy_(_t(A))
        layer.lora_b.weight.copy_(_t(B))
        if m is not None:
            layer.magnitude.copy_(_t(m))
            layer.scaling = float(scaling)
    if dropout_mask is not None:
        layer.dropout = keep_mask_dropout(dropout_mask, dropout_p)
        layer.train()
    else:
        layer.eval()
    return layer


class TorchtuneTarget:
    """Adapts torchtune's LoRALinear / DoRALinear and get_merged_lora_ckpt to refimpl's op names."""

    name = "torchtune"

    def __init__(self) -> None:
        from torchtune.modules import peft  # noqa: F401 - fail early with ImportError when the peer is missing

        self._ops: dict[str, Callable[..., Any]] = {
            "lora.scaling": self.scaling,
            "lora.forward": self.forward,
            "lora.backward": self.backward,
            "lora.merge": self.merge,
            "dora.forward": self.dora_forward,
            "dora.merge": self.dora_merge,
        }

    def lookup(self, op: str) -> Callable[..., Any] | None:
        return self._ops.get(op)

    def provided_ops(self) -> list[str]:
        return sorted(self._ops)

    def compute_dtype(self, op: str) -> str:
        return "float64"

    def supports(self, op: str) -> dict[str, set[Any]]:
        """What torchtune's layers express: W stored as (out, in) only (no fan_in_fan_out / Conv1D layout), no
        rsLoRA; merges of one float64 Linear layer (the adapter builds float64 layers; get_merged_lora_ckpt has
        no safe merge, DoRALinear no Embedding or ConvNd form and no earlier merged adapter)."""
        layout: dict[str, set[Any]] = {"fan_in_fan_out": {False}}
        return {
            "lora.scaling": {"use_rslora": {False}},
            "lora.forward": layout,
            "lora.backward": layout,
            "lora.merge": {**layout, "dtype": {None}, "safe": {False}},
            "dora.forward": layout,
            "dora.merge": {**layout, "dtype": {None}, "embedding": {False}, "unmerged_base": {None}, "W.ndim": {2}},
        }.get(op, {})

    def notes(self) -> list[str]:
        import torch
        import torchtune

        return [
            f"torchtune {torchtune.__version__} (adapter written for {TESTED_VERSION}), torch {torch.__version__}, "
            "float64 on CPU: LoRALinear / DoRALinear.forward (F.linear; no quantize_base), "
            "get_merged_lora_ckpt for the merges"
        ]

    # ------------------------------------------------------------------ LoRA

    def scaling(self, alpha: float, r: int, *, use_rslora: bool = False) -> float:
        from torchtune.modules.peft import LoRALinear

        if use_rslora:
            raise NotImplementedError("torchtune has no rsLoRA")
        layer = LoRALinear(1, 1, rank=int(r), alpha=alpha)
        return float(layer.alpha / layer.rank)

    def forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None, dropout_p=0.0, fan_in_fan_out=False):
        if fan_in_fan_out:
            raise NotImplementedError("torchtune stores W as (out, in)")
        layer = _layer(W, A, B, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p)
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
        if fan_in_fan_out:
            raise NotImplementedError("torchtune stores W as (out, in)")
        layer = _layer(
            W,
            A,
            B,
            scaling,
            bias=np.zeros(np.shape(B)[0]) if need_dbias else None,
            dropout_mask=dropout_mask,
            dropout_p=dropout_p,
        )
        layer.weight.requires_grad_(bool(need_dW))
        xt = _t(x, requires_grad=True)
        layer(xt).backward(_t(grad_y))
        return LoraGrads(
            dx=_np(xt.grad),
            dA=_np(layer.lora_a.weight.grad),
            dB=_np(layer.lora_b.weight.grad),
            dW=_np(layer.weight.grad) if need_dW else None,
            dbias=_np(layer.bias.grad) if need_dbias else None,
        )

    def merge(self, W, A, B, scaling, *, fan_in_fan_out=False, dtype=None, safe=False):
        from torchtune.modules.peft import get_merged_lora_ckpt

        if fan_in_fan_out or dtype is not None or safe:
            raise NotImplementedError("the torchtune target merges (out, in) float64 weights, unsafe")
        r = np.shape(A)[0]
        layer = _layer(W, A, B, scaling)
        sd = {f"layer.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
        merged = get_merged_lora_ckpt(sd, rank=r, alpha=alpha_for(scaling, r))
        return _np(merged["layer.weight"])

    # ------------------------------------------------------------------ DoRA

    def dora_forward(
        self, x, W, A, B, m, scaling, *, bias=None, dropout_mask=None, dropout_p=0.0, fan_in_fan_out=False
    ):
        if fan_in_fan_out:
            raise NotImplementedError("torchtune stores W as (out, in)")
        layer = _layer(W, A, B, scaling, bias=bias, m=m, dropout_mask=dropout_mask, dropout_p=dropout_p)
        with _torch().no_grad():
            return _np(layer(_t(x)))

    def dora_merge(self, W, A, B, m, scaling, *, fan_in_fan_out=False, embedding=False, unmerged_base=None, dtype=None):
        torch = _torch()
        from torchtune.modules.peft import get_merged_lora_ckpt

        if fan_in_fan_out or embedding or unmerged_base is not None or dtype is not None:
            raise NotImplementedError("the torchtune target merges one (out, in) float64 DoRA Linear layer")
        r = np.shape(A)[0]
        layer = _layer(W, A, B, scaling, m=m)
        with torch.no_grad():
            norm = layer._get_weight_norm(layer.weight, layer.lora_b.weight @ layer.lora_a.weight)
        sd = {f"layer.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
        merged = get_merged_lora_ckpt(sd, rank=r, alpha=alpha_for(scaling, r))
        return DoraMerge(W=_np(merged["layer.weight"]), weight_norm=_np(norm))

    def reproducer(self, op: str, case: dict[str, Any]) -> str | None:
        """The upstream reproducer of the DoRA bug a dora.forward case shows: the unbatched shape (x of one
        dimension), else the bias scaled by m/‖V‖ (a case with a bias)."""
        if op != "dora.forward":
            return None
        if "x" in case and np.ndim(case["x"]) == 1:
            name = "torchtune_dora_unbatched_shape.py"
        elif case.get("bias") is not None:
            name = "torchtune_dora_bias.py"
        else:
            return None
        from pathlib import Path

        path = Path(__file__).resolve().parents[3] / "bench" / "reproducers" / name
        return path.read_text(encoding="utf-8") if path.is_file() else None


# ---------------------------------------------------------------------------- divergence models


def _dora_bias_once(case: dict[str, Any]) -> np.ndarray:
    """torchtune's DoRALinear.forward with the bias added once (its design, without its bias bug):

        y = ((f − 1) ⊙ x Wᵀ + f ⊙ (x_d Aᵀ Bᵀ) · s) + x Wᵀ + b,   f = (m / ‖W + s·B A‖).view(1, −1)

    evaluated with torch in float64 in torchtune's order (``lora_b(lora_a(eye)).T`` for B A, f as a (1, out)
    row), so it matches torchtune bit for bit wherever the layer has no bias."""
    torch = _torch()
    import torch.nn.functional as F

    x, W, A, B, m = (_t(case[k]) for k in ("x", "W", "A", "B", "m"))
    s = float(case["scaling"])
    xd = (
        x
        if case.get("dropout_mask") is None
        else x * _t(case["dropout_mask"]) / (1.0 - float(case.get("dropout_p", 0.0)))
    )
    with torch.no_grad():
        base = F.linear(x, W)
        lora_out = F.linear(F.linear(xd, A), B)
        eye = torch.eye(A.shape[1], dtype=torch.float64)
        lora_weight = F.linear(F.linear(eye, A), B).T
        norm = torch.linalg.norm(W + s * lora_weight, dim=1)
        f = (m / norm).view(1, -1)
        y = (f - 1) * base + f * lora_out * s + base
        if case.get("bias") is not None:
            y = y + _t(case["bias"])
    # the shape torchtune documents, (..., out): its (1, out) for an unbatched x is a bug the model must not hide
    return _np(y).reshape(*x.shape[:-1], W.shape[0])


def dora_dropout_model(op: str, case: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any] | None:
    """torchtune's DoRA dropout form (``_dora_bias_once``); None for a case without a dropout mask."""
    if op != "dora.forward" or case.get("dropout_mask") is None or case.get("fan_in_fan_out"):
        return None
    return {"out": _dora_bias_once(case)}
