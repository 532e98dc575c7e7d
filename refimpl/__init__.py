"""refimpl: the reference implementation and test oracle for parameter-efficient
fine-tuning math (LoRA, DoRA, QLoRA's NF4/FP4 storage, adapter merging).

Submodules are imported on first use, so ``import refimpl`` stays cheap and an
optional extra (numba, CuPy, the peers) is only needed by the part that uses it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The package version; pyproject.toml reads it from here (setuptools dynamic version).
__version__ = "0.1.0"
#: Version of the written rules in spec/ (see spec/CHANGELOG.md).
SPEC_VERSION = "1.1.0"

_SUBMODULES = (
    "conformance",
    "dora",
    "io",
    "kernels",
    "lab",
    "lora",
    "memory",
    "merging",
    "precision",
    "qlora",
    "quant",
)

__all__ = ["SPEC_VERSION", "__version__", *_SUBMODULES]


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        module = importlib.import_module(f"refimpl.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'refimpl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
