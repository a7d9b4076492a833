"""The process's own memory: handing freed pages back to the system."""

from __future__ import annotations

import ctypes


def release_free_memory() -> None:
    """Hand the C allocator's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Prefills and batches of every size leave freed blocks scattered in glibc's arenas: a 200-request
    soak grew the server's RSS by 31 % with nothing live. Trimming when the scheduler goes idle keeps
    the process at what it holds. After a GGUF's first dequantisation it returned ~0.6 GB (1B model),
    and reading its blocks leaves as much.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


__all__ = ["release_free_memory"]
