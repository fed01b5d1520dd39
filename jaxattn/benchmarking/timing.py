"""How jaxattn times a call on a GPU (and, with a time budget, on CPU).

* compile first (pass a compiled function), so no compile lands in a timed call;
* warm-up: two untimed calls (the first run of a program pays for autotuning, loading
  and allocation);
* then at least 20 timed calls, each ended by ``jax.block_until_ready`` (JAX dispatches
  asynchronously: without it the clock measures the dispatch, not the kernel); report
  the median, which one slow call (a clock boost, another process) does not move;
* inputs rotate between several copies when one set would stay resident in the ~50 MB
  L2 of an H100 (a kernel reading the same warm tiles every call looks faster than it is).

The same harness runs on CPU for `jaxattn compare`, where a per-measurement time budget
may stop the repeats early (never below ``min_repeats``); the count is recorded.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence

import jax

L2_BYTES = 50 * 2**20  # H100 L2
DEFAULT_WARMUP = 2
DEFAULT_REPEATS = 20


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call."""
    median_s: float
    min_s: float
    max_s: float
    times_s: tuple[float, ...]
    warmup: int
    input_sets: int

    @property
    def repeats(self) -> int:
        return len(self.times_s)

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s,
                "repeats": self.repeats, "warmup": self.warmup, "input_sets": self.input_sets}


def rotation_sets(bytes_per_set: int, *, cache_bytes: int = L2_BYTES, max_sets: int = 32) -> int:
    """How many copies of the inputs to rotate through so that consecutive calls do not
    find their inputs in a cache of ``cache_bytes`` (1 when one set already exceeds it)."""
    if cache_bytes <= 0 or bytes_per_set >= cache_bytes:
        return 1
    return int(min(max_sets, max(2, math.ceil(2 * cache_bytes / max(bytes_per_set, 1)))))


def time_call(fn: Callable, input_sets: Sequence[tuple], *, warmup: int = DEFAULT_WARMUP,
              repeats: int = DEFAULT_REPEATS, min_repeats: int | None = None,
              budget_s: float | None = None, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time ``fn(*args)`` with args rotating over ``input_sets``.

    ``warmup`` untimed calls, then ``repeats`` timed ones (each one waits for its result
    with ``jax.block_until_ready``). With ``budget_s``, stops once the timed calls have
    taken that long and at least ``min_repeats`` (default: ``repeats``) were made.
    """
    if not input_sets:
        raise ValueError("input_sets must hold at least one tuple of arguments.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=}, {warmup=}.")
    min_repeats = repeats if min_repeats is None else max(1, min(min_repeats, repeats))
    n_sets = len(input_sets)
    call = 0
    for _ in range(warmup):
        jax.block_until_ready(fn(*input_sets[call % n_sets]))
        call += 1
    times: list[float] = []
    while len(times) < repeats:
        args = input_sets[call % n_sets]
        call += 1
        start = clock()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(clock() - start)
        del out
        if budget_s is not None and len(times) >= min_repeats and sum(times) >= budget_s:
            break
    return Timing(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                  times_s=tuple(times), warmup=warmup, input_sets=n_sets)
