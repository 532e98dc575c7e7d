"""4-bit NF4/FP4 blockwise quantization (QLoRA, arXiv 2305.14314), byte-compatible with
bitsandbytes 0.50.2, with 8-bit double quantization and a checker that classifies differing
nibbles. The written rules are spec/nf4.md."""

from refimpl.quant.blockwise import (
    dequantize_4bit,
    dequantize_blockwise_8bit,
    pack_nibbles,
    quantize_4bit,
    quantize_blockwise_8bit,
    storage_bits_per_parameter,
    unpack_nibbles,
)
from refimpl.quant.check import Check4bitReport, check_4bit
from refimpl.quant.codebooks import QUANT_TYPES, codebook
from refimpl.quant.operands import BLOCKSIZES, PROFILES
from refimpl.quant.state import QuantState

__all__ = [
    "BLOCKSIZES",
    "PROFILES",
    "QUANT_TYPES",
    "Check4bitReport",
    "QuantState",
    "check_4bit",
    "codebook",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "pack_nibbles",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "storage_bits_per_parameter",
    "unpack_nibbles",
]
