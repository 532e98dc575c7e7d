"""Op rows for refimpl.merging (spec/merging.md; task arithmetic arXiv 2212.04089, TIES arXiv 2306.01708,
DARE arXiv 2311.03099).

Bounds: every merge output element is a (masked, weighted) sum of at most T task entries, divided by
a count or scaled by 1/d, so |error| ≤ γ_K · |λ| Σ_t |w_t| |τ_t| / d_min with K = T + 4. The
selection steps (trim, sign election) are exact comparisons; with the drawn data the election's sums
are exact where they decide a sign (dyadic golden inputs) or far from a tie.
"""

from __future__ import annotations

import numpy as np

from refimpl.conformance.table import Case, OpSpec, Special, abs_case
from refimpl.conformance.tolerance import Bounded


def _ref(name: str):
    import refimpl.merging as merging

    return getattr(merging, name)


def _strategy(*, density: bool = False, masks: bool = False, positive_weights: bool = False,
              key: str = "task_vectors"):
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        t = draw(st.integers(1, 3))
        shape = draw(st.one_of(st.tuples(rs.dims(1, 12)), st.tuples(rs.dims(1, 4), rs.dims(1, 4))))
        c: Case = {key: [draw(rs.float_arrays(shape)) for _ in range(t)]}
        if draw(st.booleans()):
            w = rs.reals(0.125, 2.0) if positive_weights else rs.reals(-2.0, 2.0)
            c["weights"] = [draw(w) for _ in range(t)]
        if density:
            c["density"] = draw(st.sampled_from([0.1, 0.2, 0.5, 0.7, 0.9, 1.0]))
        if masks:  # keep masks consistent with the keep probability: density 1 keeps everything
            c["masks"] = [(draw(rs.keep_masks(shape)) > 0) | (c["density"] >= 1.0) for _ in range(t)]
        return c

    if density and not masks:
        # which of several equal magnitudes a trim keeps is implementation-defined (torch.topk, argsort):
        # the differential domain has distinct non-zero magnitudes; ties are a special value
        return build().filter(lambda c: all(_distinct_magnitudes(t) for t in c[key]))
    return build()


def _distinct_magnitudes(tau: np.ndarray) -> bool:
    a = np.abs(tau[tau != 0])
    return np.unique(a).size == a.size


def _golden(rng: np.random.Generator, *, density: bool = False, masks: bool = False,
            key: str = "task_vectors") -> list[tuple[str, Case]]:
    from refimpl.conformance.strategies import dyadic

    out = []
    for i, (t, shape) in enumerate([(2, (10,)), (3, (4, 6)), (3, (100,))]):
        c: Case = {key: [dyadic(rng, shape) for _ in range(t)]}
        if i > 0:
            c["weights"] = [float(w) for w in dyadic(rng, (t,), bits=2) + 2.25]  # positive, exact
        if density:
            c["density"] = (0.2, 0.5, 0.3)[i]
        if masks:
            c["masks"] = [rng.random(shape) < c.get("density", 0.5) for _ in range(t)]
        out.append((f"case{i}_T{t}_{'x'.join(map(str, shape))}", c))
    return out


def _sum_magnitude(case: Case, key: str = "task_vectors", density: bool = False) -> dict[str, np.ndarray]:
    taus = case[key]
    w = case.get("weights") or [1.0] * len(taus)
    mag = sum(abs(wt) * np.abs(np.asarray(tau)) for wt, tau in zip(w, taus, strict=True))
    if density:
        mag = mag / float(case["density"])
    return {"out": abs(float(case.get("lam", 1.0))) * mag}


def _depth(case: Case) -> int:
    return len(case.get("task_vectors") or case.get("tensors")) + 4


def _l1_rescaled(case: Case) -> bool:
    return case.get("rescale") == "l1" or (case.get("rescale") is None and case.get("profile") == "mergekit")


def _dare_depth(case: Case) -> int:
    # mergekit's L1 rescale ‖τ‖₁ / ‖τ ⊙ m‖₁ adds two n-term sums and a division per task
    n = int(np.asarray(case["task_vectors"][0]).size)
    return _depth(case) + (2 * n + 1 if _l1_rescaled(case) else 0)


def _dare_magnitude(case: Case) -> dict[str, np.ndarray]:
    if not _l1_rescaled(case):
        return _sum_magnitude(case, density=True)
    taus, masks = case["task_vectors"], case["masks"]
    w = case.get("weights") or [1.0] * len(taus)
    mag = 0.0
    for wt, tau, m in zip(w, taus, masks, strict=True):
        a = np.abs(np.asarray(tau))
        kept = float((a * np.asarray(m)).sum())
        mag = mag + abs(wt) * a * (float(a.sum()) / kept if kept > 0 else 1.0)
    return {"out": abs(float(case.get("lam", 1.0))) * mag}


def _specials(example, key: str = "task_vectors") -> list[Special]:
    base = example()
    out = []
    for label, val in (("nan", np.nan), ("inf", np.inf)):
        c = {**base, key: [t.copy() for t in base[key]]}
        c[key][0].flat[0] = val
        out.append(Special(f"{key}[0] has {label}", c))
    out.append(Special("mismatched shapes", {**base, key: [base[key][0], np.zeros(base[key][0].size + 1)]}))
    out.append(Special("weights of the wrong length", {**base, "weights": [1.0] * (len(base[key]) + 1)}))
    out.append(Special("integer tensors", {**base, key: [np.arange(4)] * len(base[key])}))
    if "density" in base and "masks" not in base:
        tied = [np.array([0.0, 0.0, 0.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0, -1.0, 1.0])]
        out.append(Special("tied magnitudes at the trim threshold", {**base, key: tied, "weights": [1.0, 1.0],
                                                                     "density": 0.2}))
    if "density" in base:
        out.append(Special("density 0", {**base, "density": 0.0}))
        out.append(Special("density above 1", {**base, "density": 1.5}))
    return out


def rows() -> list[OpSpec]:
    ex = lambda **kw: (lambda: dict(_golden(np.random.default_rng(0), **kw)[1][1]))  # noqa: E731
    return [
        OpSpec("merging.task_vector",
               lambda: _strategy().map(lambda c: {"finetuned": c["task_vectors"][0],
                                                  "base": c["task_vectors"][-1]}),
               "finetuned and base: float arrays of one shape and dtype",
               Bounded(lambda c: 1, lambda c: {"out": np.abs(c["finetuned"]) + np.abs(c["base"])}),
               golden=lambda rng: [(n, {"finetuned": c["task_vectors"][0], "base": c["task_vectors"][1]})
                                   for n, c in _golden(rng)],
               specials=lambda: [Special("shapes differ", {"finetuned": np.zeros(3), "base": np.zeros(4)}),
                                 Special("finetuned has nan", {"finetuned": np.array([np.nan]), "base": np.zeros(1)})]),
        OpSpec("merging.task_arithmetic", _strategy, "1–3 float task vectors of one shape; weights finite",
               Bounded(_depth, lambda c: {"out": _ref("task_arithmetic")(**abs_case(c))}),
               golden=_golden, specials=lambda: _specials(ex())),
        OpSpec("merging.linear", lambda: _strategy(positive_weights=True, key="tensors"),
               "1–3 float tensors of one shape; positive weights (normalised average)",
               Bounded(_depth, lambda c: {"out": _ref("linear")(**abs_case(c))}),
               golden=lambda rng: _golden(rng, key="tensors"),
               specials=lambda: _specials(ex(key="tensors"), "tensors")),
        OpSpec("merging.ties", lambda: _strategy(density=True), "task vectors; density in (0, 1]; weights finite",
               Bounded(_depth, _sum_magnitude), golden=lambda rng: _golden(rng, density=True),
               specials=lambda: _specials(ex(density=True))),
        OpSpec("merging.magnitude_prune", lambda: _strategy(density=True),
               "task vectors; density in (0, 1]; weights finite",
               Bounded(_depth, _sum_magnitude), golden=lambda rng: _golden(rng, density=True),
               specials=lambda: _specials(ex(density=True))),
        OpSpec("merging.dare", lambda: _strategy(density=True, masks=True),
               "task vectors; keep masks (bool, one per task); density in (0, 1]",
               Bounded(_dare_depth, _dare_magnitude),
               golden=lambda rng: _golden(rng, density=True, masks=True),
               specials=lambda: _specials(ex(density=True, masks=True))),
    ]
