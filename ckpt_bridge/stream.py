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
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        try:
            for k in keys:
                if stop.is_set():
                    return
                item = (k, read(k))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                del item
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
            return
        q.put(_DONE)

    t = threading.Thread(target=worker, name="ckpt-bridge-read-ahead", daemon=True)
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
