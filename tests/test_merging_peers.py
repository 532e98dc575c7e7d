"""Differential tests of refimpl.merging against PEFT 0.21.2 and mergekit 0.1.5 (spec/merging.md §Peers).

Inputs are float32 (the peers compute in float32); the reference gets the same values in float64.
Random pruning is injected: ``torch.bernoulli`` is replaced by a function returning our masks in
call order. Each comparison is error / bound with a bound derived from float32's unit roundoff and
the number of rounded operations per output (never hand-picked); the worst ratio per profile is
printed (run with -s or see the -rA summary) and collected into WORST for the final summary test.
"""

from __future__ import annotations

import numpy as np
import pytest

from refimpl import bounds, merging, precision
from tests._peers import require

pytestmark = pytest.mark.peers

WORST: dict[str, float] = {}  # label -> worst error/bound
WORST_ABS: dict[str, float] = {}  # label -> worst |peer − reference|
SHAPE = (48, 40)
T = 3


def _record(label: str, report, got=None, ref=None) -> None:
    WORST[label] = max(WORST.get(label, 0.0), report.worst_ratio)
    if got is not None:
        WORST_ABS[label] = max(WORST_ABS.get(label, 0.0), float(np.max(np.abs(np.asarray(got, np.float64) - ref))))
    print(f"{label}: {report}")
    assert report.passed, f"{label}: {report}"


def _tasks(seed: int, t: int = T) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(t)]


def _bound(terms: np.ndarray, divisor: np.ndarray | float, n_ops: int) -> np.ndarray:
    """γ_n(float32)·Σ_t|terms_t| / |divisor|: n_ops counts the roundings on the longest path."""
    return precision.gamma(n_ops, "float32") * np.abs(terms).sum(axis=0) / np.abs(divisor)


class _InjectedBernoulli:
    """Replaces torch.bernoulli: returns the given keep-masks in call order (as float tensors)."""

    def __init__(self, torch, masks):
        self.torch, self.masks, self.calls = torch, list(masks), 0

    def __call__(self, probs, *args, **kwargs):
        m = self.masks[self.calls]
        self.calls += 1
        assert tuple(probs.shape) == m.shape
        return self.torch.from_numpy(m.astype(np.float32)).to(probs.dtype)


# ------------------------------------------------------------------------------------------- PEFT


@pytest.fixture(scope="module")
def peft_mu():
    require("torch")
    return require("peft.utils.merge_utils")


def _peft_selected(taus, w, density, k_rule, elect="sum", weight_stage="after_election"):
    """The agreeing-entry mask and trimmed stack the reference uses (for bound terms)."""
    trimmed = np.stack([t * merging.trim_mask(t, density, k_rule=k_rule) for t in taus])
    wb = np.asarray(w).reshape(-1, 1, 1)
    e = trimmed * wb if weight_stage == "before_election" else trimmed
    score = e.sum(0) if elect == "sum" else np.sign(e).sum(0)
    maj = np.where(score >= 0, 1.0, -1.0)
    sel = np.sign(e) == maj
    return trimmed, wb, sel


@pytest.mark.parametrize("method", ["task_arithmetic", "magnitude_prune", "ties", "ties_frequency"])
@pytest.mark.parametrize("seed", [0, 1])
def test_peft_merge_utils_deterministic_methods(peft_mu, method, seed):
    import torch

    taus = _tasks(seed)
    w = [0.7, 1.3, -0.4]
    density = 0.3
    tt = [torch.from_numpy(t) for t in taus]
    wt = torch.tensor(w)
    if method == "task_arithmetic":
        got = peft_mu.task_arithmetic(tt, wt)
        ref = merging.task_arithmetic(taus, w)
        bound = _bound(np.stack(taus) * np.reshape(w, (-1, 1, 1)), 1.0, T + 1)
    elif method == "magnitude_prune":
        got = peft_mu.magnitude_prune(tt, wt, density)
        ref = merging.magnitude_prune(taus, w, density=density, profile="peft")
        trimmed, wb, _ = _peft_selected(taus, w, density, "floor")
        bound = _bound(trimmed * wb, 1.0, T + 1)
    else:
        elect = "count" if method == "ties_frequency" else "sum"
        got = peft_mu.ties(tt, wt, density, "frequency" if elect == "count" else "total")
        ref = merging.ties(taus, w, density=density, profile="peft", elect=elect)
        trimmed, wb, sel = _peft_selected(taus, w, density, "floor", elect)
        bound = _bound(trimmed * wb * sel, np.maximum(sel.sum(0), 1), bounds.disjoint_merge_depth(T))
    _record(f"peft/{method}", precision.compare_to_bound(got.numpy(), ref, bound), got.numpy(), ref)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("seed", [0, 1])
def test_peft_merge_utils_dare_with_injected_masks(peft_mu, monkeypatch, method, seed):
    import torch

    taus = _tasks(seed)
    w = [0.5, 1.5, 1.0]
    density = 0.4
    masks = merging.dare_masks(SHAPE, T, density, np.random.default_rng(100 + seed))
    fake = _InjectedBernoulli(torch, masks)
    monkeypatch.setattr(torch, "bernoulli", fake)
    tt = [torch.from_numpy(t) for t in taus]
    got = getattr(peft_mu, method)(tt, torch.tensor(w), density).numpy()
    assert fake.calls == T
    merge = "linear" if method == "dare_linear" else "ties"
    ref = merging.dare(taus, w, masks=masks, density=density, merge=merge, profile="peft")
    dropped = np.stack([t * m / density for t, m in zip(taus, masks, strict=True)])
    wb = np.reshape(w, (-1, 1, 1))
    if merge == "linear":
        bound = _bound(dropped * wb, 1.0, T + 2)
    else:
        sel = np.sign(dropped) == np.where(dropped.sum(0) >= 0, 1.0, -1.0)
        bound = _bound(dropped * wb * sel, np.maximum(sel.sum(0), 1), bounds.dare_depth(T))
    _record(f"peft/{method}", precision.compare_to_bound(got, ref, bound), got, ref)


def _peft_lora_model(torch, peft, ranks, alphas, seed, use_rslora=False):
    """A one-layer model (Linear 40 -> 48) with one LoRA adapter per rank; random A and B."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(SHAPE[1], SHAPE[0]))
    names = [f"a{i}" for i in range(len(ranks))]
    pm = None
    for name, r, alpha in zip(names, ranks, alphas, strict=True):
        cfg = peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False, use_rslora=use_rslora
        )
        if pm is None:
            pm = peft.get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    layer = pm.base_model.model[0]
    As = [layer.lora_A[n].weight.detach().numpy().copy() for n in names]
    Bs = [layer.lora_B[n].weight.detach().numpy().copy() for n in names]
    scal = [layer.scaling[n] for n in names]
    return pm, layer, names, As, Bs, scal


@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
def test_peft_add_weighted_adapter(combination):
    torch = require("torch")
    peft = require("peft")
    ranks = [4, 4] if combination == "linear" else [3, 5]
    pm, layer, names, As, Bs, scal = _peft_lora_model(torch, peft, ranks, [8, 16], seed=3)
    w = [0.6, -1.2]
    kwargs = {"svd_rank": sum(ranks)} if combination == "svd" else {}
    pm.add_weighted_adapter(names, w, "merged", combination_type=combination, **kwargs)
    assert layer.scaling["merged"] == 1.0  # α = r for the merged adapter
    got = (
        layer.lora_B["merged"].weight.detach().double().numpy()
        @ layer.lora_A["merged"].weight.detach().double().numpy()
    )
    c = np.multiply(w, scal)
    absB = [np.abs(b) for b in Bs]
    absA = [np.abs(a) for a in As]
    if combination == "cat":
        A, B = merging.lora_cat(As, Bs, scal, w)
        ref = B @ A
        # PEFT rounds c_i·A_i to float32 (two products): γ_2 relative per term
        bound = precision.gamma(2, "float32") * sum(abs(ci) * (b @ a) for ci, a, b in zip(c, absA, absB, strict=True))
    elif combination == "linear":
        A, B = merging.lora_factor_linear(As, Bs, scal, w)
        ref = B @ A
        aw, bw = np.sqrt(np.abs(c)), np.sqrt(np.abs(c))
        sumA = sum(x * a for x, a in zip(aw, absA, strict=True))
        sumB = sum(x * b for x, b in zip(bw, absB, strict=True))
        # each factor: weight to float32 (1), product (1), T−1 sums: γ_{T+1}; a product of two such factors
        bound = 2 * precision.gamma(len(As) + 1, "float32") * (sumB @ sumA)
        true = merging.lora_delta(As, Bs, scal, w)
        rel = np.linalg.norm(ref - true) / np.linalg.norm(true)
        print(f"factor-space linear vs ΔW-space weighted sum: relative Frobenius error {rel:.3f}")
        assert rel > 0.1  # the cross terms are real
    else:
        A, B = merging.lora_svd(As, Bs, scal, w, rank=sum(ranks))
        ref = B @ A
        delta = merging.lora_delta(As, Bs, scal, w)
        # float32 ΔW_i (γ_{r+2}), float32 sum (γ_T), backward-stable float32 SVD: ‖E‖₂ ≤ γ_{m·n}‖ΔW‖₂
        bound = precision.gamma(max(ranks) + 2 + len(As), "float32") * sum(
            abs(ci) * (b @ a) for ci, a, b in zip(c, absA, absB, strict=True)
        ) + precision.gamma(SHAPE[0] * SHAPE[1], "float32") * np.linalg.norm(delta, 2)
    _record(f"peft/add_weighted_adapter/{combination}", precision.compare_to_bound(got, ref, bound), got, ref)


# ---------------------------------------------------------------------------------------- mergekit


@pytest.fixture(scope="module")
def gta():
    require("torch")
    mod = require("mergekit.merge_methods.generalized_task_arithmetic")
    base = require("mergekit.merge_methods.base")
    sp = require("mergekit.sparsify")
    return mod, base, sp


def _mergekit_gta(gta, taus, w, density, consensus, sparsify, normalize, rescale, lam=1.0):
    import torch

    mod, base, sp = gta
    method = mod.GeneralizedTaskArithmeticMerge(
        consensus_method=consensus and mod.ConsensusMethod(consensus),
        sparsification_method=sparsify and sp.SparsificationMethod(sparsify),
        default_normalize=normalize,
        default_rescale=rescale,
        method_name="test",
        method_pretty_name=None,
        method_reference_url=None,
    )
    # base = 0 so the deltas are exactly the float32 task vectors
    tensors = [torch.zeros(SHAPE)] + [torch.from_numpy(t) for t in taus]
    group = base.TensorGroup.from_tensors(tensors, base_index=0)
    ids = range(1, len(taus) + 1)
    params = {
        "int8_mask": False,
        "normalize": normalize,
        "rescale": rescale,
        "lambda": lam,
        "weight": dict(zip(ids, w, strict=True)),
        "density": dict.fromkeys(ids, density),
    }
    return method.merge_group(group, **params).numpy()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("consensus", "normalize", "lam"),
    [("sum", True, 1.0), ("sum", True, 0.8), ("count", True, 1.0), ("sum", False, 1.0)],
)
def test_mergekit_ties(gta, seed, consensus, normalize, lam):
    taus = _tasks(seed)
    w = [0.7, 1.3, 0.4]
    got = _mergekit_gta(gta, taus, w, 0.3, consensus, "magnitude", normalize=normalize, rescale=False, lam=lam)
    elect = "count" if consensus == "count" else "sum"
    divisor = "weight_sum" if normalize else "none"
    ref = merging.ties(taus, w, density=0.3, profile="mergekit", elect=elect, divisor=divisor, lam=lam)
    trimmed, wb, sel = _peft_selected(taus, w, 0.3, "floor_min1", elect, weight_stage="before_election")
    den = (wb * sel).sum(0) if normalize else np.ones(SHAPE)
    den[den == 0] = 1
    # numerator γ_{T+1}, divisor γ_T (positive weights), division and λ: γ_{2T+3}
    bound = abs(lam) * _bound(trimmed * wb * sel, den, 2 * T + 3)
    _record("mergekit/ties", precision.compare_to_bound(got, ref, bound), got, ref)


def test_mergekit_task_arithmetic(gta):
    taus = _tasks(5)
    w = [0.7, -1.3, 0.4]
    got = _mergekit_gta(gta, taus, w, 1.0, None, None, normalize=False, rescale=False, lam=0.5)
    ref = merging.task_arithmetic(taus, w, lam=0.5)
    bound = 0.5 * _bound(np.stack(taus) * np.reshape(w, (-1, 1, 1)), 1.0, T + 2)
    _record("mergekit/task_arithmetic", precision.compare_to_bound(got, ref, bound), got, ref)


@pytest.mark.parametrize("merge", ["linear", "ties"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mergekit_dare_with_injected_masks(gta, monkeypatch, merge, seed):
    import torch

    taus = _tasks(seed)
    w = [0.7, 1.3, 0.4]
    density = 0.4
    masks = merging.dare_masks(SHAPE, T, density, np.random.default_rng(200 + seed))
    fake = _InjectedBernoulli(torch, masks)
    monkeypatch.setattr(torch, "bernoulli", fake)
    got = _mergekit_gta(
        gta, taus, w, density, "sum" if merge == "ties" else None, "random", normalize=False, rescale=True
    )
    assert fake.calls == T
    ref = merging.dare(taus, w, masks=masks, density=density, merge=merge, profile="mergekit")
    dropped = np.stack([merging.l1_rescaled(t.astype(np.float64), m) for t, m in zip(taus, masks, strict=True)])
    wb = np.reshape(w, (-1, 1, 1))
    sel = np.sign(dropped * wb) == np.where((dropped * wb).sum(0) >= 0, 1.0, -1.0) if merge == "ties" else 1.0
    n = SHAPE[0] * SHAPE[1]
    # the L1 ratio: two float32 sums of n terms and a division, 2γ_n + γ_1; then the weighted sum γ_{T+2}
    bound = (2 * precision.gamma(n, "float32") + precision.gamma(T + 4, "float32")) * np.abs(dropped * wb * sel).sum(0)
    _record(f"mergekit/dare_{merge}", precision.compare_to_bound(got, ref, bound), got, ref)


def test_mergekit_linear():
    torch = require("torch")
    lin = require("mergekit.merge_methods.linear")
    base = require("mergekit.merge_methods.base")
    thetas = _tasks(7)
    w = [0.7, 1.3, 0.4]
    got = lin.linear_merge.merge_batch(
        base.TensorBatch(tuple(torch.from_numpy(t)[None] for t in thetas)), weight=torch.tensor([w]), normalize=True
    )[0].numpy()
    ref = merging.linear(thetas, w)
    # addcmul per task (≤ 2 roundings each), Σ w in float32 (γ_T, positive weights), one division
    bound = _bound(np.stack(thetas) * np.reshape(w, (-1, 1, 1)), sum(w), 3 * T + 1)
    _record("mergekit/linear", precision.compare_to_bound(got, ref, bound), got, ref)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75])
@pytest.mark.parametrize("case", ["random", "near_colinear"])
def test_mergekit_slerp(t, case):
    torch = require("torch")
    sl = require("mergekit.merge_methods.slerp")
    base = require("mergekit.merge_methods.base")
    rng = np.random.default_rng(11)
    v0 = rng.standard_normal(SHAPE).astype(np.float32)
    v1 = rng.standard_normal(SHAPE).astype(np.float32)
    if case == "near_colinear":
        v1 = (2 * v0 + 0.01 * v1).astype(np.float32)
    batch = base.TensorBatch((torch.from_numpy(v0)[None], torch.from_numpy(v1)[None]), base_index=0)
    got = sl.slerp_merge_method.merge_batch(batch, t=torch.tensor([t]))[0].numpy()
    ref = merging.slerp(t, v0, v1)
    c = merging.slerp_coefficients(t, v0, v1)
    n = v0.size
    a, b = v0.astype(np.float64).ravel(), v1.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    # |Δdot| ≤ γ_{n+2}·Σ|â b̂| + 2γ_n (the two norms): float32 sums of n terms
    ddot = precision.gamma(n + 2, "float32") * np.abs(a / na) @ np.abs(b / nb) + 2 * precision.gamma(n, "float32")
    if c.linear:
        dc0 = dc1 = 0.0
    else:
        # first-order sensitivity of c0, c1 to cos Ω: dc/dΩ · dΩ/dcos, dΩ/dcos = −1/sin Ω
        om = np.arccos(c.dot)
        s = np.sin(om)
        dc0 = abs(((1 - t) * np.cos((1 - t) * om) * s - np.sin((1 - t) * om) * np.cos(om)) / s**2 / s) * ddot
        dc1 = abs((t * np.cos(t * om) * s - np.sin(t * om) * np.cos(om)) / s**2 / s) * ddot
    # coefficient evaluation (acos, sin, division: a few roundings) and c0·v0 + c1·v1 (3 roundings)
    g = precision.gamma(8, "float32")
    bound = (dc0 + g * abs(c.c0)) * np.abs(v0) + (dc1 + g * abs(c.c1)) * np.abs(v1)
    _record("mergekit/slerp", precision.compare_to_bound(got, ref, bound), got, ref)


def test_zz_print_worst_error_over_bound_per_profile():
    """Summary: the worst error/bound per peer and method, over every differential test above."""
    if not WORST:
        pytest.skip("no differential test ran")
    for label, ratio in sorted(WORST.items()):
        print(f"WORST {label}: error/bound = {ratio:.3g}, max |difference| = {WORST_ABS.get(label, float('nan')):.3g}")
    for profile in ("peft", "mergekit"):
        vals = [v for k, v in WORST.items() if k.startswith(profile + "/")]
        diffs = [v for k, v in WORST_ABS.items() if k.startswith(profile + "/")]
        if vals:
            print(
                f"WORST profile={profile}: error/bound = {max(vals):.3g}, max |difference| = {max(diffs):.3g} "
                f"over {len(vals)} methods"
            )
    assert max(WORST.values()) <= 1.0
