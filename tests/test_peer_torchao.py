"""torchao's NF4Tensor as a built-in target: the torchao profile reproduces it bit for bit, the conformance
run fails on exactly the all-zero-block bug, and the upstream reproducer shows it (issue 15 item 5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from refimpl import quant
from refimpl.quant import codebooks, torchao_profile
from tests._peers import require

pytestmark = pytest.mark.peers
ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _torchao(x: np.ndarray, bs: int, sbs: int):
    import torch

    nf4tensor = require("torchao.dtypes.nf4tensor")
    t = torch.from_numpy(x.astype(np.float32))
    t = t.to({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[str(x.dtype)])
    return nf4tensor.to_nf4(t, bs, sbs)


def _cases():
    """Random weights of every dtype, with an all-zero block, subnormal blocks, threshold-adjacent values,
    outlier blocks (so that the int8 scale codes round), and several scaler block sizes."""
    rng = np.random.default_rng(7)
    mids = codebooks.midpoints("nf4")
    out = []
    for i in range(36):
        dt = list(DTYPES)[i % 3]
        bs = [32, 64, 128, 256][i % 4]
        nb = int(rng.integers(1, 300))
        x = rng.standard_normal(nb * bs).astype(np.float32) * float(rng.choice([1e-3, 0.05, 30.0]))
        if i % 5 == 0:
            x[:bs] = 0.0
        if i % 7 == 0 and dt == "float32":
            x[bs : 2 * bs] *= 1e-40  # a subnormal block (torchao keeps it: no 1e-38 clamp)
        if i % 2:
            a = np.abs(x[-bs:]).max()
            x[-bs:-1] = (mids[rng.integers(0, 15, bs - 1)] * a).astype(np.float32)  # s at a midpoint
        if i % 3 == 0:
            x[-bs:] *= 8  # an outlier block
        x = x.astype(DTYPES[dt])
        sbs = torchao_profile.default_scaler_block_size(nb)
        out.append((f"{dt}_bs{bs}_nb{nb}", x.reshape(-1, bs) if i % 2 else x, bs, sbs))
    return out


@pytest.mark.parametrize("label,x,bs,sbs", _cases(), ids=[c[0] for c in _cases()])
def test_profile_reproduces_torchao_bit_for_bit(label, x, bs, sbs):
    """Codes, int8 scale codes, factors, mean and the dequantized tensor, with torchao's zero-block NaN."""
    t = _torchao(x, bs, sbs)
    packed, state = torchao_profile.quantize(x, bs, sbs, zero_block="nan")
    assert np.array_equal(packed.reshape(-1), t.quantized_data.numpy())
    assert np.array_equal(state.absmax.view(np.int8), t.quantized_scalers.numpy())
    assert np.array_equal(state.nested_absmax, t.quantization_factor.float().numpy())
    assert state.offset.tobytes() == np.float32(t.scaler_mean.float().item()).tobytes()
    assert np.array_equal(state.code, t.nf4.float().numpy())
    got = t.get_original_weight().float().numpy()
    mine = torchao_profile.dequantize(packed, state).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), mine.view(np.uint32))


def test_the_profile_differs_from_torchao_only_in_all_zero_blocks():
    """zero_block="zero" (the format's rule, the divergence model) gives the zero code where torchao's 0/0 gives
    code 0, and is identical everywhere else."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 128)) * 0.02).astype(np.float32).astype(ml_dtypes.bfloat16)
    x[[2, 9]] = 0
    x[4] = -0.0
    nan_rule, _ = torchao_profile.quantize(x, 64, zero_block="nan")
    zero_rule, _ = torchao_profile.quantize(x, 64, zero_block="zero")
    a, b = quant.unpack_nibbles(nan_rule, x.size), quant.unpack_nibbles(zero_rule, x.size)
    zero_blocks = np.repeat((np.abs(x.astype(np.float32)).reshape(-1, 64).max(axis=1) == 0), 64)
    assert np.array_equal(a != b, zero_blocks) and set(a[zero_blocks]) == {0} and set(b[zero_blocks]) == {7}


def test_conform_torchao_fails_on_exactly_the_zero_block_bug(capsys):
    require("torchao.dtypes.nf4tensor")
    from refimpl.conformance import report, runner

    res = runner.run("torchao")
    with capsys.disabled():  # the verdict table of `refimpl conform --target torchao` belongs in the CI log
        print(f"\n$ refimpl conform --target torchao\n{report.terminal(res)}")
    assert res.verdict == runner.FAILS
    ran_with = "[ran with double_quant=True from the target's options]"  # the target always double-quantizes
    assert {(r.op, r.tier, r.label) for r in res.failures} == {
        ("quant.quantize_4bit", "special", f"nf4: all-zero full block {ran_with}"),
        ("quant.quantize_4bit", "special", f"nf4: -0.0 values {ran_with}"),
        ("quant.quantize_4bit", "properties", "differential"),  # random drawing finds the zero block too
    }
    assert all("got np.uint8(0), expected np.uint8(119)" in r.message for r in res.failures)  # code 0 vs 7
    assert not res.warnings
    assert any(r.status == runner.XFAIL and "torchao_profile" in r.divergence for r in res.results)
    assert any("torchao 0." in n and "quantize_tensor_nearest" in n for n in res.notes)


def test_properties_draw_only_inside_torchao_s_declared_domain():
    """The supports declaration (NF4, 1-2 dimensions, torchao's dtypes) and the whole-block rule: the properties
    tier draws only there and runs examples (before, it ran 0: random shapes almost never fit torchao). The
    next test runs 120 such examples against the profile, past the zero-block bug that stops this tier."""
    require("torchao.dtypes.nf4tensor")
    from refimpl.conformance import runner

    res = runner.run("torchao", "quant.quantize_4bit", tiers=["properties"], examples=25)
    prop = [r for r in res.results if r.tier == "properties"]
    ran = sum(r.n_cases for r in prop if r.status in (runner.PASS, runner.FAIL, runner.XFAIL))
    assert ran > 0 and any(r.status == runner.XFAIL and r.n_cases for r in prop), [(r.status, r.message) for r in prop]
    # it stops at the first failing example: an all-zero block (float16 drawn at scale 1e-39 flushes to zero)
    assert [r.message for r in prop if r.status == runner.FAIL] in (
        [],
        ["out.0: 16 of 16 elements differ; first at (0, 0): got np.uint8(0), expected np.uint8(119)"],
    )
    scope = " ".join(res.out_of_scope["quant.quantize_4bit"])
    assert "quant_type in {'nf4'}" in scope and "x.ndim in {1, 2}" in scope
    assert "no tail block" in scope and "drawn again" in scope  # what was drawn outside is named, not run
    assert not [r for r in prop if r.status == runner.UNSUPPORTED and r.n_cases]  # nothing drawn and skipped


def test_random_in_domain_inputs_are_reproduced_by_the_profile_bit_for_bit():
    """Inputs drawn by quant.quantize_4bit's own strategy inside torchao's domain (NaN, ±inf, subnormal and
    all-zero blocks included): torchao's output is the profile's with torchao's zero-block rule, bit for bit."""
    from hypothesis import HealthCheck, given, settings

    from refimpl.conformance.runner import beyond_support
    from refimpl.conformance.table import op_table

    target = require("refimpl.conformance.peers.torchao").TorchaoTarget()
    op = "quant.quantize_4bit"
    decl = {k: frozenset(v) for k, v in target.supports(op).items()}
    inside = (
        op_table()[op].strategy().filter(lambda d: not beyond_support(decl, d, {}) and not target.unsupported(op, d))
    )
    seen = {"n": 0}

    @settings(max_examples=120, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(inside)
    def same(case):
        x, bs = case["x"], case["blocksize"]
        packed, state = target.quantize_4bit(x, bs, "nf4", True)
        mine, model = torchao_profile.quantize(x, bs, zero_block="nan")
        assert np.array_equal(packed, mine)
        for field in ("absmax", "code", "nested_absmax", "nested_code", "offset"):
            assert np.array_equal(getattr(state, field), getattr(model, field), equal_nan=True), field
        seen["n"] += 1

    with np.errstate(all="ignore"):
        same()
    assert seen["n"] == 120


def test_check_4bit_names_every_torchao_difference(capsys):
    target = require("refimpl.conformance.peers.torchao").TorchaoTarget()
    rng = np.random.default_rng(2)
    totals: dict[str, int] = {}
    for dt in DTYPES.values():
        x = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32).astype(dt)
        x[5] = 0
        packed, state = target.quantize_4bit(x, 64)
        report = quant.check_4bit(packed, state, x)
        with capsys.disabled():
            print(f"\ncheck_4bit on torchao's {dt} output: {report}")
        for k, v in report.causes.items():
            totals[k] = totals.get(k, 0) + v
        assert "wrong" not in report.causes
        assert report.causes["special"] == 256  # the all-zero row: 4 blocks of 64
        assert report.scale_causes == {"scale_quantization:linear_int8": report.n_absmax_mismatch}
    with capsys.disabled():
        print(f"check_4bit causes on torchao's output, all dtypes: {totals}")


def test_upstream_reproducer_shows_the_zero_block_bug(capsys):
    require("torchao.dtypes.nf4tensor")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "reproducers" / "torchao_nf4_zero_block.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    with capsys.disabled():
        print(f"\n$ python bench/reproducers/torchao_nf4_zero_block.py  (exit {done.returncode})\n{done.stdout}")
    assert done.returncode == 1
    assert "block 3 is all zero: codes [0] (expected [7])" in done.stdout
