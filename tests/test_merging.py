"""Properties, special values and bad input of refimpl.merging (spec/merging.md)."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from refimpl import merging, precision

PROFILES = ("paper", "peft", "mergekit")

finite = st.floats(-4, 4, allow_nan=False, allow_subnormal=False, width=64)


@st.composite
def task_stacks(draw, min_tasks=1, max_tasks=4):
    t = draw(st.integers(min_tasks, max_tasks))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=7))
    return [draw(hnp.arrays(np.float64, shape, elements=finite)) for _ in range(t)]


def _sum_bound(terms: np.ndarray, n_ops: int) -> np.ndarray:
    """γ_n(float64)·Σ|terms| over the task axis: the bound for a float64 reduction of n operations."""
    return precision.gamma(n_ops, "float64") * np.abs(terms).sum(axis=0)


# ---------------------------------------------------------------- task vectors and arithmetic


def test_task_vector_is_difference_and_skips_integer_buffers():
    base = {"w": np.array([1.0, 2.0], np.float32), "pos": np.arange(3)}
    ft = {"w": np.array([1.5, 1.0], np.float32), "pos": np.arange(3)}
    tv = merging.task_vector(ft, base)
    assert list(tv) == ["w"]
    np.testing.assert_array_equal(tv["w"], [0.5, -1.0])


@given(task_stacks(min_tasks=2), st.data())
def test_task_arithmetic_is_linear_in_weights_and_lambda(taus, data):
    w1 = data.draw(st.lists(finite, min_size=len(taus), max_size=len(taus)))
    w2 = data.draw(st.lists(finite, min_size=len(taus), max_size=len(taus)))
    lam = data.draw(finite)
    a = merging.task_arithmetic(taus, w1, lam=lam)
    b = merging.task_arithmetic(taus, w2, lam=lam)
    both = merging.task_arithmetic(taus, np.add(w1, w2).tolist(), lam=lam)
    terms = np.stack(taus) * (np.abs(w1) + np.abs(w2)).reshape((-1,) + (1,) * taus[0].ndim) * abs(lam)
    rep = precision.compare_to_bound(a + b, both, _sum_bound(terms, 2 * len(taus) + 4))
    assert rep.passed, str(rep)


def test_task_arithmetic_negation_and_normalize():
    tau = np.array([1.0, -2.0, 3.0])
    np.testing.assert_array_equal(merging.task_arithmetic([tau], lam=-0.5), -0.5 * tau)
    out = merging.task_arithmetic([tau, 3 * tau], [1.0, 3.0], normalize=True)
    np.testing.assert_array_equal(out, (tau + 9 * tau) / 4)
    with pytest.raises(ValueError, match="normalize"):
        merging.task_arithmetic([tau, tau], [1.0, -1.0], normalize=True)


def test_linear_is_a_weighted_average():
    a, b = np.array([0.0, 4.0]), np.array([2.0, 8.0])
    np.testing.assert_array_equal(merging.linear([a, b], [1.0, 3.0]), (a + 3 * b) / 4)
    np.testing.assert_array_equal(merging.linear([a, b], [1.0, 3.0], normalize=False), a + 3 * b)
    with pytest.raises(ValueError, match="Σ w"):
        merging.linear([a, b], [1.0, -1.0])


def test_flatten_model_round_trips_sorted_keys():
    state = {"b": np.ones((2, 2)), "a": np.arange(3.0), "ids": np.arange(4)}
    vec, layout = merging.flatten_model(state)
    assert layout.keys == ("a", "b")
    np.testing.assert_array_equal(vec, [0, 1, 2, 1, 1, 1, 1])
    back = merging.unflatten_model(vec, layout)
    np.testing.assert_array_equal(back["b"], state["b"])


# ---------------------------------------------------------------- trim


def test_threshold_trim_keeps_k_plus_one_like_official_ties():
    tau = np.random.default_rng(0).standard_normal(1000)
    assert merging.trim_mask(tau, 0.2, k_rule="threshold").sum() == 201  # merging.md §3.1, measured
    assert merging.trim_mask(tau, 0.2, k_rule="floor").sum() == 200
    assert merging.trim_mask(tau, 0.0001, k_rule="floor").sum() == 0
    assert merging.trim_mask(tau, 0.0001, k_rule="floor_min1").sum() == 1


def test_floor_trim_breaks_ties_by_lower_index_and_threshold_keeps_ties():
    tau = np.array([1.0, -3.0, 3.0, 3.0, 0.5])
    np.testing.assert_array_equal(merging.trim_mask(tau, 0.4, k_rule="floor"), [0, 1, 1, 0, 0])
    # threshold: k = 2 kept values' threshold is the 3rd smallest |τ| = 3 -> all three 3s kept
    np.testing.assert_array_equal(merging.trim_mask(tau, 0.4, k_rule="threshold"), [0, 1, 1, 1, 0])


@given(task_stacks(max_tasks=1), st.floats(0.01, 1.0), st.sampled_from(("threshold", "floor", "floor_min1")))
def test_trim_keeps_the_largest_magnitudes(taus, d, rule):
    tau = taus[0]
    m = merging.trim_mask(tau, d, k_rule=rule)
    if m.any() and (~m).any():
        assert np.abs(tau[m]).min() >= np.abs(tau[~m]).max()
    k = int(d * tau.size)
    expected = {"floor": k, "floor_min1": max(1, k)}.get(rule)
    if d == 1.0:
        assert m.all()
    elif expected is not None:
        assert m.sum() == min(expected, tau.size)
    else:
        assert m.sum() >= k + 1


# ---------------------------------------------------------------- TIES


@pytest.mark.parametrize("profile", PROFILES)
@given(taus=task_stacks(max_tasks=1))
def test_one_task_at_density_one_returns_its_task_vector(profile, taus):
    out = merging.ties(taus, density=1.0, profile=profile)
    np.testing.assert_array_equal(out, taus[0])


@pytest.mark.parametrize("profile", PROFILES)
@given(taus=task_stacks(min_tasks=2), d=st.floats(0.05, 1.0))
def test_ties_is_invariant_under_task_permutation(profile, taus, d):
    w = [1.0 + 0.5 * i for i in range(len(taus))]
    ref = merging.ties(taus, w, density=d, profile=profile)
    perm = list(reversed(range(len(taus))))
    out = merging.ties([taus[i] for i in perm], [w[i] for i in perm], density=d, profile=profile)
    terms = np.stack(
        [
            merging.trim_mask(t, d, k_rule=merging.sparsify.TRIM_K_RULE[profile]) * t * wi
            for t, wi in zip(taus, w, strict=True)
        ]
    )
    rep = precision.compare_to_bound(out, ref, _sum_bound(terms, 2 * len(taus) + 2))
    assert rep.passed, str(rep)


@pytest.mark.parametrize("profile", PROFILES)
@given(taus=task_stacks(max_tasks=1), n=st.integers(2, 4), d=st.floats(0.05, 1.0))
def test_identical_tasks_merge_to_their_trimmed_self(profile, taus, n, d):
    tau = taus[0]
    rule = merging.sparsify.TRIM_K_RULE[profile]
    out = merging.ties([tau] * n, density=d, profile=profile)
    expected = tau * merging.trim_mask(tau, d, k_rule=rule)  # n agreeing copies / n (count or Σ w)
    rep = precision.compare_to_bound(out, expected, _sum_bound(np.stack([expected] * n), n + 2))
    assert rep.passed, str(rep)


def test_ties_election_and_divisors_on_a_worked_example():
    t1 = np.array([2.0, -1.0, 0.5, 1.0])
    t2 = np.array([-1.0, -3.0, 0.5, -1.0])
    w = [1.0, 3.0]
    # paper / PEFT: elect on unweighted sums (1, -4, 1, 0 -> +1 for PEFT), divide by count
    peft = merging.ties([t1, t2], w, density=1.0, profile="peft")
    np.testing.assert_array_equal(peft, [2.0, (-1 - 9) / 2, (0.5 + 1.5) / 2, 1.0])
    # paper: the zero sum takes the global majority sign sgn(1 - 1 + 1 + 0) = +1
    paper = merging.ties([t1, t2], w, density=1.0, profile="paper")
    np.testing.assert_array_equal(paper, peft)
    # mergekit: elect on weighted sums (-1, -10, 2, -2), divide by agreeing weights
    mk = merging.ties([t1, t2], w, density=1.0, profile="mergekit")
    np.testing.assert_array_equal(mk, [-3.0 / 3, -10.0 / 4, 2.0 / 4, -3.0 / 3])
    # count election: (0, -2, 2, 0) -> +1, -1, +1, +1
    cnt = merging.ties([t1, t2], w, density=1.0, profile="peft", elect="count")
    np.testing.assert_array_equal(cnt, [2.0, -5.0, 1.0, 1.0])
    none = merging.ties([t1, t2], w, density=1.0, profile="mergekit", divisor="none", lam=2.0)
    np.testing.assert_array_equal(none, 2 * np.array([-3.0, -10.0, 2.0, -3.0]))


def test_ties_global_majority_zero_that_is_zero_selects_negatives():
    t1 = np.array([1.0, -1.0])
    t2 = np.array([-1.0, 1.0])
    out = merging.elect_and_merge(
        np.stack([t1, t2]),
        np.ones(2),
        elect="sum",
        zero_sign="global_majority",
        weight_stage="after_election",
        divisor="count",
    )
    np.testing.assert_array_equal(out, [-1.0, -1.0])  # merging.md §3.1 step 3
    out = merging.elect_and_merge(
        np.stack([t1, t2]),
        np.ones(2),
        elect="sum",
        zero_sign="positive",
        weight_stage="after_election",
        divisor="count",
    )
    np.testing.assert_array_equal(out, [1.0, 1.0])


def test_ties_whole_model_scope_through_flatten_model():
    rng = np.random.default_rng(3)
    models = [{"a": rng.standard_normal((4, 5)), "b": 10 * rng.standard_normal(7)} for _ in range(2)]
    vecs = [merging.flatten_model(m)[0] for m in models]
    layout = merging.flatten_model(models[0])[1]
    out = merging.unflatten_model(merging.ties(vecs, density=0.2, profile="paper"), layout)
    kept_a = sum(merging.trim_mask(v, 0.2)[:20].sum() for v in vecs)
    kept_b = sum(merging.trim_mask(v, 0.2)[20:].sum() for v in vecs)
    assert kept_b > kept_a  # the global trim favours the large tensor "b"
    assert set(out) == {"a", "b"}


# ---------------------------------------------------------------- DARE


def test_dare_with_given_masks_is_exact():
    tau = np.array([1.0, 2.0, -4.0, 8.0])
    mask = np.array([1, 0, 1, 0])
    out = merging.dare([tau], masks=[mask], density=0.5)
    np.testing.assert_array_equal(out, [2.0, 0.0, -8.0, 0.0])
    l1 = merging.dare([tau], masks=[mask], density=0.5, rescale="l1")
    np.testing.assert_array_equal(l1, np.array([1.0, 0.0, -4.0, 0.0]) * (15.0 / 5.0))


def test_dare_seeded_draw_is_reproducible_and_documented():
    taus = [np.ones(50), np.ones(50)]
    a = merging.dare(taus, density=0.3, rng=np.random.default_rng(7), profile="peft")
    masks = merging.dare_masks((50,), 2, 0.3, np.random.default_rng(7))
    b = merging.dare(taus, density=0.3, masks=masks, profile="peft")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(masks[0], np.random.default_rng(7).random(50) < 0.3)


def test_dare_preserves_the_mean_in_expectation():
    """Σ_i τ̂_i has mean Σ_i τ_i and variance Σ τ_i²(1−d)/d; |z| > 4.892 has probability 1e-6
    under the null (normal approximation; n = 200 000 terms), so the false-failure rate is ≈ 1e-6."""
    rng = np.random.default_rng(12345)
    tau = rng.standard_normal(200_000)
    d = 0.3
    out = merging.dare([tau], density=d, rng=rng, profile="paper")
    z = (out.sum() - tau.sum()) / np.sqrt((tau**2).sum() * (1 - d) / d)
    print(f"DARE mean test: z = {z:.3f} (reject at |z| > 4.892, alpha = 1e-6)")
    assert abs(z) < stats.norm.isf(0.5e-6)
    kept = int((out != 0).sum())
    p = stats.binomtest(kept, tau.size, d).pvalue
    print(f"DARE keep rate {kept / tau.size:.4f} vs {d}; binomial p = {p:.3g} (reject at 1e-6)")
    assert p > 1e-6


def test_dare_paper_ties_trims_after_the_drop_but_peft_does_not():
    rng = np.random.default_rng(0)
    taus = [rng.standard_normal(500) for _ in range(2)]
    masks = merging.dare_masks((500,), 2, 0.5, np.random.default_rng(1))
    paper = merging.dare(taus, masks=masks, density=0.5, merge="ties", profile="paper")
    peft = merging.dare(taus, masks=masks, density=0.5, merge="ties", profile="peft")
    assert (paper != 0).sum() < (peft != 0).sum()
    same = merging.dare(
        taus, masks=masks, density=0.5, merge="ties", profile="paper", ties_density=1.0, zero_sign="positive"
    )
    np.testing.assert_array_equal(same, peft)


# ---------------------------------------------------------------- SLERP


@given(task_stacks(min_tasks=2, max_tasks=2))
def test_slerp_endpoints_are_the_inputs(taus):
    np.testing.assert_array_equal(merging.slerp(0.0, *taus), taus[0])
    out = merging.slerp(1.0, *taus)
    bound = precision.gamma(2, "float64") * np.abs(taus[1]) + 4 * np.finfo(float).eps * np.abs(taus[0])
    assert precision.compare_to_bound(out, taus[1], bound).passed


def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors_and_falls_back_when_colinear():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    mid = merging.slerp(0.5, a, b)
    np.testing.assert_allclose(mid, [np.sqrt(0.5)] * 2, rtol=4 * np.finfo(float).eps)
    c = merging.slerp_coefficients(0.25, a, 2 * a)
    assert c.linear and (c.c0, c.c1) == (0.75, 0.25)
    assert merging.slerp_coefficients(0.25, a, -a).linear  # antiparallel: linear as in mergekit


# ---------------------------------------------------------------- LoRA space


def test_lora_cat_product_equals_weighted_delta_exactly():
    rng = np.random.default_rng(0)
    # small integers and power-of-two weights/scalings: every product and sum is exact in float64
    As = [rng.integers(-8, 9, (r, 6)).astype(float) for r in (2, 3)]
    Bs = [rng.integers(-8, 9, (5, r)).astype(float) for r in (2, 3)]
    A, B = merging.lora_cat(As, Bs, [2.0, 0.5], [0.25, -4.0])
    np.testing.assert_array_equal(B @ A, 0.5 * Bs[0] @ As[0] - 2.0 * Bs[1] @ As[1])
    assert A.shape == (5, 6) and B.shape == (5, 5)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16))
def test_lora_svd_is_exact_when_the_rank_suffices(r1, r2, seed):
    rng = np.random.default_rng(seed)
    As = [rng.standard_normal((r, 9)) for r in (r1, r2)]
    Bs = [rng.standard_normal((8, r)) for r in (r1, r2)]
    A, B = merging.lora_svd(As, Bs, [1.0, 2.0], [0.5, -1.5], rank=r1 + r2)
    target = merging.lora_delta(As, Bs, [1.0, 2.0], [0.5, -1.5])
    # backward-stable SVD: ‖E‖₂ ≤ γ_{m·n}·‖ΔW‖₂ (normwise, Higham §20), plus the product's γ_{r}
    bound = precision.gamma(8 * 9 + r1 + r2, "float64") * np.linalg.norm(target, 2)
    rep = precision.compare_to_bound(B @ A, target, np.full(target.shape, bound))
    assert rep.passed, str(rep)


def test_lora_svd_truncation_error_is_the_next_singular_value():
    rng = np.random.default_rng(1)
    As = [rng.standard_normal((4, 10)) for _ in range(2)]
    Bs = [rng.standard_normal((7, 4)) for _ in range(2)]
    delta = merging.lora_delta(As, Bs, 1.0)
    s = np.linalg.svd(delta, compute_uv=False)
    A, B = merging.lora_svd(As, Bs, 1.0, rank=3)
    err = np.linalg.norm(delta - B @ A, 2)
    assert abs(err - s[3]) <= precision.gamma(70, "float64") * s[0]
    A2, B2 = merging.lora_svd(As, Bs, 1.0, rank=3, split="sqrt")
    rep = precision.compare_to_bound(B2 @ A2, B @ A, precision.gamma(70, "float64") * s[0])
    assert rep.passed, str(rep)


def test_peft_factor_linear_has_cross_terms_worked_number():
    A = np.array([[1.0, 2.0]])
    B = np.array([[3.0], [1.0]])
    a, b = merging.lora_factor_linear([A, A], [B, B], 1.0, [0.5, 0.5])
    np.testing.assert_allclose(b @ a, 2 * (B @ A), rtol=4 * np.finfo(float).eps)  # N·BA with N = 2, not BA
    a1, b1 = merging.lora_factor_linear([A], [B], 2.0, [-1.5])  # a single adapter is exact
    np.testing.assert_allclose(b1 @ a1, -3.0 * (B @ A), rtol=4 * np.finfo(float).eps)


# ---------------------------------------------------------------- special values and bad input


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: merging.ties([np.ones(3), np.ones(4)], density=0.5), ValueError, "shape"),
        (lambda: merging.ties([np.ones(3), np.ones(3, np.float32)], density=0.5), ValueError, "dtype"),
        (lambda: merging.ties([np.ones(3)], density=0.0), ValueError, "density"),
        (lambda: merging.ties([np.ones(3)], density=20), ValueError, "density"),
        (lambda: merging.dare([np.ones(3)], density=1.5, rng=np.random.default_rng()), ValueError, "density"),
        (lambda: merging.ties([np.ones(3)] * 2, [1.0], density=0.5), ValueError, "weights"),
        (lambda: merging.task_arithmetic([np.arange(3)]), TypeError, "floating"),
        (lambda: merging.task_arithmetic([np.array([1.0, np.nan])]), ValueError, "finite"),
        (lambda: merging.task_arithmetic(np.ones((2, 3))), TypeError, "list"),
        (lambda: merging.ties([np.ones(3)], density=0.5, profile="official"), ValueError, "profile"),
        (lambda: merging.ties([np.ones(3)], density=0.5, elect="mass"), ValueError, "elect"),
        (lambda: merging.dare([np.ones(3)], density=0.5), ValueError, "exactly one"),
        (lambda: merging.dare([np.ones(3)], density=0.5, masks=[np.array([0, 2, 1])]), ValueError, "0/1"),
        (lambda: merging.dare([np.ones(3)], density=0.5, masks=[np.ones(4)]), ValueError, "shape"),
        (lambda: merging.dare([np.ones(3)], density=0.5, rng=0), TypeError, "Generator"),
        (lambda: merging.slerp(1.5, np.ones(2), np.ones(2)), ValueError, "t"),
        (lambda: merging.slerp(0.5, np.ones(2), np.ones(3)), ValueError, "shape"),
        (lambda: merging.lora_svd([np.ones((2, 3))], [np.ones((4, 2))], 1.0, rank=4), ValueError, "rank"),
        (lambda: merging.lora_cat([np.ones((2, 3))], [np.ones((4, 3))], 1.0), ValueError, "Bs"),
        (
            lambda: merging.lora_factor_linear(
                [np.ones((2, 3)), np.ones((1, 3))], [np.ones((4, 2)), np.ones((4, 1))], 1.0
            ),
            ValueError,
            "ranks",
        ),
        (lambda: merging.task_vector({"w": np.ones(2)}, {"w": np.ones(2), "v": np.ones(2)}), ValueError, "missing"),
        (lambda: merging.task_vector(np.ones(2, np.float32), np.ones(2)), ValueError, "dtype"),
    ],
)
def test_bad_input_raises_a_named_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bfloat16_inputs_are_accepted_and_computed_in_float64():
    a = np.array([1.0, -2.0], dtype=ml_dtypes.bfloat16)
    out = merging.task_arithmetic([a, a], [0.5, 0.25])
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [0.75, -1.5])


@pytest.mark.parametrize(("k_rule", "profile"), itertools.product(("floor", "threshold"), PROFILES))
def test_all_zero_task_vectors_merge_to_zero(k_rule, profile):
    z = [np.zeros(6), np.zeros(6)]
    assert not merging.ties(z, density=0.5, k_rule=k_rule, profile=profile).any()
    assert not merging.dare(z, density=0.5, rng=np.random.default_rng(0), profile=profile).any()


@pytest.mark.parametrize("profile", ("paper", "peft", "mergekit", "mergelm"))
def test_ties_and_dare_of_scalars_equal_their_one_element_vectors(profile):
    """0-d task vectors (a scalar parameter such as a logit scale) merge as 1-element vectors do."""
    scalars = [np.array(1.5), np.array(-2.0), np.array(0.25)]
    vectors = [s.reshape(1) for s in scalars]
    assert float(merging.ties(scalars, density=1.0, profile=profile)) == float(
        merging.ties(vectors, density=1.0, profile=profile)[0]
    )
    masks = [np.array(True), np.array(False), np.array(True)]
    assert float(merging.dare(scalars, density=0.5, masks=masks, merge="ties", profile=profile)) == float(
        merging.dare(vectors, density=0.5, masks=[m.reshape(1) for m in masks], merge="ties", profile=profile)[0]
    )
