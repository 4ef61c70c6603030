"""glibc's allocator, set for tensor work: large blocks stay on the heap instead of returning to the kernel.

A training step or an extraction batch allocates and frees the same few-MB tensors again and again. glibc's
defaults serve a block above its mmap threshold with a fresh mapping and give the top of the heap back once
128 KB of it is free, so each step faults in and zeroes pages it had a moment ago (the time shows up as
system time and as slow ``copy_``/``fill_``). ``keep_heap`` raises both limits and pads heap growth, so the
pages are reused. It changes where memory comes from, never what is computed: the numbers are identical.
Peak RSS stays what the work needs; what is not given back between steps is memory the next step takes
again. docs/performance.md ("Allocator") has the measured effect and the command that measures it.

Settings a user made in the environment (``MALLOC_*_``) are left as they are, and
``ABAWFEAT_MALLOC=default`` leaves glibc's defaults alone altogether (what benchmarks/allocator.py compares
against). Child processes (the local backend's spawned workers, DataLoader workers) get the same settings:
forked ones inherit the allocator's state, spawned ones read the environment variables this sets.
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameter numbers (malloc.h) with glibc's environment variables for the same settings.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1024 * 1024 * 1024
TOP_PAD = 256 * 1024 * 1024
SETTINGS: dict[str, tuple[int, int]] = {
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": (_M_TOP_PAD, TOP_PAD),
}
OPT_OUT = "ABAWFEAT_MALLOC"
_done = False


def keep_heap() -> dict[str, int]:
    """Apply the settings to this process (glibc only; elsewhere nothing) and export them to children.

    Returns the settings applied here, by environment name (empty when none: another C library, or the user
    set them all). Idempotent."""
    global _done
    if _done:
        return {}
    _done = True
    if os.environ.get(OPT_OUT) == "default":
        return {}
    mallopt = _mallopt()
    applied: dict[str, int] = {}
    for name, (param, value) in SETTINGS.items():
        if name in os.environ:  # the user's own choice (glibc already read it at start-up)
            continue
        if mallopt is None or mallopt(param, value) != 1:
            continue
        os.environ[name] = str(value)
        applied[name] = value
    return applied


def _mallopt():  # noqa: ANN202 - a ctypes function or None
    # The symbols already loaded into this process (no ctypes.util.find_library: it runs ldconfig, a
    # subprocess at every command's start). gnu_get_libc_version exists in glibc only (not in musl).
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - the probe itself
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt
