"""Write the reproducers a built-in peer target attached to its failures and modelled divergences.

A reproducer is a standalone script in the peer's own API (no refimpl import) that prints the expected
and the actual values, ready to paste into an upstream issue; the peer target builds it
(``reproducer(op, case)``), this module only writes the files, one per distinct script.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from refimpl.conformance.runner import FAIL, XFAIL, RunResult


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "case"


def write_reproducers(res: RunResult, directory: str | Path) -> list[Path]:
    """One ``.py`` file per distinct reproducer of a failing or modelled-divergent case; returns the paths.

    Files are written under a temporary name and renamed into place; nothing else in ``directory`` is touched.
    """
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    seen: set[str] = set()
    for r in res.results:
        if r.status not in (FAIL, XFAIL) or not r.reproducer or r.reproducer.startswith("# no reproducer"):
            continue
        digest = hashlib.sha256(r.reproducer.encode()).hexdigest()[:8]
        if digest in seen:
            continue
        seen.add(digest)
        path = out_dir / f"{_slug(res.target)}_{_slug(r.op)}_{_slug(r.tier)}_{_slug(r.label)}_{digest}.py"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(r.reproducer if r.reproducer.endswith("\n") else r.reproducer + "\n", encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written
