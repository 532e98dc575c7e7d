"""docs/ops.md, the per-op reference of the target contract, is generated from the rows and never drifts."""

from __future__ import annotations

import inspect
from pathlib import Path

from refimpl.conformance import opdoc
from refimpl.conformance.table import op_table

PAGE = Path(__file__).resolve().parents[1] / "docs" / "ops.md"


def test_ops_page_equals_what_the_rows_and_the_reference_generate():
    assert PAGE.read_text(encoding="utf-8") == opdoc.render(), (
        "docs/ops.md is stale: regenerate it with `python -m refimpl.conformance.opdoc --write docs/ops.md`"
    )


def test_every_argument_of_every_row_has_a_meaning():
    missing = [
        f"{name}.{p}"
        for name, spec in op_table().items()
        for p in inspect.signature(spec.reference()).parameters
        if not opdoc.OVERRIDES.get(f"{name}.{p}") and p not in opdoc.ARGUMENTS
    ]
    assert not missing, f"add these to opdoc.ARGUMENTS or OVERRIDES: {missing}"


def test_every_row_links_to_an_existing_heading_of_its_spec_file():
    for name in op_table():
        link = opdoc.spec_link(name)  # raises where the heading is gone
        file, _, frag = link.rsplit("(", 1)[1].rstrip(")").partition("#")
        text = (PAGE.parent / file).read_text(encoding="utf-8")
        assert frag in {opdoc.anchor(h) for h in opdoc._headings(text)}, link


def test_override_keys_name_real_arguments():
    table = op_table()
    for key in opdoc.OVERRIDES:
        op, _, arg = key.rpartition(".")
        assert arg in inspect.signature(table[op].reference()).parameters, key


def test_targets_md_links_the_ops_page():
    assert "(ops.md)" in (PAGE.parent / "targets.md").read_text(encoding="utf-8")


def test_check_mode_reports_a_stale_page(tmp_path, capsys):
    stale = tmp_path / "ops.md"
    stale.write_text("# old\n", encoding="utf-8")
    assert opdoc.main(["--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().out
    opdoc.main(["--write", str(stale)])
    assert opdoc.main(["--check", str(stale)]) == 0
