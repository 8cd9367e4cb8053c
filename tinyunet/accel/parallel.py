"""Using every CPU core: split a layer's rows into blocks and run the blocks on a pool of threads.

NumPy runs each call on one core. Only BLAS (the matrix product) uses more, and it splits a product
over the rows and columns of its *output*. That leaves cores idle exactly where a U-Net needs them:

- a convolution's weight gradient is a product with a tiny output (Cin x Cout, 16 x 16 at the top
  level) summed over a huge shared dimension (every pixel of the batch): BLAS gives it one core;
- the additions between a convolution's nine shifted products, and BatchNorm, ReLU, pooling and
  padding, are plain NumPy: one core.

So on NumPy the big layers cut their rows (pixels, or images) into blocks and run the blocks on a
thread pool, each block doing the same work on its own rows (PyTorch's "intra-op parallelism").
Threads help in Python here because NumPy and BLAS release the GIL while they compute. BLAS itself
is told to use one thread per call (via threadpoolctl): two layers of threads on the same cores only
fight, and idle OpenBLAS threads spin on a core another process could use.

The calling thread works too: with T threads it runs every T-th block itself and hands the others
to T - 1 pool threads, one task per thread (a task per block cost ~80-150 us per call, ~270 calls
per training step).

Measured on 2 cores, standard training step (base 16, batch 8, 128x128, benchmarks/train_step.py):
OpenBLAS's own 2 threads 466-482 ms; row blocks of the convolutions on 2 threads with one-thread
BLAS 430-452 ms; with BatchNorm, ReLU, pooling and padding in blocks too, 410-445 ms; with the
calling thread working and one task per thread, 399-413 ms (min of 15 steps; 410-442 before).

Two limits of threads in Python show on these 2 cores. Work that streams memory (BatchNorm, ReLU,
pooling on the 8 MB activations of the top level) does not get faster on the second core: one core
already draws about all of the ~30 GB/s the memory gives. And short calls scale badly: each NumPy
call takes the GIL on its way in and out, and a thread that waits for it sleeps and must be woken
(~10-50 us here); two threads adding 0.25 MB arrays get through 10 GB/s together, one alone 31 GB/s.
So where a layer has two independent jobs made of many calls, ``run_concurrently`` runs them side by
side, one per core (a convolution's weight and input gradients), instead of splitting every call of
one job and then of the other. On 1 core the whole step took 630-690 ms, on 2 cores 410-460 ms
(1.5x; PyTorch 1.8x) before that; side by side, 5-8% less. The thread whose task ends first then
takes unstarted blocks of the other's calls, instead of waiting for it.

The blocks depend only on the number of rows, never on the number of threads, so results are the
same bit for bit on 1 or 64 cores. On CuPy all rows are one block: a GPU kernel is already parallel
inside.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Tuple

from tinyunet import backend

__all__ = ["set_num_threads", "get_num_threads", "row_blocks", "map_row_blocks", "map_batch_blocks",
           "run_concurrently", "copy_images", "matmul", "transposed_matmul"]

# a block's products should be big enough to run near BLAS speed, and there should be several blocks
# per thread so that no thread waits long for the last one
_BLOCK_ROWS = 16384
_MIN_BLOCKS = 4  # split work into a multiple of 4 blocks: keeps 1, 2 and 4 threads all busy
# below this many multiply-adds a call is not split: handing a block to a thread costs ~10-50 us
_MIN_SPLIT_WORK = 2 ** 24
# for elementwise work: one pass over a float costs roughly as much time as this many multiply-adds
# inside a matrix product (it moves memory instead of reusing it from cache)
ELEMENTWISE_WORK = 4

_threads: Optional[int] = None
_pool: Optional[ThreadPoolExecutor] = None
_blas_limited = False
# .threads: how many threads the task running in this thread may use; .helpers: inside run_concurrently,
# the _Helpers its tasks share; .in_block: this thread is running blocks of a map_row_blocks call
_share = threading.local()


def _default_threads() -> int:
    env = os.environ.get("TINYUNET_NUM_THREADS", "").strip()
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_num_threads(threads: int) -> None:
    """Threads for the row blocks (like ``torch.set_num_threads``); default: the usable cores, or
    the environment variable ``TINYUNET_NUM_THREADS``. 1 runs every block in the calling thread."""
    global _threads, _pool
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if _pool is not None:
        _pool.shutdown()
    _threads, _pool = threads, None


def get_num_threads() -> int:
    global _threads
    if _threads is None:
        _threads = _default_threads()
    return _threads


def row_blocks(length: int, row_work: int = 1) -> List[Tuple[int, int]]:
    """Split rows [0, length) into contiguous (start, stop) blocks: one block if the call is small
    (length * row_work multiply-adds < 2**24), else a multiple of 4 blocks of <= 16384 rows each, as
    equal as possible. Depends on the sizes only, never on the number of threads."""
    if length * row_work < _MIN_SPLIT_WORK:
        return [(0, length)]
    parts = min(length, _MIN_BLOCKS * -(-length // (_MIN_BLOCKS * _BLOCK_ROWS)))
    bounds = [length * k // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _limit_blas_threads() -> None:
    """Once, at the first layer call on NumPy: one BLAS thread per call, since our threads do the
    splitting (and OpenBLAS's idle threads would spin on cores other processes need)."""
    global _blas_limited
    if not _blas_limited:
        _blas_limited = True
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=1, user_api="blas")


def _get_pool() -> ThreadPoolExecutor:
    """The pool of get_num_threads() - 1 threads: the calling thread is one of the workers."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(get_num_threads() - 1, thread_name_prefix="tinyunet")
    return _pool


def _threads_here() -> int:
    """Threads a call from this thread may use: a task's share inside run_concurrently, else all;
    1 inside a block. A block that splits its own rows again runs them itself: the pool threads may
    all be running this call's other blocks, and waiting for them would wait forever."""
    if getattr(_share, "in_block", False):
        return 1
    return getattr(_share, "threads", None) or get_num_threads()


class _RunningBlocks:
    """``with _RunningBlocks():`` around running blocks in this thread: calls made from inside them
    run in this thread too (_threads_here). A class, not @contextmanager: it wraps every small call."""
    __slots__ = ("before",)

    def __enter__(self) -> None:
        self.before, _share.in_block = getattr(_share, "in_block", False), True

    def __exit__(self, *exc: Any) -> None:
        _share.in_block = self.before


def _run_here_and_on_pool(here: Callable[[], Any], others: List[Any]) -> Any:
    """here() in the calling thread while the submitted tasks ``others`` run on the pool; returns
    here()'s result. Even if one fails, all finish before this returns (their arrays must not be let
    go under them); then the first error is raised."""
    try:
        result = here()
    finally:
        errors = [task.exception() for task in others]  # waits for each task
    for error in errors:
        if error is not None:
            raise error
    return result


class _Blocks:
    """The blocks of one map_row_blocks call, claimed one at a time by whichever thread is free: the
    call's own threads, and in run_concurrently the threads whose task is already done."""

    def __init__(self, fn: Callable[[int, int], Any], blocks: List[Tuple[int, int]]) -> None:
        self.fn, self.blocks = fn, blocks
        self.results: List[Any] = [None] * len(blocks)
        self.claimed = self.running = 0
        self.error: Optional[BaseException] = None
        self.changed = threading.Condition()

    def unclaimed(self) -> bool:
        return self.claimed < len(self.blocks)

    def work(self) -> None:
        """Run unclaimed blocks until there are none; an error is kept for the caller of wait()."""
        with _RunningBlocks():
            self._work()

    def _work(self) -> None:
        while True:
            with self.changed:
                if not self.unclaimed():
                    return
                k, self.claimed, self.running = self.claimed, self.claimed + 1, self.running + 1
            try:
                self.results[k] = self.fn(*self.blocks[k])
            except BaseException as error:  # noqa: B902 - re-raised by wait() in the calling thread
                with self.changed:
                    self.error = self.error or error
                    self.claimed = len(self.blocks)   # the rest is not started
            finally:
                with self.changed:
                    self.running -= 1
                    self.changed.notify_all()

    def wait(self) -> List[Any]:
        """The results, once every claimed block is done (some may run on a helping thread)."""
        with self.changed:
            while self.running or self.unclaimed():
                self.changed.wait()
        if self.error is not None:
            raise self.error
        return self.results


class _Helpers:
    """run_concurrently's tasks and their open map_row_blocks calls: a thread whose task is done
    takes blocks of the others' calls until every task is done."""

    def __init__(self, tasks: int) -> None:
        self.calls: List[_Blocks] = []
        self.pending = tasks
        self.changed = threading.Condition()

    def open(self, call: _Blocks) -> None:
        with self.changed:
            self.calls.append(call)
            self.changed.notify_all()

    def close(self, call: _Blocks) -> None:
        with self.changed:
            self.calls.remove(call)

    def task_done(self) -> None:
        with self.changed:
            self.pending -= 1
            self.changed.notify_all()

    def _unstarted_call(self) -> Optional[_Blocks]:
        return next((c for c in self.calls if c.unclaimed()), None)

    def help(self) -> None:
        while True:
            with self.changed:
                while self._unstarted_call() is None and self.pending:
                    self.changed.wait()
                call = self._unstarted_call()
                if call is None:
                    return
            call.work()


def map_row_blocks(fn: Callable[[int, int], Any], length: int, row_work: int = 1,
                   helped: bool = True) -> List[Any]:
    """[fn(start, stop) for each block of row_blocks(length, row_work)], in parallel on NumPy.

    ``row_work``: multiply-adds per row (e.g. K * N for a product (M, K) @ (K, N)), to leave small
    calls whole.
    ``fn`` must only write rows [start, stop) of shared outputs (or return its own partial result),
    so that blocks never touch the same memory. If fn splits its rows again (map_row_blocks,
    run_concurrently), that inner call runs in fn's thread.
    ``helped=False``: inside run_concurrently, only this task's own threads run the blocks - for
    blocks with big temporaries of their own, where a helping thread would mean two blocks' worth
    of them at once.
    """
    if backend.name() != "numpy":  # CuPy: one block, the GPU parallelises inside each kernel
        return [fn(0, length)]
    _limit_blas_threads()  # also with 1 thread: then the user asked for one core
    blocks = row_blocks(length, row_work)
    threads = min(_threads_here(), len(blocks))
    helpers = getattr(_share, "helpers", None) if len(blocks) > 1 and helped else None
    if getattr(_share, "in_block", False) or (threads == 1 and helpers is None):  # all in this thread
        with _RunningBlocks():
            return [fn(start, stop) for start, stop in blocks]
    if helpers is not None:  # inside run_concurrently: threads whose task is done may take blocks too
        return _map_with_helpers(fn, blocks, threads, helpers)
    pool = _get_pool()
    results: List[Any] = [None] * len(blocks)

    def run(first: int) -> None:  # blocks first, first + threads, ...: one task per thread, not per block
        with _RunningBlocks():
            for k in range(first, len(blocks), threads):
                results[k] = fn(*blocks[k])
    _run_here_and_on_pool(lambda: run(0), [pool.submit(run, first) for first in range(1, threads)])
    return results


def _map_with_helpers(fn: Callable[[int, int], Any], blocks: List[Tuple[int, int]], threads: int,
                      helpers: _Helpers) -> List[Any]:
    """map_row_blocks inside run_concurrently: the blocks go to whichever thread is free first."""
    call = _Blocks(fn, blocks)
    helpers.open(call)
    try:
        _run_here_and_on_pool(call.work, [_get_pool().submit(call.work) for _ in range(threads - 1)])
        return call.wait()
    finally:
        helpers.close(call)


def run_concurrently(*tasks: Callable[[], Any]) -> List[Any]:
    """[task() for task in tasks], the tasks at the same time on their share of the threads.

    For independent pieces of work that each run below two cores' speed when split alone, e.g. a
    convolution's weight gradient and input gradient: each is a string of short calls, and two
    threads splitting every call wait for each other at every call (Python's GIL, waking a thread).
    Side by side, each task runs its own calls with ``threads // len(tasks)`` threads (one each on
    two cores) and they meet once. A thread whose task is done does not wait idle: it takes blocks
    of the other tasks' map_row_blocks calls, claimed one at a time. The two tasks are seldom equal:
    the decoder's 32 -> 16 convolution at 128x128 spends ~1.6x as long on its weight gradient as on
    its input gradient; its backward took 43.6 ms without this, 34.0 ms with it (2 cores, Zen 4;
    15.1 -> 12.5 ms for 16 -> 16 on an Intel Xeon). Each block's result goes to its own place, so
    which thread ran it changes nothing. Tasks must not write the same memory.
    """
    share = _threads_here() // len(tasks)
    if backend.name() != "numpy" or share < 1 or len(tasks) == 1:
        return [task() for task in tasks]
    _limit_blas_threads()
    pool = _get_pool()
    helpers = _Helpers(len(tasks))

    def shared(task: Callable[[], Any]) -> Any:
        before = getattr(_share, "threads", None), getattr(_share, "helpers", None)
        _share.threads, _share.helpers = share, helpers
        try:
            return task()
        finally:
            helpers.task_done()
            helpers.help()
            _share.threads, _share.helpers = before
    others = [pool.submit(shared, task) for task in tasks[1:]]
    first = _run_here_and_on_pool(lambda: shared(tasks[0]), others)
    return [first] + [task.result() for task in others]


def map_batch_blocks(fn: Callable[[int, int], Any], x: Any, passes: int = 1) -> List[Any]:
    """map_row_blocks over the images of a batch x (N, ...): fn(start, stop) handles x[start:stop].
    ``passes``: about how many times fn reads or writes each number (to leave small calls whole)."""
    return map_row_blocks(fn, x.shape[0], passes * ELEMENTWISE_WORK * (x.size // max(x.shape[0], 1)))


def copy_images(dst: Any, src: Any) -> None:
    """dst[...] = src for arrays of the same shape (N, ...), blocks of images in parallel."""
    def images(start: int, stop: int) -> None:
        dst[start:stop] = src[start:stop]
    map_batch_blocks(images, dst, passes=2)


def matmul(a: Any, b: Any) -> Any:
    """a @ b with a's rows split into blocks. a: (M, K), b: (K, N) -> (M, N)."""
    out = backend.xp.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    map_row_blocks(lambda start, stop: backend.xp.matmul(a[start:stop], b, out=out[start:stop]), a.shape[0],
                   a.shape[1] * b.shape[1])
    return out


def transposed_matmul(a: Any, b: Any, partial_sums: Optional[bool] = None) -> Any:
    """a.T @ b, a sum over the shared rows M. a: (M, K), b: (M, N) -> (K, N).

    A tall a (M >= K, e.g. a weight gradient summed over many pixels): one partial sum per block of
    rows, then added. A wide one (e.g. an 8x8 image's im2row matrix: 64 rows per image, K = 2304):
    blocks of a's columns, each writing its own rows of the result, since partial sums there would be
    several result-sized arrays (at batch 1, 4 x 2.4 MB: once the step's memory peak).
    ``partial_sums`` True or False picks one of the two whatever the shape.
    """
    m, k = a.shape
    work = m * b.shape[1]  # multiply-adds per column of a (per row of the result)
    if partial_sums if partial_sums is not None else m >= k:
        return sum(map_row_blocks(lambda start, stop: backend.xp.matmul(a[start:stop].T, b[start:stop]), m,
                                  k * b.shape[1]))
    out = backend.xp.empty((k, b.shape[1]), dtype=a.dtype)
    map_row_blocks(lambda start, stop: backend.xp.matmul(a[:, start:stop].T, b, out=out[start:stop]), k, work)
    return out
