"""The CPU thread pool of the codecs: chunks or calls spread over a few Python threads.

Torch ops and ctypes calls release the GIL, so Python threads run them in parallel. Two
entry points: :func:`run_chunks` (torch work on chunks, inside :func:`cpu_threads`, which
holds torch to one thread so that the pool's threads do not compete with its own) and
:func:`run_calls` (calls that run no torch op: C code, zlib).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch

_SCOPE = threading.local()
_THREADS_LOCK = threading.Lock()


@contextmanager
def cpu_threads() -> Iterator[None]:
    """Torch on one thread inside; chunks then run on as many Python threads as torch had.

    Only the main thread changes torch's setting (it is process-wide); elsewhere chunks
    run one after another.
    """
    if getattr(_SCOPE, "workers", None) is not None:
        yield
        return
    threads = torch.get_num_threads()
    main = threading.current_thread() is threading.main_thread()
    _SCOPE.workers = min(threads, 8) if main else 1
    try:
        if main and threads > 1:
            with _THREADS_LOCK:
                torch.set_num_threads(1)
                try:
                    yield
                finally:
                    torch.set_num_threads(threads)
        else:
            yield
    finally:
        _SCOPE.workers = None


class ForkSafePool:
    """A thread pool made on first use, and made anew in a forked child.

    A forked child inherits an executor but not its threads, and the executor counts the
    dead threads as its own: work sent to it would wait forever on threads that never run.
    """

    def __init__(self, workers: Callable[[], int], name: str):
        self._workers, self._name = workers, name
        self._executor: ThreadPoolExecutor | None = None
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._executor = None

    @property
    def started(self) -> bool:
        """Whether this process has made the pool's executor."""
        return self._executor is not None

    def get(self) -> ThreadPoolExecutor:
        """The executor of this process (made on first call)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers(), thread_name_prefix=self._name)
        return self._executor


_POOL = ForkSafePool(lambda: 8, "diffq-cpu")


def _pool() -> ThreadPoolExecutor:
    return _POOL.get()


def _libc_sched_getcpu() -> Callable[[], int] | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    return fn


_GETCPU = _libc_sched_getcpu()


def _away_from_caller() -> Callable[[], None]:
    """What a pool thread runs first: leave the CPU the calling thread is running on.

    Linux wakes a thread on its waker's CPU when it deems that CPU cache-hot, and moves it
    only a few milliseconds later: a pool thread woken for a millisecond of work then
    shares one CPU with the caller and the other CPU idles (measured: 2 threads as slow
    as 1 on this host). A pool thread restricted to the caller's other allowed CPUs starts
    where it can run at once; the restriction is reset at every call, so it follows the
    caller.
    """
    if _GETCPU is None:
        return lambda: None
    allowed = os.sched_getaffinity(0)
    others = allowed - {_GETCPU()}
    if not others or others == allowed:
        return lambda: None

    def leave() -> None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, others)

    return leave


def run_chunks(n: int, chunk: int, work: Callable[[list[int]], None]) -> None:
    """Call ``work`` on the chunk starts of ``range(0, n, chunk)``, split across threads."""
    starts = list(range(0, n, chunk))
    workers = min(getattr(_SCOPE, "workers", None) or 1, len(starts))
    if workers <= 1:
        work(starts)
        return
    leave = _away_from_caller()

    def job(part: list[int]) -> None:
        leave()
        work(part)

    jobs = [_pool().submit(job, starts[i::workers]) for i in range(1, workers)]
    try:
        work(starts[0::workers])
    finally:
        _settle(jobs)


def call_workers() -> int:
    """Threads for calls that run no torch op (C code, zlib): the scope's, else torch's.

    Such calls need not move torch to one thread, so any thread may run them in parallel.
    """
    return getattr(_SCOPE, "workers", None) or min(torch.get_num_threads(), 8)


def run_calls(calls: list[tuple[Callable, tuple]], workers: int | None = None) -> list:
    """Run ``fn(*args)`` for each call on up to ``workers`` threads (default: the scope's).

    Workers take the next call as they finish one, so uneven calls still end together;
    the calling thread is one of them. Returns the results in order.
    """
    results: list = [None] * len(calls)
    if workers is None:
        workers = getattr(_SCOPE, "workers", None) or 1
    workers = min(workers, len(calls))
    pending = iter(enumerate(calls))
    lock = threading.Lock()
    failed = threading.Event()

    def drain() -> None:
        while not failed.is_set():
            with lock:
                item = next(pending, None)
            if item is None:
                return
            i, (fn, args) = item
            try:
                results[i] = fn(*args)
            except BaseException:
                failed.set()  # the other workers take no new call
                raise

    if workers <= 1:
        drain()
        return results
    leave = _away_from_caller()

    def pool_drain() -> None:
        leave()
        drain()

    jobs = [_pool().submit(pool_drain) for _ in range(workers - 1)]
    try:
        drain()
    finally:
        # A job still queued has nothing left to do: cancelling it means a caller that is
        # itself a pool thread never waits on a pool with no free thread.
        _settle([job for job in jobs if not job.cancel()])
    return results


def _settle(jobs: list[Future]) -> None:
    """Wait for every job, then raise the first one's error, if any.

    Every job is waited for even when one failed: a job still running may be writing into
    memory (a C call into the caller's buffer) that the caller frees once we return.
    """
    wait(jobs)
    for job in jobs:
        job.result()
