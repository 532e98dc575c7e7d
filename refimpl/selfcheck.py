"""``refimpl info``: versions, and a self-check of the LoRA invariants on random layers.

Each check is one of the spec's invariants evaluated on a few seeded random
layers in float64; the command exits non-zero if any fails.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable

import numpy as np

import refimpl
from refimpl import lora, precision

_OPTIONAL = ("numba", "cupy", "torch", "peft", "bitsandbytes", "mergekit", "matplotlib")


def versions() -> dict[str, str]:
    """Versions of refimpl, its spec, Python and every installed dependency or peer."""
    out = {"refimpl": refimpl.__version__, "spec": refimpl.SPEC_VERSION, "python": platform.python_version()}
    for dist in ("numpy", "scipy", "ml_dtypes", "safetensors", *_OPTIONAL):
        try:
            out[dist] = importlib.metadata.version(dist if dist != "cupy" else "cupy-cuda13x")
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _layers(seed: int = 0, count: int = 5):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        out_f, in_f = (int(v) for v in rng.integers(2, 48, size=2))
        r = int(rng.integers(1, min(in_f, out_f) + 1))
        W = rng.standard_normal((out_f, in_f))
        A = rng.standard_normal((r, in_f))
        B = rng.standard_normal((out_f, r))
        x = rng.standard_normal((3, in_f))
        yield W, A, B, x, float(rng.uniform(0.5, 32.0)) / r


def lora_invariants() -> list[tuple[str, bool, str]]:
    """(name, passed, detail) for each LoRA invariant of spec/lora.md."""
    results: list[tuple[str, bool, str]] = []

    def check(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        ok, detail = fn()
        results.append((name, ok, detail))

    def zero_b() -> tuple[bool, str]:
        worst = 0.0
        for W, A, B, x, s in _layers():
            y = lora.forward(x, W, A, np.zeros_like(B), s)
            worst = max(worst, float(np.abs(y - x @ W.T).max()))
        return worst == 0.0, f"max |forward − base| = {worst:g} (exact)"

    def merged_equals_unmerged() -> tuple[bool, str]:
        worst = 0.0
        for W, A, B, x, s in _layers(1):
            merged = lora.merge(W, A, B, s)
            bound = precision.gamma(W.shape[1] + A.shape[0] + 3, "float64") * (
                np.abs(x) @ (np.abs(W) + abs(s) * np.abs(B) @ np.abs(A)).T
            )
            rep = precision.compare_to_bound(lora.forward(x, W, A, B, s), x @ merged.T, 2 * bound)
            worst = max(worst, rep.worst_ratio)
        return worst <= 1.0, f"worst error/bound = {worst:.3g}"

    def unmerge_inverts_merge() -> tuple[bool, str]:
        worst = 0.0
        for W, A, B, _x, s in _layers(2):
            back = lora.unmerge(lora.merge(W, A, B, s), A, B, s)
            bound = 2 * precision.unit_roundoff("float64") * (np.abs(W) + 2 * np.abs(lora.delta(A, B, s)))
            worst = max(worst, precision.compare_to_bound(back, W, bound).worst_ratio)
        return worst <= 1.0, f"worst error/bound = {worst:.3g}"

    def counts() -> tuple[bool, str]:
        n = lora.param_count(4096, 4096, 8)
        return n == 2 * 4096 * 8 and 4096 * 4096 // n == 256, f"d = 4096, r = 8: {n:,} parameters, {4096**2 // n}x"

    check("zero B leaves forward equal to the base layer", zero_b)
    check("forward equals x·merge(W)ᵀ", merged_equals_unmerged)
    check("unmerge(merge(W)) equals W", unmerge_inverts_merge)
    check("param_count = r·(in + out)", counts)
    return results


def main() -> int:
    for name, version in versions().items():
        print(f"{name:>14}  {version}")
    print()
    results = lora_invariants()
    for name, ok, detail in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    failed = sum(not ok for _, ok, _ in results)
    print(f"\nself-check: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0
