"""Transfer scheduling: one paced link, and a sender that always puts Anchors first.

Every write a prefill worker makes goes through one :class:`Pacer` (the emulated link) and,
in the quantized modes, through one :class:`StreamScheduler` thread. Jobs are small and
bounded: an Anchor job writes one chunk's first stream, a Residual job writes a bounded run
of pages. Between jobs the scheduler takes the most urgent one, so a new request's Anchor
waits for at most one Residual job, never for an earlier request's whole Residual.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)

ANCHOR = 0  # first stream: Anchor planes + scales (all of it in int8 mode), then the first token
RESIDUAL = 1  # second stream: the low bits, in bounded jobs


class Pacer:
    """A token bucket that holds each write until its bytes would have crossed the link.

    ``mbps=None`` means an unpaced link. Writes are serialised like bytes on one wire: a write
    of n bytes that starts when the link is free lands n * 8 / rate seconds later.
    """

    def __init__(self, mbps: Optional[float]):
        self._free_at = 0.0
        self._lock = threading.Lock()
        self.set_rate(mbps)

    def set_rate(self, mbps: Optional[float]) -> None:
        """From the next write on; a write already on the wire lands as it was paced."""
        with self._lock:
            self.bytes_per_s = None if mbps is None else mbps * 1e6 / 8

    def pace(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            if self.bytes_per_s is None:
                return
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + nbytes / self.bytes_per_s
            lands_at = self._free_at
        delay = lands_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class StreamScheduler:
    """A single sender thread running jobs by (priority, arrival)."""

    def __init__(self, name: str = "lynx-streams"):
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, job: Callable[[], None]) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the stream scheduler is closed")
            heapq.heappush(self._heap, (priority, next(self._seq), job))
            self._cv.notify()

    def pending(self, priority: int) -> int:
        with self._cv:
            return sum(1 for p, _, _ in self._heap if p == priority)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                _, _, job = heapq.heappop(self._heap)
            try:
                job()
            except Exception:  # a job reports its own failure to its request; keep serving others
                logger.exception("Lynx transfer job failed")
