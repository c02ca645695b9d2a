"""saepipe.runtime.memory: big buffers are reused inside the block and the defaults come back after it."""

from __future__ import annotations

import ctypes
import resource

import pytest

from saepipe.runtime import memory

pytestmark = pytest.mark.skipif(memory._glibc() is None, reason="glibc only")

_SIZE = 64 * 2**20  # above glibc's largest mmap threshold (32 MB)


def _faults_of_touching_a_fresh_buffer() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    ptr = libc.malloc(_SIZE)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(ptr, 1, _SIZE)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(ptr)
    return faults


def test_freed_buffers_are_reused_only_inside_the_block():
    outside = _faults_of_touching_a_fresh_buffer()  # a fresh mmap: every page (or huge page) faults
    assert outside >= _SIZE // (2 * 2**20)
    with memory.reuse_freed_memory():
        _faults_of_touching_a_fresh_buffer()
        with memory.reuse_freed_memory():  # nested blocks leave the outer one in charge
            pass
        assert _faults_of_touching_a_fresh_buffer() * 4 < outside
    assert _faults_of_touching_a_fresh_buffer() * 2 > outside  # the defaults are back


def test_opt_out(monkeypatch):
    monkeypatch.setenv(memory.ENV_VAR, "0")
    assert memory._glibc() is None
