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


def plot_curves(
    curves: Mapping[str, Curve],
    path: str | Path,
    *,
    title: str,
    chance_loss: float | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
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


def plot_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    reference: Mapping[str, float] | None = None,
) -> Path:
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


def plot_memory(
    methods: Sequence[str],
    components: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str,
    lesson: Sequence[float] | None = None,
    paged: Sequence[float] | None = None,
) -> Path:
    """Stacked bars, one per method, one segment per memory component (GB), all bars under the assumption set
    named in ``title``. Two panels with the same bars: the full scale, and the adapter methods zoomed in so
    their small components are visible. ``lesson``: the lesson's figures, a black tick on each bar.
    ``paged``: optimizer states a paged optimizer would keep in CPU memory, an outlined segment above the bar
    (not part of the GPU peak)."""
    plt = _pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), dpi=110, gridspec_kw={"width_ratios": [len(methods), 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel, ax in enumerate(axes):
        idx = list(range(len(methods))) if panel == 0 else [i for i, m in enumerate(methods) if m != "full"]
        x = np.arange(len(idx))
        bottom = np.zeros(len(idx))
        for j, (name, vals) in enumerate(components.items()):
            v = np.array([vals[i] for i in idx], dtype=float)
            ax.bar(x, v, 0.55, bottom=bottom, label=name, color=colors[j % len(colors)], edgecolor="white", lw=0.5)
            bottom += v
        top = max(list(bottom) + ([lesson[i] for i in idx] if lesson is not None else []))
        for k, i in enumerate(idx):
            ax.text(
                x[k],
                max(bottom[k], lesson[i] if lesson is not None else 0.0) + 0.02 * top,
                f"{bottom[k]:.1f} GB",
                ha="center",
                va="bottom",
                fontsize=8,
                fontweight="bold",
            )
        if lesson is not None:
            ax.scatter(
                x,
                [lesson[i] for i in idx],
                marker="_",
                s=900,
                color="black",
                zorder=3,
                label="lesson's figure (its rows fitted with different assumptions)",
            )
            for k, i in enumerate(idx):
                ax.text(x[k] - 0.3, lesson[i], f"lesson {lesson[i]:g} ", ha="right", va="center", fontsize=7)
        ax.set_xticks(x, [methods[i] for i in idx])
        ax.set_ylabel("GPU memory, GB (1e9 bytes)")
        ax.grid(alpha=0.3, axis="y")
        ax.set_ylim(0, 1.15 * top)
        ax.set_xlim(-0.9, len(idx) - 0.1)
        ax.set_title("all methods" if panel == 0 else "LoRA and QLoRA, zoomed", fontsize=9)
        if paged is not None and panel == 1:
            for k, i in enumerate(idx):
                ax.text(
                    x[k] + 0.3,
                    bottom[k] / 2,
                    f"paged optimizer:\n-{paged[i]:.1f} GB\n(to CPU)",
                    fontsize=7,
                    va="center",
                )
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p
