"""Per-request transfer timings: logged at debug level, and appended as JSON lines to
``--lynx-timings-file`` (one file may be shared by prefill and decode: lines are tagged with
the role and written whole) for benchmarks and tests to read.

Wall-clock times (``time.time()``) so that client and servers on one machine compare directly.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Optional

logger = logging.getLogger(__name__)


class Timings:
    def __init__(self, path: Optional[str], role: str):
        self.path, self.role = path, role
        self._records: dict[int, dict] = {}
        self._lock = threading.Lock()

    def add(self, room: int, **fields) -> None:
        """Record fields for a request; numeric byte counts and durations accumulate."""
        with self._lock:
            record = self._records.setdefault(room, {"role": self.role, "room": room})
            for key, value in fields.items():
                if key.endswith(("_bytes", "_s")) and key in record:
                    record[key] += value
                else:
                    record[key] = value

    def close(self, room: int, **fields) -> None:
        """Flush a request's record if it is still open (a request that ended early)."""
        with self._lock:
            open_ = room in self._records
        if open_:
            self.flush(room, **fields)

    def flush(self, room: int, **fields) -> dict:
        """Finish a request's record: log it and append it to the timings file."""
        self.add(room, **fields)
        with self._lock:
            record = self._records.pop(room)
        logger.debug("lynx timings %s", record)
        if self.path:
            line = (json.dumps(record) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one write of one line: safe to share between processes
            finally:
                os.close(fd)
        return record
