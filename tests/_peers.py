"""Import a peer library for a differential test, or skip with the reason.

When REFIMPL_REQUIRE_PEERS=1 (set by .ci/run, which installs the `peers`
extra) a missing peer is a failure, not a skip, so CI can never pass with the
differential tests silently skipped.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

_EXTRA_HINT = "install the peers extra: pip install -e '.[peers]'"


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # any import failure means the peer is unusable
        reason = f"peer {module!r} is not importable ({type(exc).__name__}: {exc}); {_EXTRA_HINT}"
        if os.environ.get("REFIMPL_REQUIRE_PEERS") == "1":
            pytest.fail(reason + " [REFIMPL_REQUIRE_PEERS=1]")
        pytest.skip(reason)
