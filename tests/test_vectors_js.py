"""spec/vectors.md's JavaScript NF4 example (docs/examples/nf4_dequantize.mjs), run with node when present."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "nf4_dequantize.mjs"
NODE = shutil.which("node")


def test_the_example_is_quoted_in_spec_vectors_md():
    spec = (ROOT / "spec" / "vectors.md").read_text(encoding="utf-8")
    body = EXAMPLE.read_text(encoding="utf-8").strip()
    assert body in spec, "spec/vectors.md must quote docs/examples/nf4_dequantize.mjs verbatim"


@pytest.mark.skipif(NODE is None, reason="node is not on PATH: the JavaScript NF4 example cannot be run here")
def test_nf4_example_matches_the_golden_vector_bit_for_bit():
    r = subprocess.run([NODE, str(EXAMPLE)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "256 of 256 elements match bit for bit" in r.stdout, r.stdout
