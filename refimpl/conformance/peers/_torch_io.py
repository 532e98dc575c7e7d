"""Shared by the torch-based peer targets (PEFT, torchtune): float64 tensors in, NumPy out, and dropout with a
fixed keep mask. torch is imported inside each function: it is an optional dependency (the ``peers`` and
``torchpeers`` extras)."""

from __future__ import annotations

from typing import Any

import numpy as np


def tensor(a: Any, requires_grad: bool = False):
    """A float64 torch tensor holding ``a`` exactly."""
    import torch

    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64).requires_grad_(requires_grad)


def array(t) -> np.ndarray:
    """A float64 NumPy copy of a torch tensor (detached, on the CPU)."""
    return t.detach().cpu().numpy().astype(np.float64)


def keep_mask_dropout(mask: np.ndarray, p: float):
    """An nn.Module applying inverted dropout with a fixed keep mask: x ⊙ mask / (1 − p)."""
    import torch

    class KeepMaskDropout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", tensor(mask))
            self.p = float(p)

        def forward(self, x):
            return x * self.mask / (1.0 - self.p)

    return KeepMaskDropout()
