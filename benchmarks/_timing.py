"""Timing and memory helpers shared by the benchmarks (median of repeats after warm-up)."""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn`` in seconds, synchronizing CUDA after it."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int = 7,
    warmup: int = 2,
    budget_s: float = 3.0,
) -> float:
    """Median wall time of ``fn()`` in milliseconds (synchronizing CUDA around each call).

    Runs ``warmup`` untimed calls, then up to ``repeats`` timed ones, stopping early once
    ``budget_s`` seconds have been spent (at least 3 timed calls).
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (len(times) < 3 or spent < budget_s):
        times.append(_timed_call(fn, device))
        spent += times[-1]
    return 1e3 * statistics.median(times)


def time_interleaved(
    fns: list[Callable[[], object]],
    device: torch.device,
    repeats: int = 7,
    warmup: int = 2,
    budget_s: float = 3.0,
    max_repeats: int = 200,
) -> list[float]:
    """Median wall times (ms) of several functions timed in alternation, round by round.

    Interleaving puts every function under the same machine conditions (a background job,
    frequency changes), so their ratio is steadier than from back-to-back blocks. Runs at
    least ``repeats`` rounds and keeps going while under ``budget_s`` seconds, up to
    ``max_repeats`` rounds, so fast configurations get many samples.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    while len(times[0]) < max_repeats and (len(times[0]) < repeats or spent < budget_s):
        for fn, ts in zip(fns, times, strict=True):
            ts.append(_timed_call(fn, device))
            spent += ts[-1]
    return [1e3 * statistics.median(ts) for ts in times]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of ``fn`` in MiB above the level before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process RSS, sampled every 0.2 ms by
    a thread, after returning freed heap memory to the OS (``malloc_trim``).
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _release_memory()
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(2e-4)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss())
    return (peak[0] - before) / 2**20


def fit_linear_r2(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares line y = a + b x; returns (a, b, R²)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1 - ss_res / ss_tot if ss_tot > 0 else 1.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
