"""Peak memory of a stretch of work: resident set size (sampled) and device memory."""

from __future__ import annotations

import os
import resource
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux /proc), or None where it cannot be read."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.rss_mb`` / ``peak.device_mb``.

    RSS is sampled every ``interval`` seconds by a thread (the process-wide ``ru_maxrss`` is
    a high-water mark since start and cannot be reset, so it is only the fallback). Device
    memory is CUDA's own peak counter, reset on entry.
    """

    interval: float = 0.02
    rss_mb: float = 0.0
    device_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        self._stop = threading.Event()
        self._peak = current_rss_bytes() or 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss_bytes()
            if rss is not None:
                self._peak = max(self._peak, rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        rss = current_rss_bytes()
        if rss is None and self._peak == 0:  # no /proc: the process high-water mark (KiB on Linux)
            self._peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.rss_mb = max(self._peak, rss or 0) / 2**20
        if torch.cuda.is_available():
            self.device_mb = torch.cuda.max_memory_allocated() / 2**20
