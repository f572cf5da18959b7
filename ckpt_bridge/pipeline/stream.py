"""The tensor stream between a reader and a writer.

Reading a tensor (``pread`` + cast) and writing the previous one (``write``)
both spend their time in syscalls and torch kernels that release the GIL, so
one background thread reading one tensor ahead lets the two overlap on a
2-core machine.  The look-ahead is a single tensor: peak memory is the tensor
being written plus the one being read.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
K = TypeVar("K")

_DONE = object()


def read_ahead(keys: list[K], read: Callable[[K], T], depth: int = 1) -> Iterator[tuple[K, T]]:
    """Yield ``(key, read(key))`` in order, reading up to ``depth`` tensors ahead in a thread.

    An exception in ``read`` is re-raised in the consumer at that key; closing
    the generator early stops the reader thread.
    """
    return run_ahead(lambda: ((k, read(k)) for k in keys), depth)


def run_ahead(produce: Callable[[], Iterator[T]], depth: int = 1) -> Iterator[T]:
    """Yield the items of ``produce()``, computed in a thread up to ``depth`` items ahead of the consumer.

    With ``depth`` 1, while the consumer holds item i, the queue holds i+1 and
    the thread computes i+2: a producer that recycles buffers needs three.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    main = threading.main_thread()

    def stopped() -> bool:
        # A consumer that failed mid-loop (disk full in the writer) keeps this generator alive through the
        # exception's traceback, so its finally may never run.  The worker then notices the interpreter
        # shutting down (the main thread is no longer alive) and returns: interpreter exit must not kill it
        # inside torch's C++ code ("terminate called without an active exception", SIGABRT).
        return stop.is_set() or not main.is_alive()

    def offer(item: object) -> None:
        while not stopped():  # never block for good: the consumer may be gone
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def worker() -> None:
        try:
            for item in produce():
                if stopped():
                    return
                offer(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            offer(e)
            return
        offer(_DONE)

    # not a daemon: at exit the interpreter waits for it (at most one read) instead of killing it mid-read
    t = threading.Thread(target=worker, name="ckpt-bridge-read-ahead", daemon=False)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
    finally:
        stop.set()
        while t.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        t.join()
