"""numba CPU kernels for refimpl's hot paths, one module per concept, same names as the reference:

    quant    NF4/FP4 quantize_4bit / dequantize_4bit (bitsandbytes-cpu bytes, nested statistics)
    qlora    fused 4-bit dequantize-GEMV/GEMM (dequant_matmul) and the QLoRA forward
    lora     forward, backward (rank-r update accumulated in place)
    lora_batched  forward_batched: many adapters in one batch, tokens grouped by adapter (segment form)
    dora     forward, weight_norm (row norms in tiles, no (out, in) temporary)
    ties     TIES merge: O(n) radix-select trim, one fused elect + disjoint-merge pass

Every kernel is a serial ``@njit(..., cache=True, nogil=True, fastmath=False)`` loop run on numba's
thread count by ``_parallel.parallel_ranges``: compiled code is cached next to the
modules (numba's __pycache__, or $NUMBA_CACHE_DIR), so a second process loads it instead of compiling
(bench/README.md gives the first-call compile and second-process start times); a damaged cache file is
recompiled with a warning, never a kernel failure (``_cache``). Importing this package needs numba.
"""

from refimpl.kernels.numba_cpu import _cache

_cache.install()  # a damaged cache file recompiles the kernel with a warning instead of failing it

#: ops whose kernel lives in a module not named after the reference's (the registry consults this first)
OPS: dict[str, str] = {"lora.forward_batched": "lora_batched.forward_batched"}
