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

A waited-for call costs the host's dispatch plus the device's run plus the wait: for
kernels of a few tens of µs the median is the host's floor, not the kernel. The second
measure, ``time_back_to_back``, issues many calls without waiting and waits once at the
end, as a training loop does: each call's dispatch overlaps the device's work on the
previous ones, so while the host stays ahead the time per call is what the device spends.
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


@dataclasses.dataclass(frozen=True)
class BackToBack:
    """Seconds per call of ``calls`` calls issued back to back (one wait at the end):
    ``per_call_s`` is the wall time of all of them / ``calls``; ``issue_s`` is the host's
    time to issue one call (the part of it before the wait, / ``calls``)."""
    per_call_s: float
    issue_s: float
    calls: int
    warmup: int
    input_sets: int

    def as_dict(self) -> dict:
        return {"per_call_s": self.per_call_s, "issue_s": self.issue_s, "calls": self.calls,
                "warmup": self.warmup, "input_sets": self.input_sets}


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


def time_back_to_back(fn: Callable, input_sets: Sequence[tuple], *, repeats: int = DEFAULT_REPEATS,
                      warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> BackToBack:
    """Time ``repeats`` calls of ``fn(*args)`` issued without waiting, args rotating over
    ``input_sets``, then one ``jax.block_until_ready`` on all their outputs.

    After ``warmup`` waited-for calls (0 for a function that was just timed and is warm).
    The result is the device-bound cost of a call when the host stays ahead of the device
    (a call's dispatch overlaps the previous calls' work); where issuing a call takes the
    host longer than the device's run, it is the issue time instead (``issue_s`` says so).
    All ``repeats`` outputs are alive at once until the wait.
    """
    if not input_sets:
        raise ValueError("input_sets must hold at least one tuple of arguments.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=}, {warmup=}.")
    n_sets = len(input_sets)
    for call in range(warmup):
        jax.block_until_ready(fn(*input_sets[call % n_sets]))
    start = clock()
    outs = [fn(*input_sets[(warmup + i) % n_sets]) for i in range(repeats)]
    issued = clock()
    jax.block_until_ready(outs)
    end = clock()
    return BackToBack(per_call_s=(end - start) / repeats, issue_s=(issued - start) / repeats,
                      calls=repeats, warmup=warmup, input_sets=n_sets)


@dataclasses.dataclass
class RoundTimes:
    """One call's times over interleaved rounds: ``waited_s`` the median of each round's
    waited-for calls; ``back_to_back_s`` each round's time per call issued back to back
    (empty unless asked for) and the host's time to issue each of those calls."""
    waited_s: list[float] = dataclasses.field(default_factory=list)
    back_to_back_s: list[float] = dataclasses.field(default_factory=list)
    back_to_back_issue_s: list[float] = dataclasses.field(default_factory=list)   # host's, per call


def time_rounds(calls: Sequence[tuple[Callable, tuple]], *, rounds: int, repeats: int = 10,
                warmup: int = DEFAULT_WARMUP, back_to_back: int = 0,
                on_round: Callable[[int, list[RoundTimes]], None] | None = None) -> list[RoundTimes]:
    """Seconds per call of each (fn, args) in ``calls``, measured in ``rounds`` rounds that
    each time every call once, one after another: ``repeats`` waited-for calls (their
    median), then, with ``back_to_back`` > 0, that many calls issued without waiting
    (``time_back_to_back``); ``warmup`` untimed calls in the first round only. A drift of
    the card's clock, or of the load beside it, over the run then moves every entry
    alike, so a gap between two entries is read from the same minutes. ``on_round(r,
    times)`` sees every call's times after each round (to save partial results)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    if back_to_back < 0:
        raise ValueError(f"back_to_back must be >= 0 calls, got {back_to_back}.")
    times = [RoundTimes() for _ in calls]
    for r in range(rounds):
        for (fn, args), out in zip(calls, times):
            out.waited_s.append(time_call(fn, [args], warmup=warmup if r == 0 else 0, repeats=repeats).median_s)
            if back_to_back:
                b2b = time_back_to_back(fn, [args], repeats=back_to_back, warmup=0)
                out.back_to_back_s.append(b2b.per_call_s)
                out.back_to_back_issue_s.append(b2b.issue_s)
        if on_round is not None:
            on_round(r, times)
    return times


def time_interleaved(calls: Sequence[tuple[Callable, tuple]], *, rounds: int, repeats: int = 10,
                     warmup: int = DEFAULT_WARMUP,
                     on_round: Callable[[int, list[list[float]]], None] | None = None) -> list[list[float]]:
    """``time_rounds`` without back-to-back calls: each call's round medians of waited-for
    calls; ``on_round(r, medians)`` sees them after every round."""
    forward = None if on_round is None else (lambda r, times: on_round(r, [t.waited_s for t in times]))
    return [t.waited_s for t in time_rounds(calls, rounds=rounds, repeats=repeats, warmup=warmup,
                                             on_round=forward)]
