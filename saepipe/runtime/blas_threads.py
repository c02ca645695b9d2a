"""Scoped OpenBLAS thread count (for ``forward``'s per-core streams): a no-op without OpenBLAS."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from saepipe.runtime import blas

_lock = threading.RLock()  # re-entrant: a single-threaded caller may nest another
_lib: ctypes.CDLL | None = None


def _openblas() -> ctypes.CDLL | None:
    global _lib
    if _lib is None and blas.loaded_path:
        lib = ctypes.CDLL(blas.loaded_path)
        if hasattr(lib, "openblas_set_num_threads") and hasattr(lib, "openblas_get_num_threads"):
            _lib = lib
    return _lib


def can_set_threads() -> bool:
    """Whether the loaded BLAS is an OpenBLAS whose thread count can be changed."""
    return _openblas() is not None


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the body with OpenBLAS on one thread, then restore the previous count."""
    lib = _openblas()
    if lib is None:
        yield
        return
    with _lock:
        before = lib.openblas_get_num_threads()
        lib.openblas_set_num_threads(1)
        try:
            yield
        finally:
            lib.openblas_set_num_threads(before)
