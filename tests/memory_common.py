"""Memory measurements shared by the tests that check nothing is kept per call or wrapper."""

from __future__ import annotations

import gc
import os
import tracemalloc
from collections.abc import Callable


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def traced_growth(work: Callable[[], None]) -> int:
    """Bytes that Python allocations grew by over `work()`, after a full collection."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        work()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))
