"""Shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from negprompt.files import write_json


def write_result(result: dict, out: str | Path) -> Path:
    """Writes a benchmark's result as JSON (creating the folder) and says where."""
    path = write_json(out, result, indent=2, default=float)
    print(f"wrote {path}")
    return path


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (GPU work included)."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, ``repeats`` times, interleaved (a, b, c, a, b, c, …) after one warm-up each,
    under ``torch.no_grad``, so that background load hits every run alike."""
    import torch

    with torch.no_grad():
        for fn in runs.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn))
    return times


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median of the per-repeat ratios a/b."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))
