"""AdamW with decoupled weight decay, and LoRA+ learning-rate groups.

AdamW (Loshchilov & Hutter, arXiv 1711.05101), in torch.optim.AdamW's order, per parameter θ
with gradient g at step t (1-based):

    θ ← θ − η λ θ                                  (decoupled weight decay, applied first)
    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
    θ ← θ − η · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)

LoRA+ (Hayou et al., arXiv 2402.12354) gives B a learning rate η·ratio. Groups follow PEFT's
``create_loraplus_optimizer`` (PEFT 0.21.2 ``optimizers/loraplus.py``): a parameter whose name contains "lora_B"
**or that is 1-D** (so the DoRA magnitude too) gets η·ratio; everything else gets η. Unlike PEFT,
``weight_decay`` here applies to every group (PEFT silently replaces it by
``loraplus_weight_decay``, default 0.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl import _checks


@dataclass(frozen=True)
class AdamWConfig:
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    loraplus_ratio: float = 1.0

    def __post_init__(self) -> None:
        _checks.real(self.lr, "lr", low=0.0, low_inclusive=False)
        _checks.real(self.beta1, "beta1", low=0.0, high=1.0, high_inclusive=False)
        _checks.real(self.beta2, "beta2", low=0.0, high=1.0, high_inclusive=False)
        _checks.real(self.eps, "eps", low=0.0, low_inclusive=False)
        _checks.real(self.weight_decay, "weight_decay", low=0.0)
        _checks.real(self.loraplus_ratio, "loraplus_ratio", low=0.0, low_inclusive=False)


def learning_rates(params: dict[str, np.ndarray], cfg: AdamWConfig) -> dict[str, float]:
    """Per-parameter learning rate under LoRA+'s group rule (ratio 1 = plain AdamW)."""
    return {k: cfg.lr * cfg.loraplus_ratio if ("lora_B" in k or v.ndim == 1) else cfg.lr for k, v in params.items()}


def init_state(params: dict[str, np.ndarray]) -> dict[str, object]:
    """Zero first and second moments and step counter 0."""
    return {
        "t": 0,
        "m": {k: np.zeros_like(v) for k, v in params.items()},
        "v": {k: np.zeros_like(v) for k, v in params.items()},
    }


def adamw_step(
    params: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    state: dict,
    cfg: AdamWConfig,
    lrs: dict[str, float] | None = None,
) -> None:
    """One AdamW step, updating ``params`` and ``state`` in place (parameters without a gradient are skipped)."""
    lrs = learning_rates(params, cfg) if lrs is None else lrs
    state["t"] += 1
    t = state["t"]
    c1 = 1.0 - cfg.beta1**t
    c2 = 1.0 - cfg.beta2**t
    for k, g in grads.items():
        p = params[k]
        lr = lrs[k]
        if cfg.weight_decay:
            p *= 1.0 - lr * cfg.weight_decay
        m = state["m"][k]
        v = state["v"][k]
        m *= cfg.beta1
        m += (1.0 - cfg.beta1) * g
        v *= cfg.beta2
        v += (1.0 - cfg.beta2) * g * g
        p -= lr * (m / c1) / (np.sqrt(v / c2) + cfg.eps)
