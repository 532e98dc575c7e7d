"""PNG plots of loss curves and result tables (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from refimpl.lab.train import Curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: Mapping[str, Curve], path: str | Path, *, title: str, chance_loss: float | None = None,
                ylim: tuple[float, float] | None = None) -> Path:
    """Train (dashed) and validation (solid) loss against step, one colour per configuration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    colors = plt.get_cmap("tab10")
    for i, (label, c) in enumerate(curves.items()):
        col = colors(i % 10)
        ax.plot(c.step, c.train_loss, ls="--", color=col, lw=1.4)
        ax.plot(c.step, c.val_loss, ls="-", color=col, lw=1.8, label=label)
    if chance_loss is not None:
        ax.axhline(chance_loss, color="grey", lw=0.8, ls=":", label="chance (ln classes)")
    top = max(max(c.val_loss[1:] + c.train_loss[1:], default=1.0) for c in curves.values())
    ax.set_ylim(ylim if ylim is not None else (0.0, min(top * 1.05, 3.0 * (chance_loss or top))))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (dashed: train, solid: validation)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p


def plot_bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], path: str | Path, *, title: str,
              ylabel: str, reference: Mapping[str, float] | None = None) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series."""
    plt = _pyplot()
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(7.5, 1.3 * len(groups)), 4.5), dpi=110)
    n = len(series)
    width = 0.8 / max(n, 1)
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        bars = ax.bar(x + (i - (n - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    if reference:
        for name, val in reference.items():
            ax.axhline(val, ls=":", color="grey", lw=0.8)
            ax.text(len(groups) - 0.5, val, name, fontsize=7, va="bottom", ha="right", color="grey")
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p
