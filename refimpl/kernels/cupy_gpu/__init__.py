"""CuPy GPU kernels for refimpl's operations (needs the ``gpu`` extra and an NVIDIA GPU).

Same operation names as the NumPy reference; each is checked against it by tests/test_kernels_cupy.py
(pytest marker ``gpu``) and timed against bitsandbytes' CUDA kernels and torch by bench/gpu_bench.py.

    quantize_4bit, dequantize_4bit, quantize_absmax  NF4/FP4 blockwise storage (bitsandbytes CUDA bytes)
    gemv_4bit, qlora_forward                          fused 4-bit GEMV for m ≤ 16 (+ LoRA branch)
    qlora_backward.backward                           QLoRA backward: dequantize + cuBLAS, keep mask fused
    lora_forward, dora_forward, pack, workspace,
    forward_packed                                    LoRA/DoRA as one cuBLAS GEMM over K = d + r
    ties                                              TIES merge in one fused pass
    lora_batched.pack_batched, forward_batched_packed many adapters in one batch (one GEMM, masked gather)

Importing this package does not import CuPy; ``refimpl.kernels.available()["cupy"]`` says why the kernels
cannot run here (None when they can).
"""

from __future__ import annotations

from refimpl.kernels.cupy_gpu.gemv4 import gemv_4bit, qlora_forward
from refimpl.kernels.cupy_gpu.lora_gemm import PackedLinear, forward_packed, pack, workspace
from refimpl.kernels.cupy_gpu.lora_gemm import dora_forward as dora_forward
from refimpl.kernels.cupy_gpu.lora_gemm import forward as lora_forward
from refimpl.kernels.cupy_gpu.nf4 import GpuQuantState, dequantize_4bit, quantize_4bit, quantize_absmax
from refimpl.kernels.cupy_gpu.ties import ties

#: The kernels under the reference's op names (NumPy in, NumPy out), for the registry
#: (``refimpl.kernels.get(op, "cupy")``) and ``refimpl conform --target cupy``; see numpy_adapter.py.
OPS: dict[str, str] = {
    "lora.forward": "numpy_adapter.lora_forward",
    "lora.forward_batched": "numpy_adapter.lora_forward_batched",
    "dora.forward": "numpy_adapter.dora_forward",
    "qlora.forward": "numpy_adapter.qlora_forward",
    "qlora.backward": "qlora_backward.qlora_backward",
    "quant.quantize_4bit": "numpy_adapter.quantize_4bit",
    "quant.dequantize_4bit": "numpy_adapter.dequantize_4bit",
    "merging.ties": "numpy_adapter.ties",
}

__all__ = [
    "OPS",
    "GpuQuantState",
    "PackedLinear",
    "dequantize_4bit",
    "dora_forward",
    "forward_packed",
    "gemv_4bit",
    "lora_forward",
    "pack",
    "qlora_forward",
    "quantize_4bit",
    "quantize_absmax",
    "ties",
    "workspace",
]
