"""Import a peer library for a differential test, or skip with the reason.

When REFIMPL_REQUIRE_PEERS=1 (set by .ci/run, which installs the `peers` and
`torchpeers` extras) a missing peer is a failure, not a skip, so CI can never pass with the
differential tests silently skipped.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def install_hint(module: str) -> str:
    """How to install the peer ``module`` belongs to: its extra (``torchpeers`` for torchao and torchtune)."""
    from refimpl.conformance.targets import extra_of

    extra = next((e for part in module.split(".") if (e := extra_of(part))), "peers")
    return f"install the {extra} extra: pip install -e '.[{extra}]'"


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # any import failure means the peer is unusable
        reason = f"peer {module!r} is not importable ({type(exc).__name__}: {exc}); {install_hint(module)}"
        if os.environ.get("REFIMPL_REQUIRE_PEERS") == "1":
            pytest.fail(reason + " [REFIMPL_REQUIRE_PEERS=1]")
        pytest.skip(reason)


def bnb_dequantize_expected(packed, state, profile_output=None):
    """What bitsandbytes' CPU ``dequantize_4bit`` must return for ``state`` on this host, and the path it takes.

    On the paths the ``bitsandbytes-cpu`` profile states (C++ scalar loop, torch fallback for an odd last
    dimension) that is refimpl's own ``dequantize_4bit`` (``profile_output`` when given); on the AVX-512
    kernel and the AVX-512 blocksize >= 2048 fallback it is the known divergence's model
    (refimpl/conformance/peers/bnb_paths.py), so any difference the model does not explain fails.
    """
    from refimpl import quant
    from refimpl.conformance.peers import bnb_paths

    path = bnb_paths.dequantize_path(tuple(state.shape), int(state.blocksize))
    if path in bnb_paths.PROFILE_PATHS:
        out = quant.dequantize_4bit(packed, state) if profile_output is None else profile_output
        return out, path
    return bnb_paths.peer_dequantize(packed, state, path), path


class PathTally:
    """Counts bitsandbytes dequantize paths (and the cases where a path's output differs from the profile)
    for a test's printed summary."""

    def __init__(self) -> None:
        self.cases: dict[str, int] = {}
        self.divergent: dict[str, int] = {}

    def add(self, path: str, differs_from_profile: bool = False) -> None:
        self.cases[path] = self.cases.get(path, 0) + 1
        self.divergent[path] = self.divergent.get(path, 0) + bool(differs_from_profile)

    def line(self) -> str:
        from refimpl.conformance.peers import bnb_paths

        parts = [
            f"{bnb_paths.LABELS[p]} {n}"
            + (
                f" ({self.divergent[p]} differ from the profile, reproduced by the divergence model)"
                if self.divergent[p]
                else ""
            )
            for p, n in self.cases.items()
        ]
        return "bitsandbytes dequantize paths: " + ", ".join(parts) + "; " + "; ".join(bnb_paths.host_lines())
