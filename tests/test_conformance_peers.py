"""The built-in peer targets run through the same rows (PEFT, bitsandbytes); CI has the peers installed."""

from __future__ import annotations

import pytest

from refimpl.conformance import report, run
from tests._peers import require

pytestmark = pytest.mark.peers


def _show(capsys, res) -> None:
    """Print the verdict table into the test log even under output capture (CI shows it)."""
    with capsys.disabled():
        print("\n" + report.table(res) + "\n" + _summary(res))


def _summary(res) -> str:
    worst = max((r.worst_ratio for r in res.results if r.status == "pass" and r.worst_ratio is not None), default=0.0)
    n = sum(r.n_cases for r in res.results if r.status == "pass")
    return (
        f"{res.target}: {len(res.ops())} ops, {n} passing cases, worst error/bound {worst:.3g}, "
        f"{sum(r.status == 'xfail' for r in res.results)} known divergences, {res.seconds:.1f} s"
    )


def test_peft_target_conforms_on_lora_dora_and_merging_rows(capsys):
    require("peft")
    ops = (
        "lora.scaling,lora.delta,lora.forward,lora.backward,lora.merge,lora.unmerge,lora.embedding_forward,"
        "dora.forward,dora.merge,merging.task_arithmetic,merging.ties,merging.magnitude_prune,merging.dare"
    )
    res = run("peft", ops, examples=8)
    _show(capsys, res)
    assert res.ok, report.failures_text(res)
    assert not res.warnings, res.warnings
    assert res.cell("lora.forward", "properties")[0] == "pass"
    assert res.cell("lora.forward", "special")[0] == "xfail"  # PEFT lets NaN through: a named divergence


def test_bitsandbytes_target_is_byte_exact_on_4bit_quantization(capsys):
    require("bitsandbytes")
    res = run("bitsandbytes", "quant.*", examples=15)
    _show(capsys, res)
    assert res.ok, report.failures_text(res)
    assert res.cell("quant.quantize_4bit", "properties")[0] == "pass"


def test_mergekit_target_conforms_on_its_merge_methods(capsys):
    require("mergekit")
    res = run("mergekit", "merging.task_arithmetic,merging.ties,merging.dare", examples=10)
    _show(capsys, res)
    assert res.ok, report.failures_text(res)
    assert res.cell("merging.ties", "properties")[0] == "pass"
