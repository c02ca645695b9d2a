"""Keep freed memory for reuse during hot loops (Linux glibc).

glibc serves every allocation above 32 MB with a fresh ``mmap`` and unmaps it on free, so a loop
that allocates the same big buffers each step (MLX's (batch, d_hidden) pre-activations: 151 MB at
batch 4096 x 9216 latents) pays a page fault per 4 KB page each time, a sizeable share of the step
(docs/performance.md). Inside ``reuse_freed_memory()`` allocations come from the heap and
freed memory stays there for the next step; on exit the defaults return and free pages go back to
the OS (``malloc_trim``). Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

#: Set to "0" to leave the allocator alone.
ENV_VAR = "SAEPIPE_MALLOC"

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or os.environ.get(ENV_VAR) == "0":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, big buffers freed by one step are reused by the next (no page faults)."""
    global _depth
    libc = _glibc()
    if libc is None or _depth > 0:  # nested: the outer block restores
        yield
        return
    _depth += 1
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        _depth -= 1
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


__all__ = ["ENV_VAR", "reuse_freed_memory"]
