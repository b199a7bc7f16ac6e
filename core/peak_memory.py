"""Peak resident memory of one piece of work, sampled while it runs.

`ru_maxrss` is the process's lifetime peak: in the long-lived dashboard every run would
inherit the largest earlier run. A sampler thread (psutil) measures the run itself; a
peak shorter than the interval can be missed, so the interval is short.
"""

from __future__ import annotations

import threading
from types import TracebackType

import psutil

_PROCESS = psutil.Process()


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    return _PROCESS.memory_info().rss / 2**20


class PeakMemory:
    """`with PeakMemory() as mem: ...` then mem.peak_mb (the largest RSS seen) and mem.start_mb."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
