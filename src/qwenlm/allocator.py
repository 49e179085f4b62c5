"""How the process's C allocator (glibc malloc) treats the megabyte-sized blocks of CPU inference.

A prompt's intermediate tensors (a 512-token MLP activation of a 0.5B model is 10 MB in fp32) are freed and
allocated again in every layer. By default glibc hands such blocks back to the kernel (blocks above its mmap
threshold are unmapped on free; free memory at the top of the heap beyond its trim threshold is trimmed), so
each new tensor page-faults its memory in again, zeroed by the kernel: that cost 10-30 % of a 512-token
prompt on 2 cores (benchmarks/RESULTS.md). ``keep_freed_memory`` raises both thresholds so that freed blocks
stay in the process for the next tensor; ``release_freed_memory`` gives free pages back when wanted (the
server does so every few seconds). Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit systems
TRIM_THRESHOLD = 1 << 30
ENV_SWITCH = "QWENLM_KEEP_FREED_MEMORY"  # =0 leaves the allocator as it is


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _load_libc()


def keep_freed_memory() -> bool:
    """Keep freed blocks of up to 32 MiB in the process for reuse instead of returning them to the kernel
    (process-wide; called when a model is loaded on the CPU). False where it does not apply: not glibc, or
    switched off with ``QWENLM_KEEP_FREED_MEMORY=0``."""
    if _LIBC is None or os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    # mallopt returns 1 on success; a fixed mmap threshold also stops glibc from adjusting it
    mmap_ok = _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(mmap_ok) and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``; elsewhere nothing)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
