"""bitsandbytes 0.50.2 (CPU) as a conformance target (spec/nf4.md).

Ops map onto ``bitsandbytes.functional``; every case runs with refimpl's
``profile="bitsandbytes-cpu"`` (added to the case for reference and target alike),
and compares bit for bit:

* ``quant.quantize_4bit``: ``quantize_4bit(t, blocksize, compress_statistics=double_quant, quant_type)``;
  the state comes back through ``QuantState.as_dict(packed=True)`` →
  ``refimpl.quant.QuantState.from_bnb_dict``.
* ``quant.dequantize_4bit``: refimpl's state → ``to_bnb_dict`` → bitsandbytes ``QuantState.from_dict``.
  On CPU an even-length 1-D input comes back as (1, n) (bitsandbytes#2047, PR #2048 open);
  the adapter reshapes it to the state's shape (a layout quirk, values unchanged) so the values
  are still compared.
* ``quant.quantize_blockwise_8bit`` / ``dequantize_blockwise_8bit``: ``quantize_blockwise`` /
  ``dequantize_blockwise`` with the dynamic map.
* ``quant.codebook``: ``get_4bit_type`` (nf4, fp4) and ``create_dynamic_map(signed=True)``.

bitsandbytes picks one of three CPU dequantize paths per call (AVX-512 kernel, C++ scalar loop, torch
fallback) from the host's instruction set, the last dimension and the blocksize (``bnb_paths.py``).
The profile states the scalar rules; the AVX-512 differences are known divergences with a model
(``known_divergences.toml``). The target counts the path of every dequantize call (in shared memory,
so that the counts survive the runner's forked worker) and ``notes()`` reports them with the host;
``reproducer(op, case)`` writes a standalone torch + bitsandbytes script for a case.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any

import numpy as np

from refimpl.conformance._values import to_numpy
from refimpl.conformance.peers import bnb_paths

PROFILE = "bitsandbytes-cpu"


def _torch_of(x: np.ndarray):
    import ml_dtypes
    import torch

    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


class BitsandbytesTarget:
    """Adapts bitsandbytes.functional to refimpl.quant's op names."""

    name = "bitsandbytes"

    def __init__(self) -> None:
        import logging

        import bitsandbytes.functional  # noqa: F401 - fail early when the peer is missing

        # bitsandbytes' CPU dequantization is torch.compile'd; one recompile per new shape floods the log
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

        # one int64 counter per dequantize path; an anonymous shared mapping is inherited by forked workers
        self._shared = mmap.mmap(-1, 8 * len(bnb_paths.PATHS))
        self._counts = np.frombuffer(self._shared, dtype=np.int64)
        self._ops: dict[str, Callable[..., Any]] = {
            "quant.quantize_4bit": self.quantize_4bit,
            "quant.dequantize_4bit": self.dequantize_4bit,
            "quant.quantize_blockwise_8bit": self.quantize_blockwise_8bit,
            "quant.dequantize_blockwise_8bit": self.dequantize_blockwise_8bit,
            "quant.codebook": self.codebook,
        }

    def lookup(self, op: str) -> Callable[..., Any] | None:
        return self._ops.get(op)

    def options(self, op: str) -> dict[str, Any]:
        return (
            {"profile": PROFILE}
            if op in ("quant.quantize_4bit", "quant.dequantize_4bit", "quant.quantize_blockwise_8bit")
            else {}
        )

    def compute_dtype(self, op: str) -> str:
        return "float32"

    def codebook(self, name: str = "nf4") -> np.ndarray:
        import bitsandbytes.functional as F

        if name == "dynamic8":
            return to_numpy(F.create_dynamic_map(signed=True)).astype(np.float32)
        if name not in ("nf4", "fp4"):
            raise ValueError(f"name: bitsandbytes has no 4-bit type {name!r}")
        return to_numpy(F.get_4bit_type(name, device="cpu")).astype(np.float32)

    def quantize_4bit(
        self, x, blocksize=64, quant_type="nf4", double_quant=False, *, profile=PROFILE, nonfinite=None, threads=1
    ):
        import bitsandbytes.functional as F

        from refimpl.quant import QuantState

        arr = np.asarray(x)
        if arr.dtype.kind not in "fV":
            raise TypeError(f"x: bitsandbytes quantizes float tensors, got dtype {arr.dtype}")
        packed, state = F.quantize_4bit(
            _torch_of(arr), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        d = {k: to_numpy(v) for k, v in state.as_dict(packed=True).items()}
        return to_numpy(packed), QuantState.from_bnb_dict(d, profile=PROFILE, nonfinite="propagate")

    def dequantize_4bit(self, packed, state, *, profile=None):
        import bitsandbytes.functional as F
        import torch

        qs = F.QuantState.from_dict(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.to_bnb_dict().items()},
            device=torch.device("cpu"),
        )
        path = bnb_paths.dequantize_path(tuple(state.shape), int(state.blocksize))
        out = to_numpy(F.dequantize_4bit(torch.from_numpy(np.ascontiguousarray(packed)), qs))
        self._counts[bnb_paths.PATHS.index(path)] += 1
        if out.shape != state.shape and out.size == state.n:  # bitsandbytes#2047: (1, n) for even 1-D
            out = out.reshape(state.shape)
        return out

    def quantize_blockwise_8bit(self, x, blocksize=256, *, profile=PROFILE, nonfinite=None):
        import bitsandbytes.functional as F

        codes, state = F.quantize_blockwise(_torch_of(np.asarray(x, dtype=np.float32)), blocksize=blocksize)
        return to_numpy(codes), to_numpy(state.absmax).astype(np.float32)

    def dequantize_blockwise_8bit(self, codes, absmax, blocksize=256):
        import bitsandbytes.functional as F
        import torch

        out = F.dequantize_blockwise(
            torch.from_numpy(np.ascontiguousarray(codes)),
            absmax=torch.from_numpy(np.ascontiguousarray(absmax)),
            code=F.create_dynamic_map(signed=True),
            blocksize=blocksize,
        )
        return to_numpy(out)

    def path_counts(self) -> dict[str, int]:
        """Number of dequantize_4bit calls per bitsandbytes CPU path (bnb_paths.PATHS), this process and
        its forked workers together."""
        return {p: int(c) for p, c in zip(bnb_paths.PATHS, self._counts, strict=True)}

    def notes(self) -> list[str]:
        """Lines for the verdict table: the host as bitsandbytes sees it, the dequantize paths that ran and
        how often, and whether the AVX-512 kernel was exercised."""
        return bnb_paths.host_lines(self.path_counts())

    def reproducer(self, op: str, case: dict[str, Any]) -> str | None:
        """A standalone torch + bitsandbytes script for ``case`` (dequantize_4bit only), or None."""
        if op != "quant.dequantize_4bit":
            return None
        from refimpl.conformance.reproducer import bnb_dequantize_script

        return bnb_dequantize_script(case["packed"], case["state"])
