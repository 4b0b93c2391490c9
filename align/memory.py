"""Host memory: keep freed tensor memory for reuse, and report a run's peak.

Training on the CPU allocates and frees the same large tensors (activations, logits, gradients)
every step. glibc's malloc hands blocks over its mmap threshold back to the kernel on free and
trims the heap top, so each step faults the same memory in again, page by page, and the kernel
zeroes every page. On the 2-core VM align is benchmarked on that cost 25 s of system time in a
60 s PPO run. With mmap off and trimming off, freed blocks stay in the heap and the next step
reuses them; the peak stays the same (the heap never holds more than was live at once, plus
fragmentation). PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or
tcmalloc; this needs nothing installed.

Set once per process, when a stage starts. ALIGN_KEEP_FREED_MEMORY=0 leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_NEVER_TRIM = 2**31 - 1  # an int: glibc's mallopt takes one


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (no mmap'd blocks, no trimming).

    Returns whether it took effect: only on Linux with glibc, only when no GPU is visible (GPU
    tensors live in torch's caching allocator; the host heap is then left alone), and not when
    ALIGN_KEEP_FREED_MEMORY=0.
    """
    import torch

    if os.environ.get("ALIGN_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if torch.cuda.is_available():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    except (OSError, AttributeError):  # not glibc (musl, say): nothing to tune
        return False


def peak_memory_mb() -> float:
    """Peak accelerator memory allocated by torch, or the process's peak resident memory on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
