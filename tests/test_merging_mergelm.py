"""The ``mergelm`` profile of TIES and DARE-TIES against a transcription of the DARE authors' rules.

Source: yule-BUAA/MergeLM, ``model_merging_methods/merging_methods.py`` (``ties_merging``: the nested
``mask_smallest_magnitude_param_values``, ``get_param_signs``, ``disjoint_merge``) and
``model_merging_methods/mask_weights_utils.py`` (``mask_input_with_mask_rate``, ``mask_strategy="random"``).
The functions below restate those rules as facts, in plain Python loops, independently of refimpl:

* trim: num_mask = int(n · mask_rate); keep |x| ≥ the num_mask-th smallest |x| (``kthvalue``, ``>=``);
* sign: γ = sign(Σ_t x_t); where γ = 0, γ = sign(Σ_p γ_p) (which may itself be 0);
* disjoint merge: keep x_t where (γ > 0 ∧ x_t > 0) ∨ (γ < 0 ∧ x_t < 0); divide the sum of the kept
  entries by max(number of kept non-zero entries, 1); the merged task vector is scaled by λ;
* DARE: x ⊙ (1 − drop mask) / (1 − weight_mask_rate), then the above.

MergeLM takes the mask rate; refimpl takes the keep fraction d, so mask_rate = 1 − d here (and the
rescale divides by d). MergeLM has no per-task weights (w = 1).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from refimpl import merging
from refimpl.merging.sparsify import trim_mask


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def mergelm_trim(x: list[float], mask_rate: float) -> list[float]:
    n = len(x)
    num_mask = int(n * mask_rate)
    if num_mask == 0:  # torch.kthvalue(k=0) raises in MergeLM; nothing would be masked
        return list(x)
    kth = sorted(abs(v) for v in x)[num_mask - 1]
    return [v if abs(v) >= kth else 0.0 for v in x]


def mergelm_ties(taus: list[list[float]], mask_rate: float, lam: float = 1.0) -> list[float]:
    trimmed = [mergelm_trim(t, mask_rate) for t in taus]
    n = len(taus[0])
    signs = [_sign(sum(t[p] for t in trimmed)) for p in range(n)]
    majority = _sign(sum(signs))
    signs = [majority if s == 0 else s for s in signs]
    out = []
    for p in range(n):
        kept = [t[p] for t in trimmed if (signs[p] > 0 and t[p] > 0) or (signs[p] < 0 and t[p] < 0)]
        count = sum(1 for v in kept if v != 0)
        total = 0.0
        for v in kept:
            total += v
        out.append(lam * (total / max(count, 1)))
    return out


def mergelm_dare_ties(
    taus: list[list[float]], keep: list[list[bool]], d: float, mask_rate: float, lam: float = 1.0
) -> list[float]:
    dropped = [
        [v * (1.0 if k else 0.0) / d for v, k in zip(t, m, strict=True)] for t, m in zip(taus, keep, strict=True)
    ]
    return mergelm_ties(dropped, mask_rate, lam)


def test_worked_example_elected_sign_zero_gives_zero():
    taus = [np.array([1.0, -2.0]), np.array([-1.0, 2.0])]
    assert mergelm_ties([t.tolist() for t in taus], 0.0) == [0.0, 0.0]
    np.testing.assert_array_equal(merging.ties(taus, density=1.0, profile="mergelm"), [0.0, 0.0])
    # the official TIES code (profile="paper") lets γ = 0 select the negative entries
    np.testing.assert_array_equal(merging.ties(taus, density=1.0, profile="paper"), [-1.0, -2.0])
    masks = [np.ones(2, bool)] * 2
    np.testing.assert_array_equal(
        merging.dare(taus, density=1.0, masks=masks, merge="ties", profile="mergelm", ties_density=1.0), [0.0, 0.0]
    )


def test_worked_example_n10_d025_keeps_4():
    x = np.arange(1.0, 11.0)
    assert int(trim_mask(x, 0.25, k_rule="mask_rate").sum()) == 4
    assert sum(v != 0 for v in mergelm_trim(x.tolist(), 1 - 0.25)) == 4
    assert int(trim_mask(x, 0.25, k_rule="threshold").sum()) == 3  # official TIES code
    out = merging.ties([x], density=0.25, profile="mergelm")
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0, 0, 7, 8, 9, 10])


def _draw(rng: np.random.Generator, t: int, n: int) -> list[np.ndarray]:
    if rng.random() < 0.5:  # tie-rich dyadic values, exact zero scores
        return [rng.integers(-3, 4, size=n) * 0.5 for _ in range(t)]
    return [rng.standard_normal(n) for _ in range(t)]


@pytest.mark.parametrize("seed", range(40))
def test_ties_matches_mergelm_transcription(seed):
    rng = np.random.default_rng(seed)
    t, n = int(rng.integers(1, 5)), int(rng.integers(1, 41))
    taus = _draw(rng, t, n)
    d = float(rng.choice([0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0]))
    lam = float(rng.choice([1.0, 0.5, -1.0]))
    expected = mergelm_ties([x.tolist() for x in taus], 1.0 - d, lam)
    got = merging.ties(taus, density=d, profile="mergelm", lam=lam)
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("seed", range(40))
def test_dare_ties_matches_mergelm_transcription(seed):
    rng = np.random.default_rng(1000 + seed)
    t, n = int(rng.integers(1, 5)), int(rng.integers(1, 41))
    taus = _draw(rng, t, n)
    d = float(rng.choice([0.3, 0.5, 0.9, 1.0]))
    td = float(rng.choice([0.2, 0.25, 0.5, 1.0]))
    keep = [(rng.random(n) < d) | (d >= 1.0) for _ in range(t)]
    expected = mergelm_dare_ties([x.tolist() for x in taus], [k.tolist() for k in keep], d, 1.0 - td)
    got = merging.dare(taus, density=d, masks=keep, merge="ties", profile="mergelm", ties_density=td)
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)


def test_dare_mergelm_default_ties_density_is_mergelm_mask_rate():
    rng = np.random.default_rng(7)
    taus = [rng.standard_normal(30) for _ in range(3)]
    keep = [rng.random(30) < 0.5 for _ in range(3)]
    expected = mergelm_dare_ties([x.tolist() for x in taus], [k.tolist() for k in keep], 0.5, 0.8)
    got = merging.dare(taus, density=0.5, masks=keep, merge="ties", profile="mergelm")
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_numba_kernel_mergelm_profile(seed):
    pytest.importorskip("numba")  # the optional fast extra; refimpl's kernel module itself must import
    kernels = importlib.import_module("refimpl.kernels.numba_cpu.ties")
    rng = np.random.default_rng(2000 + seed)
    taus = _draw(rng, 3, 37)
    taus.append(-taus[0] - taus[1] - taus[2])  # every score 0, global majority 0
    for d in (0.25, 1.0):
        exp = merging.ties(taus, density=d, profile="mergelm")
        got = kernels.ties(taus, density=d, profile="mergelm", out_dtype=np.float64)
        np.testing.assert_array_equal(got, exp)
