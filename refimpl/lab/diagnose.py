"""The lesson's decision tree: name a LoRA failure mode from the training and validation curves.

The lesson's signatures, made measurable. Losses are compared with a reference level L_ref:
the chance-level cross-entropy ln(n_classes) when ``chance_loss`` is given (the lab passes it),
else the first point of the training curve.

1. **rank_too_low** — "a flat training loss": its slope reaches ≈ 0 early at a high level: the
   training curve reaches its plateau (the first point after which the smoothed curve stays within
   ``plateau_tolerance · L_ref`` + twice the measured noise of its end level) within the first
   ``early_fraction`` of the run, and that level is above ``plateau_fraction · L_ref`` (the lesson's
   "loss stops decreasing after just a few hundred steps"; e.g. 3.3 → 1.46 in 20 of 200 steps, then
   flat; the lab's ``rank`` experiment at r = 1), **or** training never gets far below the reference,
   ``train_end > flat_fraction · L_ref`` (a curve still falling slowly at a high level). The shape is
   tested first, so the reason names it when both hold. Fix: raise r (16, 32, 64).
2. **wrong_layers** — "training loss decreases normally, but validation is mediocre": training
   falls below ``flat_fraction · L_ref`` but validation never gets below
   ``mediocre_fraction · L_ref``. Fix: target all linear layers at a lower rank.
   Validation *flat* at that mediocre level is the wrong-layer signature. Validation that *rises*
   from a mediocre minimum (``val_rise > rise_fraction · L_ref``) is also the overfitting signature
   ("train loss plummets while val loss plateaus or rises"): curves alone cannot tell the two apart,
   so the label stays wrong_layers (regularising cannot lift a validation that was never good) but
   ``ambiguous_with = "overfitting"`` and ``experiment`` names the run that decides it: the same
   configuration with all linear layers targeted (validation improves → wrong layers; the same
   rise → overfitting, add data / dropout / weight decay).
3. **overfitting** — "a widening gap": validation did improve, but the gap val − train has
   widened since the first point by more than ``gap_fraction · L_ref``,
   or every one of the last ``tail`` validation points lies more than ``rise_fraction · L_ref``
   above validation's best.
   Fix: more/diverse data, dropout 0.05–0.1, weight decay 0.01–0.1.
4. **healthy** — otherwise.

"End" values are the mean of the last ``tail`` points, so a single noisy point does not decide.
Shape figures are fractions of the run (0 = first point, 1 = last), so the same curve sampled over
50 or 2000 steps gets the same answer.
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
    #: the other label the curves are equally consistent with (None when they decide)
    ambiguous_with: str | None = None
    #: the experiment that would decide between ``label`` and ``ambiguous_with``
    experiment: str | None = None

    def __str__(self) -> str:
        figures = ", ".join(f"{k}={v:.3f}" for k, v in self.evidence.items())
        return f"{self.label}: {self.reason} [{figures}] -> {self.fix}"


DECIDING_EXPERIMENT = (
    "rerun the same configuration with LoRA on all linear layers (Q, K, V, O, up, down): "
    "if validation gets well below its old minimum the layers were wrong; if it rises the "
    "same way, it is overfitting (add data, dropout, weight decay)"
)


def _smooth(x: np.ndarray) -> np.ndarray:
    """A centred moving average over about a tenth of the points (none for short curves)."""
    w = max(1, x.shape[0] // 10) | 1
    if w == 1:
        return x.copy()
    pad = w // 2
    xp = np.concatenate([np.full(pad, x[0]), x, np.full(pad, x[-1])])
    return np.convolve(xp, np.ones(w) / w, mode="valid")


def _noise(x: np.ndarray) -> float:
    """Point-to-point noise of the curve's second half (robust: MAD of the first differences about their median)."""
    d = np.diff(x[x.shape[0] // 2 :])
    if d.shape[0] < 2:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def plateau_start(train: np.ndarray, level: float, tolerance: float) -> float:
    """Where the training loss stops falling, as a fraction of the run: the first point after which the
    smoothed curve stays within ``tolerance`` of ``level`` (its end level)."""
    s = _smooth(train)
    above = np.nonzero(s > level + tolerance)[0]
    i = 0 if above.shape[0] == 0 else int(above[-1]) + 1
    return min(i, train.shape[0] - 1) / (train.shape[0] - 1)


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
    plateau_fraction: float = 0.3,
    early_fraction: float = 0.25,
    plateau_tolerance: float = 0.05,
) -> Diagnosis:
    """Label a pair of loss curves (same evaluation steps) as healthy, rank_too_low,
    wrong_layers or overfitting, with the figures that decided it."""
    tr = _curve(train_curve, "train_curve")
    va = _curve(val_curve, "val_curve")
    _checks.same_shape(tr, "train_curve", va, "val_curve")
    ref = (
        float(tr[0]) if chance_loss is None else _checks.real(chance_loss, "chance_loss", low=0.0, low_inclusive=False)
    )
    if ref <= 0:
        raise ValueError(f"train_curve: expected a positive first loss as the reference, got {ref}")
    for name, v in (
        ("flat_fraction", flat_fraction),
        ("mediocre_fraction", mediocre_fraction),
        ("gap_fraction", gap_fraction),
        ("rise_fraction", rise_fraction),
        ("plateau_fraction", plateau_fraction),
        ("early_fraction", early_fraction),
        ("plateau_tolerance", plateau_tolerance),
    ):
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
    noise = _noise(tr)
    plateau_at = plateau_start(tr, train_end, plateau_tolerance * ref + 2.0 * noise)
    third = max(2, tr.shape[0] // 3)
    slope_end = float(np.polyfit(np.linspace(0.0, 1.0, tr.shape[0])[-third:], tr[-third:], 1)[0])
    early_plateau = plateau_at <= early_fraction and train_end > plateau_fraction * ref
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
        "plateau_start": plateau_at,
        "train_slope_end/ref": slope_end / ref,
        "train_noise/ref": noise / ref,
        "val_min_at": best / (va.shape[0] - 1),
        "gap_growth/ref": (gap_end - gap_start) / ref,
        "ambiguous": 0.0,
    }
    ambiguous_with = experiment = None
    if early_plateau:  # the shape decides first: the lesson's "stops decreasing after a few hundred steps"
        label = "rank_too_low"
        reason = (
            f"training loss goes flat early: its slope reaches ~0 {plateau_at:.0%} into the run "
            f"(<= {early_fraction:.0%}) at {train_end / ref:.2f} x the reference (> {plateau_fraction}): "
            "the adapter lacks capacity"
        )
    elif train_end > flat_fraction * ref:
        label = "rank_too_low"
        reason = f"training loss stays high: it ends at {train_end / ref:.2f} x the reference (> {flat_fraction})"
    elif val_min > mediocre_fraction * ref:
        label = "wrong_layers"
        if val_rise > rise_fraction * ref:
            ambiguous_with, experiment = "overfitting", DECIDING_EXPERIMENT
            ev["ambiguous"] = 1.0
            reason = (
                f"training falls to {train_end / ref:.2f} x the reference but validation never gets below "
                f"{val_min / ref:.2f} x (> {mediocre_fraction}) and then rises {val_rise / ref:.2f} x from "
                "its minimum: from the curves alone this is wrong layers or overfitting; to decide, "
                + DECIDING_EXPERIMENT
            )
        else:
            reason = (
                f"training falls to {train_end / ref:.2f} x the reference but validation stays flat at a "
                f"mediocre level: never below {val_min / ref:.2f} x (> {mediocre_fraction}), no rise from "
                "its minimum"
            )
    elif gap_end - gap_start > gap_fraction * ref or val_rise > rise_fraction * ref:
        label = "overfitting"
        reason = (
            f"validation improved (best {val_min / ref:.2f} x the reference) but the gap widened from "
            f"{gap_start / ref:.2f} x to {gap_end / ref:.2f} x (by > {gap_fraction}) or validation rose "
            f"{val_rise / ref:.2f} x (> {rise_fraction}) from its best"
        )
    else:
        label = "healthy"
        reason = "training and validation both fall and stay close"
    return Diagnosis(
        label=label, evidence=ev, reason=reason, fix=_FIXES[label], ambiguous_with=ambiguous_with, experiment=experiment
    )
