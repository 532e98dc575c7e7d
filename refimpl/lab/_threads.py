"""Run the BLAS single-threaded inside the lab.

The lab's matrices are tiny (32 × 64); on a shared 2-core machine BLAS threads only contend
(measured: 200 training steps 3.6 s with one thread, 18.8 s with the default while other jobs
ran). threadpoolctl (the ``lab`` extra) limits whichever BLAS numpy loaded (OpenBLAS, MKL, BLIS,
Accelerate) and restores the previous count afterwards; without it this does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def single_thread_blas() -> Iterator[None]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the lab extra is missing: run with the BLAS defaults
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
