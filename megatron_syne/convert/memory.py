"""Peak memory of a conversion, split into what the process owns and what is page cache.

``VmHWM`` (peak resident set) counts pages of memory-mapped files the process touched; those
are page cache the kernel drops under pressure, not memory the conversion needs. The monitor
therefore samples ``RssAnon`` (private, unreclaimable) and ``RssFile`` separately, and reports
the peak RSS of the checkpoint-writer subprocesses that megatron-core forks.
"""

from __future__ import annotations

import resource
import threading
from dataclasses import dataclass


def _status_kib() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    values[name] = int(rest.split()[0])
    except OSError:  # not Linux: fall back to getrusage's peak below
        pass
    return values


@dataclass
class MemoryPeak:
    """Peaks in MiB over a monitored region (sampled every ``interval_s``)."""

    rss_mib: float  # VmHWM of this process (includes touched file-backed pages)
    anon_mib: float  # peak RssAnon: private memory this process really holds
    file_mib: float  # peak RssFile: mapped file pages (reclaimable page cache)
    children_rss_mib: float  # peak RSS of the largest finished child (checkpoint writers)

    def summary(self) -> str:
        return (
            f"peak RSS {self.rss_mib:.0f} MiB (anonymous {self.anon_mib:.0f} MiB, file-backed "
            f"{self.file_mib:.0f} MiB); writer subprocess peak RSS {self.children_rss_mib:.0f} MiB"
        )


class PeakMemoryMonitor:
    """Context manager sampling this process's memory in a background thread."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._anon = 0
        self._file = 0
        self._thread: threading.Thread | None = None
        self.peak: MemoryPeak | None = None

    def _sample(self) -> None:
        values = _status_kib()
        self._anon = max(self._anon, values.get("RssAnon", 0))
        self._file = max(self._file, values.get("RssFile", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemoryMonitor:
        # Restart VmHWM so the peak belongs to this region, not to earlier work in the process.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self._sample()
        self._thread = threading.Thread(target=self._run, name="memory-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        values = _status_kib()
        hwm = values.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        self.peak = MemoryPeak(
            rss_mib=hwm / 1024,
            anon_mib=self._anon / 1024,
            file_mib=self._file / 1024,
            children_rss_mib=children / 1024,
        )
