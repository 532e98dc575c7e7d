"""Planted bugs: each must be caught, with a shrunk counterexample printed as a snippet.

Each planted target is the reference with one deliberate mistake; the harness must fail it in
the differential tier (Hypothesis shrinks the input) and the snippet must reproduce the failure.
"""

from __future__ import annotations

import numpy as np

from refimpl import merging, quant
from refimpl.conformance import run
from refimpl.conformance.targets import NamespaceTarget

PROPS = ("names", "properties")


def _shrunk_failure(target, op, examples=60):
    res = run(target, op, examples=examples, tiers=PROPS)
    assert not res.ok, f"planted bug in {op} was not caught"
    fail = next(r for r in res.failures if r.tier == "properties")
    assert "smallest failing input (shrunk)" in fail.snippet
    # an in-memory target has no importable name: the snippet still runs (its target call is a placeholder)
    ns: dict = {"__name__": "snippet"}
    exec(compile(fail.snippet, "<snippet>", "exec"), ns)
    assert "expected" in ns and not isinstance(ns["expected"], Exception)
    print(f"\n{op}: caught; shrunk counterexample:\n{fail.snippet}\n{fail.message}")
    return fail, ns


def test_planted_lora_scaling_alpha_instead_of_alpha_over_r_is_caught():
    import refimpl.lora as lora

    def bad_scaling(alpha, r, *, use_rslora=False):
        return float(alpha)  # forgot to divide by r (or √r)

    target = NamespaceTarget("planted-lora", {"lora.scaling": bad_scaling})
    _, ns = _shrunk_failure(target, "lora.scaling")
    # shrunk to the smallest r where α and α/r differ, with a non-zero α
    assert ns["r"] == 2 and ns["alpha"] != 0
    assert bad_scaling(ns["alpha"], ns["r"]) != lora.scaling(ns["alpha"], ns["r"], use_rslora=ns["use_rslora"])


def test_planted_nf4_swapped_nibble_order_is_caught():

    def swapped(x, blocksize=64, quant_type="nf4", double_quant=False, **kw):
        packed, state = quant.quantize_4bit(x, blocksize, quant_type, double_quant, **kw)
        return ((packed & 0x0F) << 4) | (packed >> 4), state  # low nibble first: wrong

    target = NamespaceTarget("planted-nf4", {"quant.quantize_4bit": swapped})
    fail, ns = _shrunk_failure(target, "quant.quantize_4bit")
    assert "out.0" in fail.message  # the packed codes differ
    assert ns["x"].size <= 2  # shrunk: one byte (one element and the pad nibble) shows the swap
    got, _ = swapped(ns["x"], ns["blocksize"], ns["quant_type"], ns["double_quant"])
    want, _ = quant.quantize_4bit(ns["x"], ns["blocksize"], ns["quant_type"], ns["double_quant"])
    assert not np.array_equal(got, want)


def test_planted_ties_k_off_by_one_is_caught():

    def ties_k_plus_one(task_vectors, weights=None, *, density, **kw):
        n = np.asarray(task_vectors[0]).size
        k = int(density * n)
        # keep one entry more than ⌊density·n⌋ (density nudged so the floor lands on k + 1)
        return merging.ties(task_vectors, weights, density=min(1.0, (k + 1.5) / n), **kw)

    target = NamespaceTarget("planted-ties", {"merging.ties": ties_k_plus_one})
    fail, ns = _shrunk_failure(target, "merging.ties")
    # call both with exactly the snippet's arguments (the strategy draws every option, not only density)
    call = next(line for line in fail.snippet.splitlines() if line.startswith("expected = outcome(ref.ties, "))
    args = call.split("ref.ties, ", 1)[1].rstrip(")")
    got = eval(f"planted({args})", {**ns, "planted": ties_k_plus_one})
    want = eval(f"merging.ties({args})", {**ns, "merging": merging})
    assert not np.array_equal(got, want)


def test_planted_dora_norm_over_the_wrong_axis_is_caught():

    def dora_column_norm(x, W, A, B, m, scaling, *, bias=None, dropout_mask=None, dropout_p=0.0, fan_in_fan_out=False):
        w = np.asarray(W).T if fan_in_fan_out else np.asarray(W)
        v = w + scaling * (np.asarray(B) @ np.asarray(A))
        col = np.linalg.norm(v, axis=0, keepdims=True)  # wrong: per input column, not per output row
        direction = v / np.where(col == 0, 1.0, col)
        y = np.asarray(m) * (np.asarray(x) @ direction.T)
        return y if bias is None else y + bias

    target = NamespaceTarget("planted-dora", {"dora.forward": dora_column_norm})
    fail, ns = _shrunk_failure(target, "dora.forward")
    assert ns["W"].size >= 2  # a 1×1 weight has one row and one column: the axes coincide
    assert np.isfinite(fail.worst_ratio) and fail.worst_ratio > 1
