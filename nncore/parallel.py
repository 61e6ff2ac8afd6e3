"""Data parallelism over threads: a minibatch split into row chunks that run the per-sample layers at once.

NumPy releases the GIL in its array loops and BLAS calls, so the chunks of one minibatch run on several cores.
This covers what BLAS's own threads cannot: the im2col copies, input-gradient adds, pooling, activations and
the parameter-gradient sums of a ConvNet run on every core, where a threaded GEMM leaves them on one. A
minibatch is split only when each chunk carries enough convolution work (MIN_MACS multiply-adds in conv
blocks, MIN_ROWS rows): below that the hand-off costs more than it saves, and an MLP (all GEMM, no copies
around it) trains faster on BLAS's own threads (benchmarks/RESULTS.md, "nncore ConvNets beside PyTorch").
While chunks run, BLAS must use one thread (several threaded GEMMs at once fight over the cores):
``set_threads`` takes the caller's way to hold it there (nncore imports only NumPy, so it cannot set BLAS
threads itself). One thread (the default) runs everything in the calling thread, exactly as without this
module.
"""
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
import threading

MIN_ROWS = 8  # a chunk smaller than this is not worth a thread hand-off
MIN_MACS = 50_000_000  # nor one with fewer multiply-adds in its conv blocks (~1 ms of a core)
_lock = threading.Lock()
_state = {"threads": 1, "pool": None, "single_blas": nullcontext}


def set_threads(threads, single_blas=None):
    """Split each minibatch's per-sample layers over ``threads`` threads (1: all in the calling thread).

    ``single_blas``: a callable returning a context manager that holds BLAS to one thread while the chunks run,
    e.g. ``functools.partial(threadpoolctl.ThreadpoolController().limit, limits=1, user_api="blas")``; without
    it the caller keeps BLAS at one thread.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected an integer >= 1, got {threads!r}")
    with _lock:
        if threads != _state["threads"] and _state["pool"] is not None:
            _state["pool"].shutdown(wait=True)
            _state["pool"] = None
        _state["threads"] = threads
        _state["single_blas"] = single_blas or nullcontext


def chunks(rows, macs_per_row):
    """Row slices splitting ``rows`` rows (``macs_per_row`` conv multiply-adds each) into one chunk per thread,
    each of at least MIN_ROWS rows and MIN_MACS multiply-adds (fewer chunks for less work); one slice with one
    thread."""
    parts = max(1, min(_state["threads"], rows // MIN_ROWS, rows * macs_per_row // MIN_MACS))
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def run(fn, items):
    """[fn(item) for item in items], the items on the pool's threads (the last in the calling thread)."""
    if len(items) == 1:
        return [fn(items[0])]
    with _lock:
        if _state["pool"] is None:
            _state["pool"] = ThreadPoolExecutor(_state["threads"] - 1, thread_name_prefix="nncore")
        pool = _state["pool"]
    with _state["single_blas"]():
        futures = [pool.submit(fn, item) for item in items[:-1]]
        try:
            last = fn(items[-1])
        finally:
            done = [f.result() for f in futures]
    return done + [last]
