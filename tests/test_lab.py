"""The teaching lab: hand-written backward vs finite differences, agreement with refimpl.lora /
refimpl.dora, AdamW against torch, tasks, curves, CLI, and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import precision
from refimpl.lab import LABELS, cli, diagnose, optim
from refimpl.lab import model as M
from refimpl.lab.tasks import make_dataset, world_maps
from refimpl.lab.train import TrainConfig, evaluate, train_adapter
from tests._peers import require

SMALL = M.ModelConfig(vocab=13, seq_len=5, d_model=8, n_heads=2, d_ff=12, n_blocks=2, n_classes=3)
U64 = precision.unit_roundoff("float64")


def _setup(dora: bool, dropout: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = M.init_base(SMALL, rng)
    acfg = M.AdapterConfig(targets=M.resolve_targets("all", SMALL), rank=2, alpha=4.0, dropout=dropout, dora=dora)
    ad = M.init_adapter(base, SMALL, acfg, rng)
    for k in ad:  # move away from the B = 0 start so every gradient path is exercised
        if k.endswith("lora_B"):
            ad[k] = rng.normal(0.0, 0.3, ad[k].shape)
        if k.endswith("lora_magnitude"):
            ad[k] = ad[k] * rng.uniform(0.5, 1.5, ad[k].shape)
    ids = rng.integers(0, SMALL.vocab, (6, SMALL.seq_len))
    y = rng.integers(0, SMALL.n_classes, 6)
    masks = M.draw_dropout(ad, SMALL, 6, dropout, rng)
    return base, ad, acfg, ids, y, masks


def _directional_check(params, grads, loss_fn, rng):
    """Central differences D(h) along a random direction v per tensor, against ⟨∇L, v⟩.

    Bound (derived, not tuned): the truncation error of D(h) is about |D(h) − D(2h)| / 3, and
    rounding adds at most 2·u·|L|·(terms)/h; we allow |D(h) − D(2h)| + 8·u·|L|/h."""
    worst = 0.0
    h = 1e-5
    for name, p in params.items():
        v = rng.normal(size=p.shape)
        v /= np.linalg.norm(v)
        old = p.copy()

        def at(t: float, old=old, p=p, v=v) -> float:
            p[...] = old + t * v
            out = loss_fn()
            p[...] = old
            return out

        d1 = (at(h) - at(-h)) / (2 * h)
        d2 = (at(2 * h) - at(-2 * h)) / (4 * h)
        exact = float(np.sum(grads[name] * v))
        bound = abs(d1 - d2) + 8 * U64 * abs(loss_fn()) / h
        rep = precision.compare_to_bound(np.array([d1]), np.array([exact]), np.array([bound]))
        worst = max(worst, rep.worst_ratio)
        assert rep.worst_ratio <= 1.0, f"{name}: FD {d1} vs backward {exact} (bound {bound})"
    return worst


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_backward_matches_finite_differences_for_every_base_and_lora_parameter(dropout):
    base, ad, acfg, ids, y, masks = _setup(False, dropout)

    def loss():
        lg, _ = M.forward(base, ad, SMALL, ids, scaling=acfg.scaling, dropout_masks=masks, dropout_p=dropout)
        return M.cross_entropy(lg, y)[0]

    lg, cache = M.forward(base, ad, SMALL, ids, scaling=acfg.scaling, dropout_masks=masks, dropout_p=dropout)
    _, d = M.cross_entropy(lg, y)
    gb, ga = M.backward(d, cache, base, SMALL, need_base=True)
    assert set(gb) == set(base) and set(ga) == set(ad)
    rng = np.random.default_rng(1)
    worst = max(_directional_check(base, gb, loss, rng), _directional_check(ad, ga, loss, rng))
    print(f"finite differences, LoRA dropout={dropout}: worst error/bound {worst:.3g}")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_backward_matches_finite_differences(dropout):
    base, ad, acfg, ids, y, masks = _setup(True, dropout)

    def loss():
        lg, _ = M.forward(base, ad, SMALL, ids, scaling=acfg.scaling, dropout_masks=masks, dropout_p=dropout)
        return M.cross_entropy(lg, y)[0]

    lg, cache = M.forward(base, ad, SMALL, ids, scaling=acfg.scaling, dropout_masks=masks, dropout_p=dropout)
    _, d = M.cross_entropy(lg, y)
    _, ga = M.backward(d, cache, base, SMALL, need_base=False)
    worst = _directional_check(ad, ga, loss, np.random.default_rng(2))
    print(f"finite differences, DoRA dropout={dropout}: worst error/bound {worst:.3g}")


def test_lab_lora_layer_agrees_with_refimpl_lora():
    from refimpl import lora

    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 5, 8))
    W, A, B = rng.normal(size=(6, 8)), rng.normal(size=(2, 8)), rng.normal(size=(6, 2))
    mask = (rng.random(x.shape) >= 0.25).astype(float)
    y, cache = M._lin_fwd(x, W, None, {"A": A, "B": B}, 1.5, mask, 0.25)
    y_ref = lora.forward(x, W, A, B, 1.5, dropout_mask=mask, dropout_p=0.25)
    xd = x * mask / 0.75
    bound = precision.gamma(8 + 2 + 2, "float64") * (
        np.abs(x) @ np.abs(W).T + 1.5 * (np.abs(xd) @ np.abs(A).T) @ np.abs(B).T
    )
    rep = precision.compare_to_bound(y, y_ref, 2 * bound)
    print(f"lab vs refimpl.lora forward: worst error/bound {rep.worst_ratio:.3g}")
    assert rep.worst_ratio <= 1.0
    g = rng.normal(size=y.shape)
    dx, grads = M._lin_bwd(g, cache, need_dW=False)
    ref = lora.backward(x, W, A, B, g, 1.5, dropout_mask=mask, dropout_p=0.25)
    for ours, theirs in ((dx, ref.dx), (grads["A"], ref.dA), (grads["B"], ref.dB)):
        scale = precision.gamma(x.size, "float64") * np.abs(theirs).max() * 10
        assert precision.compare_to_bound(ours, theirs, scale).worst_ratio <= 1.0


@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), layers=st.sampled_from(["qv", "ffn", "all", "attn"]), rank=st.integers(1, 4))
def test_zero_B_leaves_forward_equal_to_base(seed, layers, rank):
    rng = np.random.default_rng(seed)
    base = M.init_base(SMALL, rng)
    acfg = M.AdapterConfig(targets=M.resolve_targets(layers, SMALL), rank=rank, alpha=8.0)
    ad = M.init_adapter(base, SMALL, acfg, rng)  # B = 0 at init
    ids = rng.integers(0, SMALL.vocab, (3, SMALL.seq_len))
    with_adapter, _ = M.forward(base, ad, SMALL, ids, scaling=acfg.scaling)
    without, _ = M.forward(base, {}, SMALL, ids)
    np.testing.assert_array_equal(with_adapter, without)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), dora=st.booleans())
def test_merged_weights_give_the_adapter_forward(seed, dora):
    base, ad, acfg, ids, _, _ = _setup(dora, 0.0, seed)
    unmerged, _ = M.forward(base, ad, SMALL, ids, scaling=acfg.scaling)
    merged, _ = M.forward(M.merged_base(base, ad, acfg.scaling), {}, SMALL, ids)
    # Both are sums of O(d) float64 products per layer through 2 blocks; bound relative to the logits' scale.
    bound = precision.gamma(8 * (SMALL.d_model + SMALL.d_ff), "float64") * (1 + np.abs(unmerged)) * 1e3
    rep = precision.compare_to_bound(merged, unmerged, bound)
    print(f"merged vs unmerged logits: worst error/bound {rep.worst_ratio:.3g}")
    assert rep.worst_ratio <= 1.0


def test_adamw_step_matches_torch_adamw_with_loraplus_groups():
    torch = require("torch")
    rng = np.random.default_rng(4)
    params = {
        "l.lora_A": rng.normal(size=(2, 5)),
        "l.lora_B": rng.normal(size=(4, 2)),
        "l.lora_magnitude": rng.normal(size=4),
    }
    cfg = optim.AdamWConfig(lr=1e-2, weight_decay=0.1, loraplus_ratio=16.0)
    lrs = optim.learning_rates(params, cfg)
    assert lrs == {"l.lora_A": 1e-2, "l.lora_B": 0.16, "l.lora_magnitude": 0.16}  # PEFT §7: 1-D gets the ratio
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    topt = torch.optim.AdamW(
        [{"params": [tparams[k]], "lr": lrs[k]} for k in params], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1
    )
    state = optim.init_state(params)
    for _ in range(3):
        grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
        for k in params:
            tparams[k].grad = torch.tensor(grads[k])
        topt.step()
        optim.adamw_step(params, grads, state, cfg, lrs)
    for k in params:
        theirs = tparams[k].detach().numpy()
        # a handful of float64 operations per step and element: bound with γ_30 of the value's scale
        bound = precision.gamma(30, "float64") * (np.abs(theirs) + 1.0)
        rep = precision.compare_to_bound(params[k], theirs, bound)
        print(f"AdamW vs torch {k}: worst error/bound {rep.worst_ratio:.3g}")
        assert rep.worst_ratio <= 1.0


def test_tasks_follow_their_label_rules_and_are_deterministic():
    cfg = M.ModelConfig()
    g = world_maps(cfg)
    assert np.bincount(g[0, 1:], minlength=cfg.n_classes).min() >= (cfg.vocab - 1) // cfg.n_classes
    a = make_dataset("facts", 50, cfg, np.random.default_rng(0))
    b = make_dataset("facts", 50, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(a.ids, b.ids)
    assert (a.ids[:, 0] == 0).all() and (a.ids[:, 1:] > 0).all()
    np.testing.assert_array_equal(a.labels, g[1][a.ids[:, 1]])
    p = make_dataset("position", 50, cfg, np.random.default_rng(1))
    np.testing.assert_array_equal(p.labels, g[0][p.ids[:, -1]])
    lo = make_dataset("facts_low", 50, cfg, np.random.default_rng(2))
    hi = make_dataset("facts_high", 50, cfg, np.random.default_rng(2))
    assert lo.ids[:, 1].max() < hi.ids[:, 1].min()


def test_training_is_deterministic_and_reduces_loss(tmp_path):
    cfg = SMALL
    base = M.init_base(cfg, np.random.default_rng(0))
    tr = make_dataset("pretrain", 64, cfg, np.random.default_rng(1))
    acfg = M.AdapterConfig(targets=M.resolve_targets("all", cfg), rank=2, alpha=4.0, dropout=0.1)
    tc = TrainConfig(steps=30, batch_size=16, eval_every=10, weight_decay=0.01, loraplus_ratio=4.0)
    r1 = train_adapter(base, cfg, acfg, tr, tr, tc)
    r2 = train_adapter(base, cfg, acfg, tr, tr, tc)
    assert r1.curve == r2.curve
    assert r1.curve.train_loss[-1] < r1.curve.train_loss[0]
    assert r1.curve.step == (0, 10, 20, 30)
    path = r1.curve.save(tmp_path / "c.csv")
    rows = list(csv.DictReader(path.open()))
    assert [float(r["val_loss"]) for r in rows] == list(r1.curve.val_loss)
    assert json.loads(r1.curve.save(tmp_path / "c.json").read_text())["step"] == [0, 10, 20, 30]
    loss, acc = evaluate(base, r1.adapter, cfg, tr, acfg.scaling)
    assert loss == pytest.approx(r1.curve.train_loss[-1], rel=0, abs=0)  # same eval on the same set
    assert 0.0 <= acc <= 1.0


def test_nf4_base_is_refimpl_quant_round_trip():
    from refimpl import quant
    from refimpl.lab.train import quantize_base_nf4

    base = M.init_base(SMALL, np.random.default_rng(0))
    q = quantize_base_nf4(base, SMALL)
    w = base["b0.q"].astype(np.float32)
    packed, state = quant.quantize_4bit(w, blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(q["b0.q"], quant.dequantize_4bit(packed, state).astype(np.float64))
    assert not np.array_equal(q["b0.q"], base["b0.q"])
    np.testing.assert_array_equal(q["embed"], base["embed"])  # only linear weights are quantized


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="n_heads"):
        M.ModelConfig(d_model=10, n_heads=3)
    with pytest.raises(TypeError, match="vocab"):
        M.ModelConfig(vocab=3.5)
    with pytest.raises(ValueError, match="layers"):
        M.resolve_targets("mlp", SMALL)
    with pytest.raises(TypeError, match="layers"):
        M.resolve_targets(3, SMALL)
    with pytest.raises(ValueError, match="dropout"):
        M.AdapterConfig(targets=("b0.q",), dropout=1.0)
    with pytest.raises(ValueError, match="rank"):
        M.AdapterConfig(targets=("b0.q",), rank=0)
    base = M.init_base(SMALL, np.random.default_rng(0))
    with pytest.raises(TypeError, match="ids"):
        M.forward(base, {}, SMALL, np.zeros((2, SMALL.seq_len)))
    with pytest.raises(ValueError, match="ids"):
        M.forward(base, {}, SMALL, np.full((2, SMALL.seq_len), SMALL.vocab))
    with pytest.raises(ValueError, match="ids"):
        M.forward(base, {}, SMALL, np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="loraplus_ratio"):
        TrainConfig(loraplus_ratio=-1.0)
    with pytest.raises(ValueError, match="task"):
        make_dataset("sentiment", 5, SMALL, np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng"):
        make_dataset("facts", 5, SMALL, 0)
    with pytest.raises(ValueError, match="name"):
        from refimpl.lab import run_experiment

        run_experiment("ranks")
    with pytest.raises(ValueError, match="train_curve"):
        diagnose([1.0, 0.5], [1.0, 0.5])


def test_cli_train_writes_curves_and_plot(tmp_path, capsys):
    rc = cli.main(
        [
            "train",
            "--rank",
            "2",
            "--alpha",
            "4",
            "--layers",
            "qv",
            "--dropout",
            "0.05",
            "--weight-decay",
            "0.01",
            "--examples",
            "64",
            "--steps",
            "20",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "diagnosis:" in out
    for f in ("curves.csv", "curves.json", "curves.png", "summary.json"):
        assert (tmp_path / f).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["diagnosis"]["label"] in LABELS
    assert cli.main(["train", "--layers", "mlp", "--out", str(tmp_path)]) == 2
    assert "layers" in capsys.readouterr().err


def test_cli_train_with_dora_and_nf4_base(tmp_path):
    assert (
        cli.main(
            ["train", "--dora", "--nf4", "--examples", "64", "--steps", "10", "--no-progress", "--out", str(tmp_path)]
        )
        == 0
    )
    assert json.loads((tmp_path / "summary.json").read_text())["base"] == "nf4"


def test_merge_experiment_quick_uses_refimpl_merging(tmp_path):
    from refimpl.lab import run_experiment

    res = run_experiment("merge", tmp_path, quick=True)
    methods = [r["method"] for r in res.rows]
    assert {"average", "task arithmetic (λ=1)", "TIES (density 0.2)"} <= set(methods)
    rows = {r["method"]: r for r in res.rows}
    # each adapter must beat the base on its own task, or the merge comparison means nothing
    assert rows["adapter A only"]["facts_low_acc"] > rows["base (no adapter)"]["facts_low_acc"] + 0.3
    assert rows["adapter B only"]["facts_high_acc"] > rows["base (no adapter)"]["facts_high_acc"] + 0.3
    assert (tmp_path / "merge" / "merge.png").stat().st_size > 0
    print(res.text)


def test_cli_experiment_memory_writes_table_and_plot(tmp_path, capsys):
    assert cli.main(["experiment", "memory", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "780.0 GB" in out and "experiment memory" in out
    rows = list(csv.DictReader((tmp_path / "memory" / "table.csv").open()))
    assert [r["method"] for r in rows] == ["full", "lora", "qlora"]
    assert (tmp_path / "memory" / "memory.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        cli.main(["experiment", "ranks"])


def test_rank_experiment_small_rank_goes_flat_early_and_adequate_rank_is_healthy(tmp_path):
    """Experiment 1 shows the lesson's flat-training-loss signature at r = 1 (relabel needs a rank-7 change)
    and ``diagnose`` names it by its shape; r = 8 keeps falling and is healthy."""
    from refimpl.lab import run_experiment
    from refimpl.lab.experiments import chance_loss, lab_model

    res = run_experiment("rank", tmp_path, quick=True)
    curves = json.loads((tmp_path / "rank" / "curves.json").read_text())
    ref = chance_loss(lab_model()[0])
    low, adequate = (np.asarray(curves[k]["train_loss"]) for k in ("r=1", "r=8"))
    # the shape itself, independently of diagnose: r = 1 stops improving in the first quarter of the run
    # while it is still far above what r = 8 reaches
    quarter = len(low) // 4
    assert low[quarter] - low[-1] < 0.1 * ref < low[0] - low[quarter]
    assert adequate[-1] < 0.1 * ref < 0.5 * ref < low[-1]
    d_low = diagnose(curves["r=1"]["train_loss"], curves["r=1"]["val_loss"], chance_loss=ref)
    d_ok = diagnose(curves["r=8"]["train_loss"], curves["r=8"]["val_loss"], chance_loss=ref)
    assert d_low.label == "rank_too_low" and "goes flat early" in d_low.reason, str(d_low)
    assert d_low.evidence["plateau_start"] <= 0.25
    assert d_ok.label == "healthy", str(d_ok)
    assert [r["diagnosis"] for r in res.rows] == ["rank_too_low", "healthy"]
