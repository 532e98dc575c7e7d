"""torchao's NF4 tensor (``torchao.dtypes.nf4tensor``, torchao 0.17.0, CPU) as a conformance target.

Ops:

* ``quant.quantize_4bit``: ``to_nf4(t, block_size=blocksize, scaler_block_size=g)`` with g =
  ``torchao_profile.default_scaler_block_size`` (torchao needs g to divide the number of blocks), read back
  as a refimpl ``QuantState`` (``torchao_profile.as_quant_state``: int8 scale codes, factors, mean). torchao
  has NF4 only, bfloat16/float16/float32 tensors of at most 2 dimensions (``supports``) and no tail block
  (``unsupported``): the properties tier draws only there, and the report names the rest.
* ``quant.codebook``: the NF4 table an ``NF4Tensor`` of float32 data carries.

torchao's rules differ from QLoRA's reference by design (4-decimal codebook, distances in the input's
dtype with ties low, a true division, no subnormal clamp, int8 linear double quantization, always on):
``refimpl/quant/torchao_profile.py`` states them bit for bit and is the model of the known divergences in
``known_divergences.toml``. An all-zero block (0/0 = NaN → code 0 = −1.0) is torchao's bug: the model
gives the zero code, so those cases stay failures (reproducer: bench/reproducers/torchao_nf4_zero_block.py).

``notes()`` names the code path that ran: torchao's version, the Python ``NF4Tensor.from_tensor`` /
``quantize_tensor_nearest`` path on CPU (torchao's only NF4 quantizer; no C++/CUDA kernel is involved),
and the torch version and device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from refimpl.conformance._values import flatten, to_numpy
from refimpl.quant import torchao_profile

#: the versions this adapter was written against (torchtune 0.6.1 needs torchao < 0.18: nf4tensor moved)
TESTED_VERSION = "0.17.0"


def _torchao_nf4():
    """torchao's nf4tensor module (imported lazily: torchao and torch are optional)."""
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)  # torchao logs missing CUDA extensions on import
    from torchao.dtypes import nf4tensor

    return nf4tensor


def _torch_of(x: np.ndarray):
    import ml_dtypes
    import torch

    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


class TorchaoTarget:
    """Adapts torchao's NF4Tensor to refimpl.quant's op names."""

    name = "torchao"

    def __init__(self) -> None:
        self._nf4 = _torchao_nf4()  # fail early with ImportError when the peer is missing
        self._ops: dict[str, Callable[..., Any]] = {
            "quant.quantize_4bit": self.quantize_4bit,
            "quant.codebook": self.codebook,
        }

    def lookup(self, op: str) -> Callable[..., Any] | None:
        return self._ops.get(op)

    def provided_ops(self) -> list[str]:
        return sorted(self._ops)

    def options(self, op: str) -> dict[str, Any]:
        """torchao always double-quantizes its scales: every quantize case runs with double_quant=True, for the
        reference and torchao alike."""
        return {"double_quant": True} if op == "quant.quantize_4bit" else {}

    def compute_dtype(self, op: str) -> str:
        return "float32"

    def supports(self, op: str) -> dict[str, set[Any]]:
        """torchao's NF4Tensor: the NF4 table only; ``to_nf4`` of a bfloat16, float16 or float32 tensor of at
        most 2 dimensions (``NF4Tensor.from_tensor`` asserts dim <= 2)."""
        if op == "quant.codebook":
            return {"name": {"nf4"}}
        if op == "quant.quantize_4bit":
            return {"quant_type": {"nf4"}, "dtypes": set(torchao_profile.DTYPES), "x.ndim": {1, 2}}
        return {}

    def unsupported(self, op: str, case: dict[str, Any]) -> str | None:
        """What ``supports`` cannot say: torchao quantizes whole blocks only (no tail block)."""
        if op != "quant.quantize_4bit":
            return None
        x, bs = case.get("x"), case.get("blocksize", 64)
        if not isinstance(x, np.ndarray) or isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
            return None  # an invalid case: the reference rejects it and the adapter must too
        return torchao_profile.unsupported(tuple(x.shape), bs)

    def codebook(self, name: str = "nf4") -> np.ndarray:
        import torch

        if name != "nf4":
            raise ValueError(f"name: torchao has the NF4 table only, got {name!r}")
        t = self._nf4.to_nf4(torch.linspace(-1, 1, 64, dtype=torch.float32), 64, 1)
        return to_numpy(t.nf4).astype(np.float32)

    def quantize_4bit(
        self, x, blocksize=64, quant_type="nf4", double_quant=False, *, profile="reference", nonfinite=None, threads=1
    ):
        """``to_nf4``; torchao always double-quantizes, so ``double_quant`` and ``profile`` do not change
        what it returns (``nonfinite``: torchao never checks its input)."""
        arr = np.asarray(x)
        if quant_type != "nf4":
            raise ValueError(f"quant_type: torchao's NF4Tensor has no {quant_type!r}")
        if str(arr.dtype) not in torchao_profile.DTYPES:
            raise TypeError(f"x: the adapter passes bfloat16, float16 or float32 tensors, got dtype {arr.dtype}")
        shape = tuple(int(s) for s in arr.shape)
        why = torchao_profile.unsupported(shape, int(blocksize))
        if why:
            raise ValueError(f"x: {why}, got shape {shape}")
        n_blocks = arr.size // int(blocksize)
        sbs = torchao_profile.default_scaler_block_size(n_blocks)
        t = self._nf4.to_nf4(_torch_of(arr), int(blocksize), sbs)
        sc = torchao_profile.ScaleCodes(
            codes=to_numpy(t.quantized_scalers).astype(np.int8),
            factor=to_numpy(t.quantization_factor).astype(np.float32),
            mean=np.float32(to_numpy(t.scaler_mean).astype(np.float32)),
        )
        packed = to_numpy(t.quantized_data).astype(np.uint8).reshape(-1, 1)
        state = torchao_profile.as_quant_state(shape, str(arr.dtype), int(blocksize), sc, sbs)
        if not np.array_equal(state.code, to_numpy(t.nf4).astype(np.float32)):
            raise RuntimeError("torchao's NF4 table is not the 4-decimal table torchao_profile states")
        return packed, state

    def notes(self) -> list[str]:
        """The code path that ran, with versions."""
        import torch
        import torchao

        return [
            f"torchao {torchao.__version__} (adapter written for {TESTED_VERSION}), torch {torch.__version__}, "
            f"device cpu: NF4Tensor.from_tensor → quantize_tensor_nearest (torchao's pure-torch NF4 path; "
            f"no C++/CUDA kernel), scaler_block_size = the largest divisor of the block count ≤ 256",
            "rules compared: refimpl/quant/torchao_profile.py (the modelled known divergence); the all-zero "
            "block stays a failure (bench/reproducers/torchao_nf4_zero_block.py)",
        ]

    def reproducer(self, op: str, case: dict[str, Any]) -> str | None:
        """A standalone torch + torchao script for a quantize_4bit case, or None."""
        if op != "quant.quantize_4bit":
            return None
        return zero_block_script(np.asarray(case["x"]), int(case.get("blocksize", 64)))


def zero_block_script(x: np.ndarray, blocksize: int) -> str:
    """A torch + torchao script that quantizes ``x`` and prints the blocks whose codes are not the nearest
    NF4 level of x/absmax (an all-zero block must give the zero code, 7)."""
    import ml_dtypes

    dt = "bfloat16" if x.dtype == np.dtype(ml_dtypes.bfloat16) else str(x.dtype)
    flat = np.asarray(x, dtype=np.float32).reshape(-1).tolist()
    values = (
        "[\n"
        + "".join("    " + ", ".join(repr(v) for v in flat[i : i + 4]) + ",\n" for i in range(0, len(flat), 4))
        + "]"
    )
    sbs = torchao_profile.default_scaler_block_size(x.size // blocksize)
    return f'''"""torchao NF4: an all-zero block is quantized to code 0 (-1.0) instead of the zero code.

NF4Tensor.convert_to_norm_float_weight divides each block by its absmax; for an all-zero block that is
0/0 = NaN, and quantize_tensor_nearest's argmin over NaN distances returns index 0 (-1.0). With the
double-quantized scales the block then dequantizes to -scale, not 0.
"""
import torch
from torchao.dtypes.nf4tensor import to_nf4

x = torch.tensor({values}, dtype=torch.float32).to(torch.{dt}).reshape({tuple(x.shape)!r})
nf4 = to_nf4(x, block_size={blocksize}, scaler_block_size={sbs})
codes = torch.stack([nf4.quantized_data >> 4, nf4.quantized_data & 15], dim=-1).reshape(-1)
blocks = x.reshape(-1, {blocksize}).float()
zero_code = int((nf4.nf4 == 0).nonzero()[0])
bad = 0
for b in range(blocks.shape[0]):
    if (blocks[b] == 0).all():
        got = codes[b * {blocksize}:(b + 1) * {blocksize}]
        deq = nf4.get_original_weight().reshape(-1)[b * {blocksize}:(b + 1) * {blocksize}]
        if (got != zero_code).any():
            bad += 1
            print(f"block {{b}} is all zero: codes {{sorted(set(got.tolist()))}} (expected [{{zero_code}}]), "
                  f"dequantized to {{sorted(set(deq.float().tolist()))}} (expected [0.0])")
print(f"torch {{torch.__version__}}, torchao {{__import__('torchao').__version__}}: {{bad}} all-zero block(s) "
      f"quantized wrongly")
raise SystemExit(1 if bad else 0)
'''


# ---------------------------------------------------------------------------- divergence models


def quantize_model(op: str, case: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any] | None:
    """torchao's quantize_4bit output as ``torchao_profile`` states it (all-zero blocks get the zero code)."""
    if op != "quant.quantize_4bit" or case.get("quant_type", "nf4") != "nf4":
        return None
    x = np.asarray(case["x"])
    if str(x.dtype) not in torchao_profile.DTYPES or torchao_profile.unsupported(x.shape, case["blocksize"]):
        return None
    return flatten(torchao_profile.quantize(x, case["blocksize"]))


def codebook_model(op: str, case: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any] | None:
    """torchao's NF4 table (4 decimals, float32)."""
    if op != "quant.codebook" or case.get("name", "nf4") != "nf4":
        return None
    return flatten(torchao_profile.codebook("float32"))
