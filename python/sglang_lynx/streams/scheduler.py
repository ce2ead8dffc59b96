"""Transfer scheduling: one paced link, and a sender that always puts Anchors first.

Every write a prefill worker makes goes through one :class:`Pacer` (the emulated link) and,
in the quantized modes, through one :class:`StreamScheduler` thread. Jobs are small and
bounded: an Anchor job writes one chunk's first stream, a Residual job writes a bounded run
of pages. Between jobs the scheduler takes the most urgent one, so a new request's Anchor
waits for at most one Residual job, never for an earlier request's whole Residual; with a
Residual in stages (``--lynx-stages 4,2,2``), every request's middle stage goes before any
request's last.
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
RESIDUAL = 1  # then the low bits, in bounded jobs: the Residual's i-th stage (from 0) at priority RESIDUAL + i


class Pacer:
    """A token bucket that holds each write until its bytes would have crossed the link.

    ``mbps=None`` means an unpaced link. Writes are serialised like bytes on one wire: a write
    of n bytes that starts when the link is free lands n * 8 / rate seconds later. A new rate
    applies at once, to the bytes still on the wire too, as when a real link speeds up or slows down.
    """

    def __init__(self, mbps: Optional[float]):
        self._cv = threading.Condition()
        self._written = 0.0  # bytes handed to the wire so far; it carries them in order
        self._carried = 0.0  # of those, the bytes it had carried at self._at
        self._at = time.monotonic()
        self.bytes_per_s: Optional[float] = None
        self.set_rate(mbps)

    def set_rate(self, mbps: Optional[float]) -> None:
        with self._cv:
            self._advance()
            self.bytes_per_s = None if mbps is None else mbps * 1e6 / 8
            self._cv.notify_all()

    def pace(self, nbytes: int) -> None:
        with self._cv:
            if nbytes <= 0 or self.bytes_per_s is None:
                return
            self._advance()
            self._written += nbytes
            last_byte = self._written
            while self._carried < last_byte:
                self._cv.wait((last_byte - self._carried) / self.bytes_per_s)
                self._advance()

    def _advance(self) -> None:
        """Bring the wire up to now (the lock held). An idle wire saves no time for later writes."""
        now = time.monotonic()
        if self.bytes_per_s is None:
            self._carried = self._written
        else:
            self._carried = min(self._written, self._carried + (now - self._at) * self.bytes_per_s)
        self._at = now


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
