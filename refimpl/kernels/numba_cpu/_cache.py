"""A damaged numba cache is a cache problem, never a kernel failure.

The kernels are compiled with ``cache=True``: numba keeps, per function, an index file
(``<module>.<function>-<line>.py311.nbi``) and one data file per signature (``….<n>.nbc``) in the
cache directory: ``$NUMBA_CACHE_DIR/numba_cpu_<hash of this folder's path>/`` when NUMBA_CACHE_DIR
is set, else ``__pycache__`` beside these modules (or a per-user folder when that is not writable).
Numba writes them atomically, but a full disk, a copied checkout or a stray edit can leave a file
that no longer unpickles; numba then raises from inside the kernel call (``UnpicklingError: pickle
data was truncated``), on every later run, and a conformance run reports DOES NOT CONFORM.

``install`` wraps numba's per-function cache for the functions of this package only: a file that
fails to load is reported with a ``NumbaCacheWarning`` ("numba cache problem: …"), its index is
emptied, and the call compiles the kernel again and rewrites the cache. When the cache cannot be
rewritten (a read-only folder), the freshly compiled kernel is still used and the warning says
which folder to delete. Functions of other packages keep numba's own behaviour.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

_PACKAGE = __name__.rpartition(".")[0]  # refimpl.kernels.numba_cpu


class NumbaCacheWarning(RuntimeWarning):
    """A numba cache file of a refimpl kernel could not be read or written; the kernel was recompiled."""


def _ours(cache: Any) -> bool:
    module = getattr(getattr(cache, "_py_func", None), "__module__", None) or ""
    return module == _PACKAGE or module.startswith(_PACKAGE + ".")


def _warn(cache: Any, doing: str, exc: BaseException, outcome: str) -> None:
    func = getattr(getattr(cache, "_py_func", None), "__qualname__", "?")
    folder = getattr(cache, "cache_path", "?")
    warnings.warn(
        f"numba cache problem: {type(exc).__name__}: {exc} while {doing} the cache of {func} in "
        f"{folder}; {outcome} (if this repeats, delete {folder})",
        NumbaCacheWarning,
        stacklevel=4,
    )


def install() -> None:
    """Guard numba's cache for this package's kernels (idempotent; a no-op on a numba without the hooks)."""
    try:
        from numba.core.caching import Cache
    except ImportError:  # pragma: no cover - numba moved its cache: keep numba's behaviour
        return
    load, save = getattr(Cache, "load_overload", None), getattr(Cache, "save_overload", None)
    if load is None or save is None or getattr(load, "_refimpl_guard", False):
        return

    @functools.wraps(load)
    def load_overload(self: Any, sig: Any, target_context: Any) -> Any:
        if not _ours(self):
            return load(self, sig, target_context)
        try:
            return load(self, sig, target_context)
        except Exception as exc:  # a damaged index or data file: treat it as a cache miss
            try:
                self.flush()  # an empty index: the recompiled kernel's save rewrites it whole
                outcome = "recompiled the kernel and rewrote the cache"
            except Exception:
                outcome = "recompiled the kernel, but the cache folder cannot be rewritten"
            _warn(self, "reading", exc, outcome)
            return None  # numba compiles the kernel, then calls save_overload

    @functools.wraps(save)
    def save_overload(self: Any, sig: Any, data: Any) -> Any:
        if not _ours(self):
            return save(self, sig, data)
        try:
            return save(self, sig, data)
        except Exception as exc:  # the kernel is compiled and used; only the next process compiles again
            _warn(self, "writing", exc, "the compiled kernel is used without caching it")
            return None

    load_overload._refimpl_guard = True  # type: ignore[attr-defined]
    Cache.load_overload = load_overload  # type: ignore[method-assign]
    Cache.save_overload = save_overload  # type: ignore[method-assign]
