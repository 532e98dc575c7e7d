"""Run a serial, GIL-free numba kernel over contiguous ranges of work on numba's thread count.

Why not ``prange``: numba lowers every ``parallel=True`` function once more as a gufunc and
re-optimises all the code it calls inside it, for each type signature; on this 2-core machine
that cost 3–6 s per kernel signature and made up most of the cold-cache start of
``refimpl conform`` (bench/README.md, "Compile time"). A serial ``@njit(nogil=True)`` kernel
compiles once per signature at its plain cost, and ``get_num_threads()`` Python threads run it
on contiguous parts of the work, each as ``kernel(*args, lo, hi)``.

The split only decides which thread runs which part; kernels that reduce across ranges
keep their own fixed chunking, so results never depend on the thread count.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from numba import config, get_num_threads

PARTS_PER_THREAD = 4
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _forget_pool_in_child() -> None:
    # a forked child (the conformance runner's worker) inherits the pool object but not its threads
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            # numba.config's options are set at import time, invisible to mypy
            _POOL = ThreadPoolExecutor(
                max_workers=max(1, config.NUMBA_NUM_THREADS - 1),  # type: ignore[attr-defined]
                thread_name_prefix="refimpl-numba",
            )
        return _POOL


def parallel_ranges(kernel: Callable[..., Any], units: int, *args: Any) -> list[Any]:
    """[kernel(*args, lo, hi) for each part of [0, units)], in part order.

    [0, units) is cut into up to ``PARTS_PER_THREAD`` × threads contiguous equal parts, which the
    calling thread and threads − 1 pool threads take in turn (a busy core does not hold up the
    others). ``kernel`` must be ``@njit(nogil=True)``.
    """
    k = max(1, min(get_num_threads(), units))
    if k == 1:
        return [kernel(*args, 0, units)]
    parts = min(units, PARTS_PER_THREAD * k)
    bounds = [j * units // parts for j in range(parts + 1)]
    results: list[Any] = [None] * parts
    counter = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        while (j := next(counter)) < parts:
            results[j] = kernel(*args, bounds[j], bounds[j + 1])

    futures = [_pool().submit(work) for _ in range(k - 1)]
    work()
    for f in futures:
        f.result()
    return results
