"""Memory figures for the scheduler and progress display; /proc where it exists, portable fallbacks elsewhere."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def available_memory_bytes() -> int:
    """MemAvailable on Linux; total RAM elsewhere (macOS has no cheap equivalent)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def process_rss_bytes(pid: int) -> int | None:
    """Current resident set of another process, or None where /proc is absent or the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def own_peak_rss_bytes() -> int:
    """Peak resident set of this process; ru_maxrss is KiB on Linux but bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
