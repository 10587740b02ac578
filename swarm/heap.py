"""Giving freed memory back to the operating system.

glibc keeps freed blocks in its heaps for reuse, so a process's resident size stays at its
high-water mark after large temporaries are gone: weights read at load, a float span replaced
by its quantized copy, a training batch's activations. `malloc_trim` returns what is free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to release this way
        return None


def release_freed_memory() -> None:
    """Hands memory freed by the process back to the OS. Measured on the default model: a
    float32 span quantized to int8 otherwise still held 22.7 MiB per block (its float32 weights
    took 13.7), 3.5 MiB once released."""
    trim = _trim()
    if trim is not None:
        trim(0)
