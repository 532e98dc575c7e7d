"""The lesson's decision tree: name a LoRA failure mode from the training and validation curves.

The lesson's signatures, made measurable. Losses are compared with a reference level L_ref:
the chance-level cross-entropy ln(n_classes) when ``chance_loss`` is given (the lab passes it),
else the first point of the training curve.

1. **rank_too_low** — "a flat training loss": training never gets far below the reference,
   ``train_end > flat_fraction · L_ref``. Fix: raise r (16, 32, 64).
2. **wrong_layers** — "training loss decreases normally, but validation is mediocre": training
   falls below ``flat_fraction · L_ref`` but validation never gets below
   ``mediocre_fraction · L_ref``. Fix: target all linear layers at a lower rank.
3. **overfitting** — "a widening gap": validation did improve, but the gap val − train has
   widened since the first point by more than ``gap_fraction · L_ref``,
   or every one of the last ``tail`` validation points lies more than ``rise_fraction · L_ref``
   above validation's best.
   Fix: more/diverse data, dropout 0.05–0.1, weight decay 0.01–0.1.
4. **healthy** — otherwise.

"End" values are the mean of the last ``tail`` points, so a single noisy point does not decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from refimpl import _checks

LABELS = ("healthy", "rank_too_low", "wrong_layers", "overfitting")
_FIXES = {
    "healthy": "nothing to fix",
    "rank_too_low": "increase the rank (16, 32, 64) or target more layers",
    "wrong_layers": "apply LoRA to all linear layers (Q, K, V, O, up, down) at a proportionally lower rank",
    "overfitting": "add data or diversify it, dropout 0.05-0.1, weight decay 0.01-0.1, or stop earlier",
}


@dataclass(frozen=True)
class Diagnosis:
    label: str
    evidence: dict[str, float]
    reason: str
    fix: str

    def __str__(self) -> str:
        figures = ", ".join(f"{k}={v:.3f}" for k, v in self.evidence.items())
        return f"{self.label}: {self.reason} [{figures}] -> {self.fix}"


def _curve(x: Sequence[float], name: str) -> np.ndarray:
    arr = _checks.float_array(x, name, ndim=1)
    if arr.shape[0] < 3:
        raise ValueError(f"{name}: expected at least 3 points, got {arr.shape[0]}")
    return arr


def diagnose(
    train_curve: Sequence[float],
    val_curve: Sequence[float],
    *,
    chance_loss: float | None = None,
    flat_fraction: float = 0.5,
    mediocre_fraction: float = 0.75,
    gap_fraction: float = 0.1,
    rise_fraction: float = 0.1,
    tail: int = 3,
) -> Diagnosis:
    """Label a pair of loss curves (same evaluation steps) as healthy, rank_too_low,
    wrong_layers or overfitting, with the figures that decided it."""
    tr = _curve(train_curve, "train_curve")
    va = _curve(val_curve, "val_curve")
    _checks.same_shape(tr, "train_curve", va, "val_curve")
    ref = float(tr[0]) if chance_loss is None else _checks.real(chance_loss, "chance_loss", low=0.0,
                                                                  low_inclusive=False)
    if ref <= 0:
        raise ValueError(f"train_curve: expected a positive first loss as the reference, got {ref}")
    for name, v in (("flat_fraction", flat_fraction), ("mediocre_fraction", mediocre_fraction),
                    ("gap_fraction", gap_fraction), ("rise_fraction", rise_fraction)):
        _checks.real(v, name, low=0.0, low_inclusive=False)
    k = min(_checks.integer(tail, "tail", low=1), tr.shape[0])
    train_end = float(tr[-k:].mean())
    val_end = float(va[-k:].mean())
    best = int(np.argmin(va))
    val_min = float(va[best])
    gap_end = val_end - train_end
    val_rise = float(va[-k:].min()) - val_min  # > 0 only when every tail point is above the best
    gap_at_best = float(va[best] - tr[best])
    gap_start = float(va[0] - tr[0])
    ev = {
        "reference_loss": ref,
        "train_end": train_end,
        "val_end": val_end,
        "val_min": val_min,
        "train_end/ref": train_end / ref,
        "val_min/ref": val_min / ref,
        "gap_start/ref": gap_start / ref,
        "gap_end/ref": gap_end / ref,
        "gap_at_val_min/ref": gap_at_best / ref,
        "val_rise/ref": val_rise / ref,
    }
    if train_end > flat_fraction * ref:
        label = "rank_too_low"
        reason = f"training loss stays high: it ends at {train_end / ref:.2f} x the reference (> {flat_fraction})"
    elif val_min > mediocre_fraction * ref:
        label = "wrong_layers"
        reason = (f"training falls to {train_end / ref:.2f} x the reference but validation never gets below "
                  f"{val_min / ref:.2f} x (> {mediocre_fraction})")
    elif gap_end - gap_start > gap_fraction * ref or val_rise > rise_fraction * ref:
        label = "overfitting"
        reason = (f"validation improved (best {val_min / ref:.2f} x the reference) but the gap widened from "
                  f"{gap_start / ref:.2f} x to {gap_end / ref:.2f} x (by > {gap_fraction}) or validation rose "
                  f"{val_rise / ref:.2f} x (> {rise_fraction}) from its best")
    else:
        label = "healthy"
        reason = "training and validation both fall and stay close"
    return Diagnosis(label=label, evidence=ev, reason=reason, fix=_FIXES[label])
