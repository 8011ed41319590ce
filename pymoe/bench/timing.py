"""Repeated wall-clock timing with warm-up, and the statistics a result file keeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 1000,
    min_seconds: float = 1.0,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds per call of `fn`: `warmup` untimed calls, then at least
    `min_reps` timed ones, continuing until `min_seconds` have been spent or
    `max_reps` reached (the cap is high so that sub-millisecond calls are
    timed over the whole min_seconds window, not over a few milliseconds of
    it). `sync` (e.g. torch.cuda.synchronize) runs before each clock read so
    that asynchronous devices are timed to completion."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    while len(times) < min_reps or (sum(times) < min_seconds and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def device_sync(device: str) -> Callable[[], None] | None:
    """What `measure` must call to time `device` to completion (None on CPU)."""
    if device == "gpu":
        import torch
        from max.driver import Accelerator

        accelerator = Accelerator()

        def sync() -> None:
            # MAX and PyTorch each launch on their own stream: wait for both.
            accelerator.synchronize()
            torch.cuda.synchronize()

        return sync
    return None


def summarize(times: list[float]) -> dict:
    """Median and spread (quartiles, min, max) of raw timings, kept with them."""
    t = np.asarray(times)
    q25, median, q75 = np.percentile(t, [25, 50, 75])
    return {
        "times_s": [float(v) for v in t],
        "median_s": float(median),
        "q25_s": float(q25),
        "q75_s": float(q75),
        "min_s": float(t.min()),
        "max_s": float(t.max()),
        "reps": len(t),
    }


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_during(fn: Callable[[], object]) -> float | None:
    """MiB by which the process's peak resident memory rose above its
    resident memory before one call of `fn` (Linux: resets the high-water
    mark through /proc/self/clear_refs); None where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 1024
