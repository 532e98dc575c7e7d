"""torchtune's LoRALinear / DoRALinear as a built-in target: the conformance run fails on exactly the DoRA bias
bug and DoRALinear's unbatched-shape bug, the dropout design difference is a modelled divergence, and the
upstream reproducers show the bugs (issue 15 item 5)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refimpl import dora
from tests._peers import require

pytestmark = pytest.mark.peers
ROOT = Path(__file__).resolve().parents[1]


def _target():
    require("torchtune.modules.peft")
    from refimpl.conformance.peers.torchtune import TorchtuneTarget

    return TorchtuneTarget()


def _dora_cases():
    """dora.forward's golden and boundary cases (the row's own), without fan_in_fan_out (outside torchtune)."""
    from refimpl.conformance import vectors
    from refimpl.conformance.table import select

    spec = select("dora.forward")[0]
    cases = [("golden", label, case) for label, case, _ in vectors.load_op("dora.forward", None)]
    cases += [("boundary", b.label, b.case) for b in spec.boundary()]
    return [(tier, label, case) for tier, label, case in cases if not case.get("fan_in_fan_out")]


def test_dora_forward_differs_from_the_reference_by_exactly_the_scaled_bias():
    """For every row case: torchtune = refimpl's DoRA with the bias b replaced by f ⊙ b (f = m / ‖W + s·B A‖);
    without dropout that is the whole difference (to rounding), and without a bias there is none."""
    target = _target()
    n_bias = 0
    for _, label, case in _dora_cases():
        got = target.dora_forward(**case).reshape(-1, case["W"].shape[0])
        ref = dora.forward(**case).reshape(-1, case["W"].shape[0])
        if case.get("dropout_mask") is not None:
            continue  # the dropout form is the modelled divergence (next test)
        b = np.zeros(case["W"].shape[0]) if case.get("bias") is None else np.asarray(case["bias"], float)
        f = np.asarray(case["m"], float) / dora.weight_norm(case["W"], case["A"], case["B"], case["scaling"])
        scale = np.abs(ref).max() + np.abs(b).max() + 1.0
        assert np.allclose(got, ref - b + f * b, rtol=0, atol=1e-12 * scale), label
        if np.abs(b - f * b).max() > 1e-6 * scale:
            n_bias += 1
            assert not np.allclose(got, ref, rtol=0, atol=1e-6 * scale), label
    assert n_bias >= 2


def test_the_dropout_model_reproduces_torchtune_bit_for_bit_without_a_bias():
    from refimpl.conformance.peers.torchtune import dora_dropout_model

    target = _target()
    rng = np.random.default_rng(0)
    n_in, n_out, r = 12, 7, 3
    case = {
        "x": rng.standard_normal((4, n_in)),
        "W": rng.standard_normal((n_out, n_in)),
        "A": rng.standard_normal((r, n_in)),
        "B": rng.standard_normal((n_out, r)),
        "m": rng.uniform(0.5, 2, n_out),
        "scaling": 1.5,
        "dropout_mask": (rng.random((4, n_in)) < 0.7).astype(float),
        "dropout_p": 0.3,
    }
    got = target.dora_forward(**case)
    assert np.array_equal(got, dora_dropout_model("dora.forward", case, {})["out"])
    assert not np.allclose(got, dora.forward(**case), atol=1e-6)  # a real design difference
    with_bias = {**case, "bias": rng.standard_normal(n_out)}
    assert not np.allclose(
        target.dora_forward(**with_bias), dora_dropout_model("dora.forward", with_bias, {})["out"], atol=1e-6
    )  # the bias bug is not modelled


def _unbatched(case) -> bool:
    return np.ndim(case["x"]) == 1


def test_conform_torchtune_fails_on_exactly_the_dora_bias_and_unbatched_shape_bugs(capsys):
    _target()
    from refimpl.conformance import report, runner

    res = runner.run("torchtune")
    with capsys.disabled():  # the verdict table of `refimpl conform --target torchtune` belongs in the CI log
        print(f"\n$ refimpl conform --target torchtune\n{report.terminal(res)}")
    failing = {(r.op, r.tier, r.label): r for r in res.failures}
    assert res.verdict == runner.FAILS and not res.warnings
    cases = _dora_cases()
    bias_cases = {
        ("dora.forward", t, label) for t, label, c in cases if c.get("bias") is not None and not _unbatched(c)
    }
    unbatched = {("dora.forward", t, label) for t, label, c in cases if _unbatched(c)}
    assert unbatched  # the row has an unbatched case
    assert {f for f in failing if f[1] != "properties"} == bias_cases | unbatched
    assert all(op == "dora.forward" for op, _, _ in failing)
    for key in unbatched:
        # the boundary case may be shrunk (fewer outputs): the shape is (1, out) where (out,) is expected
        assert re.match(r"out: shape \(1, (\d+)\), expected \(\1,\)", failing[key].message), failing[key].message
        assert "returns (1, out_dim) for an unbatched input" in failing[key].reproducer
    for key in bias_cases:
        assert "the derived bound" in failing[key].message and "m / ||W + s B A||" in failing[key].reproducer
    prop = [r for r in res.failures if r.tier == "properties"]
    assert all("bias" in r.snippet for r in prop)  # the shrunk property failure carries a bias
    assert any(r.status == runner.XFAIL and "applies DoRA dropout as" in r.divergence for r in res.results)
    for op in ("lora.scaling", "lora.forward", "lora.backward", "lora.merge", "dora.merge"):
        # the supports declaration: every drawn example lies inside torchtune's domain, so all of them run
        assert res.cell(op, "properties")[0] == runner.PASS
        passed = [r for r in res.results if (r.op, r.tier, r.label) == (op, "properties", "differential")]
        assert passed[0].n_cases == runner.DEFAULT_EXAMPLES, (op, passed[0].message)


def test_dora_linear_returns_1_by_out_for_an_unbatched_input():
    """torchtune's documented (..., in) -> (..., out) holds for LoRALinear but not DoRALinear: x of shape (in,)
    gives (1, out); the values are those of the batched call (only the shape is wrong)."""
    target = _target()
    rng = np.random.default_rng(4)
    n_in, n_out, r = 6, 5, 2
    case = {
        "x": rng.standard_normal(n_in),
        "W": rng.standard_normal((n_out, n_in)),
        "A": rng.standard_normal((r, n_in)),
        "B": rng.standard_normal((n_out, r)),
        "scaling": 0.75,
    }
    assert target.forward(**case).shape == (n_out,)  # LoRALinear keeps the unbatched shape
    m = rng.uniform(0.5, 2, n_out)
    got = target.dora_forward(**case, m=m)
    assert got.shape == (1, n_out)
    assert np.array_equal(got[0], target.dora_forward(**{**case, "x": case["x"][None]}, m=m)[0])
    assert np.allclose(got[0], dora.forward(**case, m=m), rtol=1e-12, atol=1e-12)


def _reproduce(name: str, capsys) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "reproducers" / name)], capture_output=True, text=True, timeout=300
    )
    with capsys.disabled():
        print(f"\n$ python bench/reproducers/{name}  (exit {done.returncode})\n{done.stdout}")
    return done


def test_upstream_reproducer_shows_the_bias_bug(capsys):
    require("torchtune.modules.peft")
    done = _reproduce("torchtune_dora_bias.py", capsys)
    assert done.returncode == 1
    assert "DoRALinear returned                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]" in done.stdout
    rel = float(done.stdout.split("layer vs its merged checkpoint: ")[1].split()[0])
    assert rel > 0.01


def test_upstream_reproducer_shows_the_unbatched_shape_bug(capsys):
    require("torchtune.modules.peft")
    done = _reproduce("torchtune_dora_unbatched_shape.py", capsys)
    assert done.returncode == 1
    assert "DoRALinear(x of shape (6,)) -> shape (1, 5)" in done.stdout
    assert "LoRALinear(x of shape (6,)) -> shape (5,)" in done.stdout


def test_install_hint_names_the_extra_of_each_peer():
    from tests._peers import install_hint

    assert install_hint("torchtune.modules.peft").endswith("pip install -e '.[torchpeers]'")
    assert install_hint("torchao.dtypes.nf4tensor").endswith("pip install -e '.[torchpeers]'")
    assert install_hint("refimpl.conformance.peers.torchao").endswith("'.[torchpeers]'")
    assert install_hint("peft").endswith("pip install -e '.[peers]'")
    assert install_hint("bitsandbytes.functional").endswith("'.[peers]'")
