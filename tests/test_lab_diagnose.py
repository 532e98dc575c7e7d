"""diagnose(): the lesson's decision tree on planted training runs (several seeds) and on
hand-made curves, with its bad-input errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from refimpl.lab import LABELS, diagnose
from refimpl.lab.experiments import chance_loss, lab_model, run_config

# Planted configurations (task, examples, layers, rank, dropout, weight decay, steps) and the failure they plant.
PLANTED = {
    # a high-rank knowledge edit (every token's class changes) with a rank-1 adapter
    "rank_too_low": ("facts", 2000, "all", 1, 0.05, 0.01, 200),
    # a task that needs a new attention pattern, adapted in the FFN only, on data small enough to memorize
    "wrong_layers": ("position", 100, "ffn", 16, 0.05, 0.01, 300),
    # rank 32, no dropout, no weight decay, 200 examples
    "overfitting": ("facts", 200, "all", 32, 0.0, 0.0, 200),
    # the lesson's default recipe on enough data
    "healthy": ("facts", 2000, "all", 16, 0.05, 0.01, 200),
}
SEEDS = (0, 1, 2)


@pytest.mark.parametrize("planted", list(PLANTED))
def test_planted_configurations_are_labelled_correctly_over_seeds(planted):
    task, n, layers, rank, p, wd, steps = PLANTED[planted]
    cfg, _ = lab_model()
    labels = []
    t0 = time.perf_counter()
    for seed in SEEDS:
        res, _, _ = run_config(task, n, layers, rank, dropout=p, weight_decay=wd, steps=steps, seed=seed,
                               eval_every=20)
        d = diagnose(res.curve.train_loss, res.curve.val_loss, chance_loss=chance_loss(cfg))
        print(f"{planted} seed {seed}: {d}")
        labels.append(d.label)
    print(f"{planted}: {labels} in {time.perf_counter() - t0:.1f} s")
    assert labels == [planted] * len(SEEDS)


def _curves(train_end, val_path, n=15, ref=2.0):
    t = np.linspace(0, 1, n)
    train = ref * ((1 - t) ** 3) + train_end * (1 - (1 - t) ** 3)
    return train, np.asarray(val_path(t))


def test_hand_made_curves_follow_the_decision_tree():
    ref = 2.0
    flat_t, flat_v = _curves(1.6, lambda t: 2.0 - 0.3 * t)
    assert diagnose(flat_t, flat_v, chance_loss=ref).label == "rank_too_low"
    wl_t, wl_v = _curves(0.2, lambda t: 2.0 - 0.2 * t)
    assert diagnose(wl_t, wl_v, chance_loss=ref).label == "wrong_layers"
    of_t, of_v = _curves(0.05, lambda t: 2.0 - 3.0 * t + 3.0 * t**2)  # dips to 1.25, ends at 2.0
    d = diagnose(of_t, of_v, chance_loss=ref)
    assert d.label == "overfitting"
    assert d.evidence["val_rise/ref"] > 0.1
    ok_t, ok_v = _curves(0.1, lambda t: 2.0 - 1.85 * (1 - (1 - t) ** 3))
    d = diagnose(ok_t, ok_v, chance_loss=ref)
    assert d.label == "healthy"
    assert set(d.evidence) >= {"train_end", "val_end", "val_min", "gap_end/ref"}
    assert d.label in LABELS and d.fix and d.reason


def test_without_chance_loss_the_first_train_point_is_the_reference():
    t, v = _curves(1.6, lambda t: 2.0 - 0.3 * t)
    d = diagnose(t, v)
    assert d.evidence["reference_loss"] == t[0]
    assert d.label == "rank_too_low"


def test_bad_curves_raise_naming_the_argument():
    with pytest.raises(ValueError, match="train_curve"):
        diagnose([1.0, 0.9], [1.0, 0.9])
    with pytest.raises(ValueError, match="val_curve"):
        diagnose([1.0, 0.9, 0.8], [1.0, 0.9])
    with pytest.raises(ValueError, match="train_curve"):
        diagnose([1.0, np.nan, 0.8], [1.0, 0.9, 0.8])
    with pytest.raises(TypeError, match="val_curve"):
        diagnose([1.0, 0.9, 0.8], ["a", "b", "c"])
    with pytest.raises(ValueError, match="chance_loss"):
        diagnose([1.0, 0.9, 0.8], [1.0, 0.9, 0.8], chance_loss=0.0)
    with pytest.raises(ValueError, match="tail"):
        diagnose([1.0, 0.9, 0.8], [1.0, 0.9, 0.8], tail=0)
    with pytest.raises(ValueError, match="flat_fraction"):
        diagnose([1.0, 0.9, 0.8], [1.0, 0.9, 0.8], flat_fraction=-1.0)
