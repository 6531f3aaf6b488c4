"""Timing and memory helpers shared by the benchmark suites."""

from __future__ import annotations

import os
import statistics
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every `interval` seconds by a thread
    while the block runs: the working memory one framework's step adds on top of what is already
    resident (weights, the other framework, the compiled program)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False

    @property
    def extra_gib(self) -> float:
        return (self.peak - self.base) / 2**30


def timed(fn) -> float:
    """Seconds one call of `fn()` takes (fn must block until its work is done)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs) -> float:
    return float(statistics.median(xs))


def interleaved(fns: dict, *, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved round by round (a, b, a, b, ...) so
    that a slow phase of the machine hits every contestant alike. `warmup` rounds are run first and
    dropped."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times
