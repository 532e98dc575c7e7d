"""bitsandbytes' CPU dequantize paths (AVX-512 kernel, C++ scalar loop, torch fallback) and their models.

The path rule (refimpl/conformance/peers/bnb_paths.py) is checked on synthetic hosts, so every branch is
tested on every machine; the models are checked against bitsandbytes itself on a grid of shapes, dtypes,
blocksizes and quant types, on whatever paths this host takes (printed). A model that is wrong (the
correct absmax index on the AVX-512 kernel, the other sign of zero on any path) must be caught: the
known divergence cannot hide a difference it does not explain. Also: the runner accepts a case as the
divergence only where the model reproduces it, and the reproducer script runs without refimpl.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from refimpl import quant
from refimpl.conformance import divergences
from tests._peers import require

pytestmark = pytest.mark.peers

_NP = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# 72 cases: 4 shapes × 3 dtypes × 3 blocksizes × 2 quant types. (3, 16) and (96, 80) have rows that are not
# whole blocks; (64, 128) is aligned for every blocksize below 2048; (130, 200) has 200 % 16 != 0.
GRID = list(
    itertools.product(
        [(3, 16), (96, 80), (64, 128), (130, 200)], ["float32", "float16", "bfloat16"], [32, 64, 4096], ["nf4", "fp4"]
    )
)


@pytest.fixture(scope="module")
def bnb():
    torch = require("torch")
    require("bitsandbytes.functional")
    import bitsandbytes.functional as F

    from refimpl.conformance.peers import bnb_paths

    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True  # eager: the same float32 products, no recompile per shape
    print("\n" + "\n".join(bnb_paths.host_lines()))
    yield torch, F, bnb_paths
    torch._dynamo.config.disable = previous


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _n_differ(a: np.ndarray, b: np.ndarray) -> int:
    """Elements whose bits differ (NaN equals NaN, as in the runner's exact comparison)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    nan = np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32))
    return int(((_bits(a) != _bits(b)) & ~nan).sum())


def _peer(torch, F, packed: np.ndarray, state: quant.QuantState) -> np.ndarray:
    qs = F.QuantState.from_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.to_bnb_dict().items()},
        device=torch.device("cpu"),
    )
    out = F.dequantize_4bit(torch.from_numpy(packed), qs)
    if out.dtype == torch.bfloat16:
        return out.view(torch.int16).numpy().view(ml_dtypes.bfloat16).reshape(state.shape)
    return out.numpy().reshape(state.shape)


def _grid_cases():
    rng = np.random.default_rng(72)
    for shape, dtype, bs, qt in GRID:
        x = (rng.standard_normal(shape) * np.exp(rng.standard_normal(shape))).astype(np.float32).astype(_NP[dtype])
        x.reshape(-1)[::7] = 0  # FP4 nibble 8 and NF4's zero occur
        yield (shape, dtype, bs, qt), *quant.quantize_4bit(x, bs, qt, profile="bitsandbytes-cpu")


def test_path_rule_on_every_kind_of_host(bnb):
    """The rule bitsandbytes 0.50.2 applies (backends/cpu/ops.py, csrc/cpu_ops.cpp), on synthetic hosts."""
    _torch, _F, P = bnb
    base = P.host()
    avx512 = base.__class__(**{**base.__dict__, "bnb_has_avx512": True, "native": True, "kernel": P.AVX512})
    avx2 = base.__class__(**{**base.__dict__, "bnb_has_avx512": False, "native": True, "kernel": P.SCALAR})
    # avx512f in cpuid, but torch's capability says AVX2 (e.g. ATEN_CPU_CAPABILITY=avx2): no bs >= 2048 fallback
    mixed = base.__class__(**{**base.__dict__, "bnb_has_avx512": False, "native": True, "kernel": P.AVX512})
    nolib = base.__class__(**{**base.__dict__, "native": False, "kernel": P.TORCH_NOLIB})
    table = [  # shape, blocksize, path on avx512, avx2, mixed
        ((3, 16), 32, P.AVX512, P.SCALAR, P.AVX512),
        ((96, 80), 64, P.AVX512, P.SCALAR, P.AVX512),
        ((128,), 64, P.AVX512, P.SCALAR, P.AVX512),
        ((4, 40), 32, P.SCALAR, P.SCALAR, P.SCALAR),  # 40 % 16 != 0: the scalar loop even with AVX-512
        ((130, 200), 64, P.SCALAR, P.SCALAR, P.SCALAR),
        ((33, 129), 64, P.TORCH_ODD, P.TORCH_ODD, P.TORCH_ODD),
        ((7,), 4096, P.TORCH_ODD, P.TORCH_ODD, P.TORCH_ODD),
        ((2, 4096), 4096, P.TORCH_BS, P.SCALAR, P.AVX512),
        ((130, 200), 2048, P.TORCH_BS, P.SCALAR, P.SCALAR),
    ]
    for shape, bs, on_avx512, on_avx2, on_mixed in table:
        got = (
            P.dequantize_path(shape, bs, avx512),
            P.dequantize_path(shape, bs, avx2),
            P.dequantize_path(shape, bs, mixed),
            P.dequantize_path(shape, bs, nolib),
        )
        assert got == (on_avx512, on_avx2, on_mixed, P.TORCH_NOLIB), (shape, bs, got)


def test_notes_say_which_paths_ran_and_whether_the_avx512_kernel_was_exercised(bnb):
    _torch, _F, P = bnb
    base = P.host()
    avx2 = base.__class__(**{**base.__dict__, "avx512f": False, "bnb_has_avx512": False, "kernel": P.SCALAR})
    lines = P.host_lines({P.SCALAR: 3, P.TORCH_ODD: 2}, avx2)
    assert "C++ scalar 3, torch fallback (odd last dimension) 2" in lines[1]
    assert "the AVX-512 dequantize kernel was NOT exercised (this host has no AVX-512)" in lines[2]
    avx512 = base.__class__(**{**base.__dict__, "avx512f": True, "bnb_has_avx512": True, "kernel": P.AVX512})
    assert not any("NOT exercised" in line for line in P.host_lines({P.AVX512: 1}, avx512))
    assert "no case took it" in P.host_lines({P.SCALAR: 1}, avx512)[-1]


def test_probe_agrees_with_the_instruction_set(bnb):
    _torch, _F, P = bnb
    h = P.host()
    print(f"\nhost: {h}")
    assert h.kernel in (P.AVX512, P.SCALAR, P.TORCH_NOLIB), f"the C++ kernel matched no known behaviour: {h}"
    if h.native and h.machine in ("x86_64", "AMD64") and h.avx512f is not None:
        # the Linux x86-64 wheels are built with AVX-512: the kernel runs exactly where cpuid has avx512f
        assert (h.kernel == P.AVX512) == h.avx512f, h


def test_models_reproduce_bitsandbytes_bit_for_bit_on_a_grid(bnb):
    """For all 72 grid cases, bitsandbytes' output equals the model of the path it takes on this host."""
    torch, F, P = bnb
    per_path: dict[str, list[int]] = {}
    bad = []
    for key, packed, state in _grid_cases():
        path = P.dequantize_path(state.shape, state.blocksize)
        actual = _peer(torch, F, packed, state)
        n = _n_differ(actual, P.peer_dequantize(packed, state, path))
        vs_profile = _n_differ(actual, quant.dequantize_4bit(packed, state))
        per_path.setdefault(path, [0, 0])
        per_path[path][0] += 1
        per_path[path][1] += vs_profile > 0
        if n:
            bad.append((key, path, n))
    print(
        "\n"
        + "; ".join(
            f"{P.LABELS[p]}: {c} cases, {d} differ from the bitsandbytes-cpu profile" for p, (c, d) in per_path.items()
        )
    )
    print(f"{sum(d for _c, d in per_path.values())} of {len(GRID)} cases differ from the profile")
    assert not bad, f"bitsandbytes differs from the model of its path (case, path, elements): {bad[:5]}"
    for p in P.PROFILE_PATHS:  # on the profile's own paths the model is the profile
        assert per_path.get(p, [0, 0])[1] == 0
    if P.host().kernel == P.AVX512:
        assert per_path[P.AVX512][1] > 0  # the bug is there (a fix upstream must show up as a failure here)
    else:
        assert P.AVX512 not in per_path


# a wrong model for each path: the path whose model is used instead (another index rule or sign of zero)
WRONG = {
    "avx512": ["torch-bs2048", "scalar"],  # the correct (flat) block index; and the scalar sign too
    "torch-bs2048": ["scalar"],
    "scalar": ["torch-odd"],
    "torch-odd": ["scalar"],
}


def test_a_wrong_model_is_caught(bnb):
    """Swap in another path's model (e.g. the correct block index on the AVX-512 kernel): bitsandbytes' real
    output must then differ on this host, for every path the grid exercises."""
    torch, F, P = bnb
    caught: dict[tuple[str, str], int] = {}
    for _key, packed, state in _grid_cases():
        path = P.dequantize_path(state.shape, state.blocksize)
        actual = _peer(torch, F, packed, state)
        for wrong in WRONG[path]:
            caught.setdefault((path, wrong), 0)
            caught[(path, wrong)] += _n_differ(actual, P.peer_dequantize(packed, state, wrong)) > 0
    print("\ncases a wrong model fails on (path, model used instead): " + str(caught))
    assert caught and all(n > 0 for n in caught.values()), caught


def test_the_runner_accepts_a_divergence_only_where_its_model_reproduces_it(bnb, monkeypatch):
    _torch, _F, P = bnb
    from refimpl.conformance import run

    res = run("bitsandbytes", "quant.dequantize_4bit", tiers=["boundary", "special"])
    print("\n" + "\n".join(res.notes))
    assert res.ok, [(r.label, r.message[:200]) for r in res.failures]
    assert any("dequantize paths taken" in line for line in res.notes)
    modelled = [r for r in res.results if r.divergence and "AVX-512 CPU dequantize kernel" in r.divergence]
    if P.host().kernel != P.AVX512:
        assert not modelled and any("NOT exercised" in line for line in res.notes), res.notes
        return
    assert modelled, "the boundary tier must reach the AVX-512 kernel's misaligned rows on this host"
    # now the model is wrong: the correct block index (what the scalar loop computes), +0.0 kept
    real = P.peer_dequantize
    monkeypatch.setattr(
        P,
        "peer_dequantize",
        lambda packed, state, path, h=None: real(packed, state, P.TORCH_BS if path == P.AVX512 else path, h),
    )
    bad = run("bitsandbytes", "quant.dequantize_4bit", tiers=["boundary"])
    assert not bad.ok and bad.failures, "a wrong model must leave the AVX-512 cases failing"
    # the failures are the misaligned-row cases; aligned FP4 cases (only the +0.0) are still explained
    assert {r.label for r in bad.failures} < {r.label for r in modelled if r.tier == "boundary"}
    print("with the correct index as the model, these cases fail: " + ", ".join(r.label for r in bad.failures))


def test_divergence_entries_carry_an_importable_model(tmp_path):
    f = tmp_path / "d.toml"
    f.write_text(
        textwrap.dedent("""\
        [[divergence]]
        op = "quant.dequantize_4bit"
        target = "mine"
        reason = "r"
        upstream = "u"
        model = "refimpl.conformance.peers.bnb_paths:avx512_kernel_model"
        """)
    )
    (d,) = divergences.load(f)
    assert d.model_fn().__name__ == "avx512_kernel_model"
    assert d.model_fn()("lora.forward", {}, {}) is None  # another op: the model makes no claim
    bad = f.read_text().replace("bnb_paths:avx512_kernel_model", "bnb_paths avx512_kernel_model")
    f.write_text(bad)
    with pytest.raises(ValueError, match="module:function"):
        divergences.load(f)
    f.write_text(bad.replace("bnb_paths avx512_kernel_model", "bnb_paths:no_such_model"))
    with pytest.raises(ValueError, match="cannot be imported"):
        divergences.load(f)[0].model_fn()
    builtin = [x for x in divergences.load_all() if x.model and x.target == "bitsandbytes"]
    assert len(builtin) == 3 and all(callable(x.model_fn()) for x in builtin)


def test_reproducer_runs_without_refimpl_and_prints_the_differences(bnb, tmp_path):
    _torch, _F, P = bnb
    from refimpl.conformance.peers.bnb import BitsandbytesTarget

    x = np.ones((3, 16), np.float32)
    x[2] = 2.0  # block 1 (elements 32..47) has absmax 2, block 0 absmax 1
    packed, state = quant.quantize_4bit(x, 32, "nf4", profile="bitsandbytes-cpu")
    src = BitsandbytesTarget().reproducer("quant.dequantize_4bit", {"packed": packed, "state": state})
    assert "refimpl" not in src.replace("refimpl conform", "")
    script = tmp_path / "repro.py"
    script.write_text(src)
    blocker = "import sys; sys.modules['refimpl'] = None; sys.argv = [sys.argv[1]]; "
    proc = subprocess.run(
        [sys.executable, "-c", blocker + "exec(open(sys.argv[0]).read())", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    print("\n" + proc.stdout + proc.stderr[-2000:])
    if P.host().kernel == P.AVX512:
        assert proc.returncode == 1 and "16 of 48 elements differ in value" in proc.stdout
        assert "16 of the 16 equal code[nibble] * absmax[row * (cols // blocksize)" in proc.stdout
        assert "(2, 0): nibble 15, block 1 (absmax 2.0), expected 2.0, actual 1.0" in proc.stdout
    else:
        assert proc.returncode == 0 and "0 of 48 elements differ in value" in proc.stdout
