"""Keep freed memory mapped in a process that runs a torch loop (glibc's ``mallopt``).

A gradient step frees and re-allocates the same tensors every batch: logits, their
softmax, activations. With glibc's defaults, blocks of a few MiB are returned to the
kernel when freed (``munmap``, or a trim of the heap's top), so the next batch faults
every page in again: on the tiny default, 3,000 page faults and about a fifth of a
2 x 256-token step's time on a CPU. Serving blocks up to 32 MiB from the heap and
trimming the heap only past 128 MiB of free space takes the faults to zero for the cost
of keeping that much freed memory mapped.

Called once per worker process by the runners and the training loop. It changes nothing
when the user set glibc's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``
(theirs win), when ``BERGSON_RAY_MALLOC=default``, or off glibc (musl, macOS).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Blocks below this come from the heap (32 MiB: the largest value glibc accepts)."""
TRIM_THRESHOLD = 128 << 20
"""The heap gives memory back to the kernel only when this much at its top is free."""
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune this process's ``malloc`` as the module docstring says, once; whether it did."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("BERGSON_RAY_MALLOC", "").strip().lower() == "default":
        return False
    if not sys.platform.startswith("linux") or any(k in os.environ for k in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:  # a libc whose mallopt is a stub (musl) answers 0
        log.debug("mallopt refused the thresholds; malloc left at its defaults")
    return ok
