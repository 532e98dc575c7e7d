"""Does bitsandbytes' CUDA 4-bit dequantization flush subnormal float32 values to zero? (run on the device)

bitsandbytes builds csrc/kernels.cu with ``--use_fast_math``, and rebuilds a nested absmax as
``dequantize_blockwise(codes, state2)`` (a fast-math kernel) followed by ``absmax += offset`` (a torch add).
This probe asks bitsandbytes 0.50.2 on CUDA directly, with

1. plain states whose absmax makes code·absmax subnormal (every code, absmax from 1e-45 to 4e-38), and
2. the nested state of the former cupy conformance failure "fp4 subnormal blocks around the 1e-38 clamp",

and counts, for each, the elements where bitsandbytes' bits differ from refimpl's ``bitsandbytes-cuda``
profile and from the ``reference`` dequantization (which keeps subnormals). The first run (2026-11-30, H200)
found every subnormal flushed; the profile has flushed them since (profiles/bitsandbytes_cuda.py,
``scaled_codes`` and ``nested_scales``), so a current run should print 0 in ``bnb_vs_profile_bits_differ``.

    PYTHONPATH=. python bench/bnb_cuda_subnormal_probe.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from bitsandbytes import functional as F

from refimpl import quant
from refimpl.quant import codebooks

#: the packed bytes of that failing case (132 bytes, 263 elements)
_FAILURE_PACKED_HEX = (
    "18119919110999088118199899801880999199919918111988198909910188113aedea3d4c24a2326aa36a276fedb296"
    "c5bfba34e12c64f152a3b52ae2b7215d5cece51ef5951147194e5d915f46765eecdf44c6966e5966cde747c44414dddf"
    "8000000000808000008880000080880880000000880088000008000000008000eee9f610"
)


def _bnb_dequantize(packed: np.ndarray, state: quant.QuantState) -> np.ndarray:
    dev = "cuda"
    code = torch.from_numpy(codebooks.codebook(state.quant_type).astype(np.float32)).to(dev)
    if state.nested_absmax is not None:
        state2 = F.QuantState(
            absmax=torch.from_numpy(np.asarray(state.nested_absmax, np.float32)).to(dev),
            code=torch.from_numpy(codebooks.codebook("dynamic8").astype(np.float32)).to(dev),
            blocksize=state.nested_blocksize,
            dtype=torch.float32,
        )
        absmax = torch.from_numpy(np.asarray(state.absmax, np.uint8)).to(dev)
        offset = torch.tensor(float(state.offset), dtype=torch.float32, device=dev)
    else:
        state2, offset = None, None
        absmax = torch.from_numpy(np.asarray(state.absmax, np.float32)).to(dev)
    qs = F.QuantState(
        absmax=absmax,
        shape=torch.Size(state.shape),
        code=code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=torch.float32,
        offset=offset,
        state2=state2,
    )
    out = F.dequantize_4bit(torch.from_numpy(packed.copy()).to(dev), qs)
    return out.cpu().numpy().reshape(-1)


def _compare(name: str, packed: np.ndarray, state: quant.QuantState) -> dict:
    profile = np.asarray(quant.dequantize_4bit(packed, state, profile="bitsandbytes-cuda"), np.float32).reshape(-1)
    reference = np.asarray(quant.dequantize_4bit(packed, state, profile="reference"), np.float32).reshape(-1)
    bnb = _bnb_dequantize(packed, state)
    tiny = np.finfo(np.float32).tiny
    row = {
        "case": name,
        "elements": int(profile.size),
        "reference_subnormal_outputs": int(((reference != 0) & (np.abs(reference) < tiny)).sum()),
        "bnb_subnormal_outputs": int(((bnb != 0) & (np.abs(bnb) < tiny)).sum()),
        "bnb_vs_reference_bits_differ": int((bnb.view(np.uint32) != reference.view(np.uint32)).sum()),
        "bnb_vs_profile_bits_differ": int((bnb.view(np.uint32) != profile.view(np.uint32)).sum()),
    }
    print(row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    rows = []
    nib = np.arange(16, dtype=np.uint8)
    packed_row = ((nib[0::2] << 4) | nib[1::2]).astype(np.uint8)  # every code once, 16 elements a block half
    for quant_type in ("nf4", "fp4"):
        absmax = np.float32([1e-45, 1e-40, 5e-39, 1.1e-38, 1.2e-38, 2e-38, 4e-38, 1.0])
        packed = np.tile(packed_row, 4 * absmax.size).reshape(-1, 1)  # 64 elements a block
        state = quant.QuantState(
            shape=(64 * absmax.size,),
            dtype="float32",
            blocksize=64,
            quant_type=quant_type,
            absmax=absmax,
            code=codebooks.codebook(quant_type),
        )
        rows.append(_compare(f"{quant_type} plain, absmax {absmax.tolist()}", packed, state))
    # the nested state of the cupy conformance failure (bench/results/conform-cupy-h200.txt)
    packed = np.frombuffer(bytes.fromhex(_FAILURE_PACKED_HEX), dtype=np.uint8).reshape(-1, 1)
    state = quant.QuantState(
        shape=(263,),
        dtype="float32",
        blocksize=64,
        quant_type="fp4",
        absmax=np.array([8, 255, 86, 6, 242], dtype=np.uint8),
        code=codebooks.codebook("fp4"),
        offset=np.float32(5.219999330231805e-39),
        nested_absmax=np.array([5.780000235529932e-39], dtype=np.float32),
        nested_code=codebooks.codebook("dynamic8"),
        nested_blocksize=256,
    )
    rows.append(_compare("fp4 nested: the cupy conformance failure", packed, state))
    path = os.path.join(args.out, "bnb-cuda-subnormal-probe.json")
    with open(path, "w") as fh:
        json.dump({"bitsandbytes": F.__name__, "rows": rows}, fh, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
