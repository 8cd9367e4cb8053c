"""Keep freed memory for reuse: the C allocator setting a training program makes once."""
from __future__ import annotations

import ctypes
import sys


def keep_freed_host_memory() -> bool:
    """Let the C allocator reuse freed memory instead of handing it back to the OS (glibc only).

    A training step allocates and frees over 100 MB of arrays. By default glibc's malloc takes every
    block above a threshold (128 KiB, rising to at most 32 MiB) straight from the OS and returns it on
    free, so the next step's arrays fault their pages back in and the kernel zeroes every one of them
    again: measured 72 MB of page faults and ~90 ms of a 580 ms standard step (2 cores). With high
    mmap and trim thresholds freed blocks stay in the heap and the next step reuses them: ~490 ms.
    The price: the process keeps its high-water mark of memory instead of shrinking between steps.
    (PyTorch's CPU performance guide makes the same point by suggesting jemalloc or tcmalloc.)

    Process-wide, so only programs call it (``tinyunet train``/``evaluate``/``predict``, the
    benchmark), never the library on import. Returns False where glibc's ``mallopt`` is missing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, ctypes.c_int(1 << 30))
                and mallopt(m_trim_threshold, ctypes.c_int(2 ** 31 - 1)))
