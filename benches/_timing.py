"""The timing harness the benchmark scripts share (script mode; pytest-benchmark has its own).

Per-call times are averaged over a block of calls ending in `block_until_ready`, so
asynchronous dispatch cannot hide work; contenders run in interleaved rounds so that the
machine's noise falls on all of them alike; the median of the rounds is reported.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator

import jax

import filterjax._backend as fj_backend


def per_call_us(
    call: Callable[[], object], calls: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    start = clock()
    for _ in range(calls):
        out = call()
    jax.block_until_ready(out)
    return (clock() - start) / calls * 1e6


def measure(
    contenders: dict[str, Callable[[], object]],
    calls: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median per-call µs of each contender, their rounds interleaved to share the noise.

    `clock` is wall time by default; `time.thread_time` measures the calling thread's CPU
    time instead (the dispatch overhead, which other processes do not inflate)."""
    samples = measure_rounds(contenders, calls, repeats, clock)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_rounds(
    contenders: dict[str, Callable[[], object]],
    calls: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Per-call µs of each contender in each of `repeats` interleaved rounds."""
    for call in contenders.values():
        jax.block_until_ready(call())  # compile
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, call in contenders.items():
            samples[name].append(per_call_us(call, calls, clock))
    return samples


def median_ratio(ours: list[float], base: list[float]) -> float:
    """Median of the per-round ratios `ours / base`: each round's pair ran back to back, so
    this is steadier on a noisy machine than a ratio of medians."""
    return statistics.median(o / b for o, b in zip(ours, base, strict=True))


def each_backend() -> Iterator[str]:
    """Switch to each core in turn (skipping one that is not built) and name it."""
    for backend in ("native", "python"):
        try:
            fj_backend.set_backend(backend)
        except ImportError:
            print(f"(skipping the {backend} backend: not built)", file=sys.stderr)
            continue
        yield backend
