"""Keep the device fed: a background thread reads and places the next batches while the step runs."""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

_DONE = object()


def prefetch(batches: Iterable[Any], put: Callable[[Any], Any], depth: int = 2) -> Iterator[Any]:
    """Yield `put(batch)` for each batch, with up to `depth` batches read and transferred ahead.

    Errors in the reader thread are re-raised in the consumer, so a bad file stops training with its
    message instead of hanging it.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for b in batches:
                if stop.is_set():
                    return
                q.put(put(b))
            q.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)
