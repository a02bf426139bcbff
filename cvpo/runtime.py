"""Process-wide settings a training process wants and a library must not impose on import.

glibc's allocator hands large blocks (over a dynamic threshold of 128 KB–32 MB) to the kernel and
trims freed memory at the top of the heap back to it. An update allocates and frees dozens of
(B·K, width) float32 activations (2 MB each at B 256, K 16, width 128), so every update paid for
them again in page faults, ~2 000 per update, the kernel zeroing fresh pages each time: one torch
thread, FSRL's config, 220 isolated updates took 530 k minor faults and 15.1 ms of CPU per update
without this, 71 k and 10.7 ms with it. Keeping freed memory up to ``trim_threshold`` in the heap
removes that; peak memory is unchanged, the process just does not give its last ≤ 64 MB back.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
DISABLE_ENV = "CVPO_MALLOC_TUNING"  # "0" leaves the allocator alone


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Serve blocks under ``mmap_threshold`` from the heap and keep up to ``trim_threshold`` freed.

    True when glibc's ``mallopt`` accepted both; False (and nothing changed) on other C libraries,
    or when ``CVPO_MALLOC_TUNING=0``. Numerics are unaffected: torch aligns every block to 64 bytes
    either way.
    """
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
