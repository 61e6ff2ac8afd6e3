"""A worker's CPU settings: BLAS threads, nncore's data-parallel threads, and the C allocator's free policy."""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import partial

from threadpoolctl import ThreadpoolController

from nncore import parallel

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_FREED = 1 << 30  # bytes of freed heap glibc may keep instead of returning them to the OS
MMAP_ABOVE = 32 << 20  # allocations from this size on get their own mapping (glibc's largest dynamic threshold)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse. By default it hands large freed blocks back to the OS and every
    training step maps them in again: on the 2-D ConvNet of benchmarks/nncore_throughput.py that is ~3,000 page
    faults and 10 ms of system time in a 66 ms step. A worker's memory then stays at its peak, as with PyTorch's
    caching allocator. False where the C library has no mallopt (musl, macOS): nothing changes there."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE))


def use_threads(threads: int) -> None:
    """Train on ``threads`` cores: BLAS gets that many threads, and nncore splits minibatches with enough work
    over as many threads (holding BLAS to one thread while the chunks run); freed memory is kept for reuse."""
    controller = ThreadpoolController()
    controller.limit(limits=threads, user_api="blas")
    parallel.set_threads(threads, single_blas=partial(controller.limit, limits=1, user_api="blas"))
    keep_freed_memory()
