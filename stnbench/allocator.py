"""Keep freed memory in the heap (glibc): a training step reallocates the same big buffers.

By default glibc maps large buffers fresh and returns them when freed, so every step page-faults
its activations in again. ``keep_freed_memory()`` makes glibc serve everything from the heap and
never trim it (+23% ST-CNN training throughput on RTS, +57% CNN on 28x28: docs/performance.md);
``restore()`` goes back to glibc's defaults (the benchmark's plain baseline). Without glibc
(macOS, musl) both do nothing.
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024}


def _mallopt():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed memory; whether it took effect."""
    mallopt = _mallopt()
    return bool(mallopt and mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def restore() -> bool:
    """glibc's default settings (its dynamic mmap threshold restarts from 128 KiB, fixed)."""
    mallopt = _mallopt()
    return bool(mallopt and all(mallopt(k, v) for k, v in DEFAULTS.items()))
