"""The peer profiles of refimpl.quant (spec/nf4.md §6), chosen by name from ``PROFILES``.

A profile is the reference with some steps replaced, in the spirit of ONNX's versioned op classes: the
table names, for each peer, the steps of ``refimpl.quant.blockwise`` (its section "core") that the peer
computes differently and the function of the peer's module that computes each one. Every step a profile
does not name is the reference's.

    bitsandbytes-cpu   bitsandbytes 0.50.2 on CPU, bit for bit, special values included (``bitsandbytes_cpu``)
    bitsandbytes-cuda  the rules of bitsandbytes 0.50.2's CUDA kernels (``bitsandbytes_cuda``)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from refimpl.quant.profiles import bitsandbytes_cpu, bitsandbytes_cuda

PROFILES: dict[str, dict[str, Callable[..., Any]]] = {
    "reference": {},
    "bitsandbytes-cpu": {
        "block_absmax": bitsandbytes_cpu.block_absmax,
        "absmax_offset": bitsandbytes_cpu.absmax_offset,
        "codes_8bit": bitsandbytes_cpu.codes_8bit,
        "fp4_zero_is_negative": bitsandbytes_cpu.fp4_zero_is_negative,
        "cast_output": bitsandbytes_cpu.cast_output,
    },
    "bitsandbytes-cuda": {
        "block_absmax": bitsandbytes_cuda.block_absmax,
        "scaled": bitsandbytes_cuda.scaled,
        "pad_scaled": bitsandbytes_cuda.pad_scaled,
        "nibbles": bitsandbytes_cuda.nibbles,
        "absmax_8bit": bitsandbytes_cuda.absmax_8bit,
        "scaled_8bit": bitsandbytes_cuda.scaled_8bit,
        "codes_8bit": bitsandbytes_cuda.codes_8bit,
        "fp4_zero_is_negative": bitsandbytes_cuda.fp4_zero_is_negative,
        "scaled_codes": bitsandbytes_cuda.scaled_codes,
        "nested_scales": bitsandbytes_cuda.nested_scales,
    },
}
