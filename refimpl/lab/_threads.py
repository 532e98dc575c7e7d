"""Run NumPy's BLAS single-threaded inside the lab.

The lab's matrices are tiny (32 × 64); on a shared 2-core machine OpenBLAS threads only
contend (measured: 200 training steps 3.6 s with one thread, 18.8 s with the default while
other jobs ran). This switches numpy's bundled scipy-openblas at run time through ctypes and
restores the previous count afterwards; with any other BLAS it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from collections.abc import Iterator

import numpy as np


def _openblas() -> ctypes.CDLL | None:
    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "libscipy_openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "scipy_openblas_set_num_threads64_") and hasattr(lib, "scipy_openblas_get_num_threads64_"):
            return lib
    return None


_LIB = _openblas()


@contextlib.contextmanager
def single_thread_blas() -> Iterator[None]:
    if _LIB is None:
        yield
        return
    before = int(_LIB.scipy_openblas_get_num_threads64_())
    _LIB.scipy_openblas_set_num_threads64_(ctypes.c_int(1))
    try:
        yield
    finally:
        _LIB.scipy_openblas_set_num_threads64_(ctypes.c_int(before))
