"""Which work items (q-block, head, batch row) each CTA of the Hopper forward runs.

One CTA per item (grid (nQ, N, B)); the hardware hands the next item to whichever SM
frees up first. Or ``persistent``: ``num_ctas`` CTAs (one per SM) each loop over a fixed
share of the items, so one item's epilogue and the next item's first K/V copies overlap
and no CTA launch sits between items. The share must then balance the work by itself,
and the order decides what shares L2. Four deals:

* in order (``balance`` False; the mask gives every q-block about the same work,
  metadata's even_q_work): items numbered q-block fastest, heaviest (last) first, dealt
  round robin (CTA c runs items c, c + C, ...). CTAs running at the same time hold
  neighbouring q-blocks of one head, whose K/V tiles they share in L2.
* snake (``balance`` True; causal-like masks, where a q-block's work grows with its
  index): heads and batch rows fastest, heaviest q-block first, dealt in a snake (round
  r gives item r·C + c to CTA c when r is even, to CTA C − 1 − c when r is odd), so a
  CTA that drew a heavy item in one round draws a light one in the next. Dealt round
  robin with q-blocks fastest, the first CTA of a causal 16k call got about three times
  the work of the middle one (391 TFLOP/s against 546 on the H200); dealt this way,
  windowed calls lost their L2 sharing (window 256: 114 against 159).
* table (static masks whose work neither deal balances: BigBird's global rows visit
  every kv-block, the other rows about a tenth of them, so both deals give every CTA the
  same number of items and the CTAs that drew a global row get ~1.5× the mean work):
  longest-processing-time first, on the host at trace time from the metadata's static
  tile counts. Items in decreasing order of work (ties in the in-order numbering, so
  CTAs running at the same time still hold neighbouring q-blocks), each to the CTA with
  the least work so far; the kernel reads its CTA's row of the resulting table. A
  PARTIAL tile counts as two FULL ones (its mask work; NOTES.md beside this file) and an
  item's Q load and epilogue as one. The table is used only where it cuts the busiest
  CTA's work by more than TABLE_MIN_GAIN against the deal it replaces.
* sorted snake (masks whose metadata is data, e.g. segment ids of packed documents:
  their tile counts are tracers, so nothing is known at trace time): the items are
  sorted by decreasing work on the device (one argsort of B·N·nQ values, ties by
  ascending (batch, head, q-block)) and that order is dealt in a snake. Large static
  masks past MAX_STATIC_TILE_COUNTS carry no counts either: they take this deal unless
  their work is even (then the in-order deal). Packed causal documents
  (8 at 16k) put 1.37× the mean work on the busiest CTA under the snake by q-block, 1.07×
  under the sorted snake. (BigBird shows why static masks take the table instead:
  its sorted snake still gives every CTA equally many items, 1.37×.)
"""

from __future__ import annotations

import dataclasses
import functools
import heapq

import numpy as np
import jax.numpy as jnp
from jax import lax

from pallas_kernels.metadata import decode_tile_counts

# Work units of a tile list: FULL tile 1, PARTIAL tile 2, the item's own fixed cost 1.
PARTIAL_TILE_WORK = 2
ITEM_WORK = 1
# The table replaces an arithmetic deal only when it cuts the busiest CTA's work by more
# than this fraction (the deals keep their L2-friendly order otherwise).
TABLE_MIN_GAIN = 0.05
# Items past which no table is built (the host-side deal would cost ~1 s at trace time).
MAX_TABLE_ITEMS = 1 << 17


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The items of a forward call and how its CTAs share them (module docstring).
    ``table`` holds the per-CTA item table as arrays until `bind` swaps in their refs."""

    num_q_blocks: int
    num_heads: int
    batch: int
    persistent: bool
    num_ctas: int
    balance: bool = True
    table: tuple | None = None      # (counts [C] int32, items [C, L] int32) or their refs
    order: object | None = None     # items by decreasing work (int32 [B·N·nQ]) or its ref

    @property
    def num_items(self) -> int:
        return self.num_q_blocks * self.num_heads * self.batch

    def grid(self):
        if self.persistent:
            return (self.num_ctas,), ("cta",)
        return (self.num_q_blocks, self.num_heads, self.batch), ("q", "heads", "batch")

    def arrays(self) -> tuple:
        """Kernel inputs of the table or sorted deal (none for the arithmetic deals)."""
        if self.table is not None:
            return self.table
        return () if self.order is None else (self.order,)

    def bind(self, refs) -> "Schedule":
        if self.table is not None:
            return dataclasses.replace(self, table=tuple(refs))
        return self if self.order is None else dataclasses.replace(self, order=refs[0])

    def _decode(self, flat):
        """(q-block, head, batch row) of flat = (batch·N + head)·nQ + q-block."""
        rest = lax.div(flat, jnp.int32(self.num_q_blocks))
        return (lax.rem(flat, jnp.int32(self.num_q_blocks)), lax.rem(rest, jnp.int32(self.num_heads)),
                lax.div(rest, jnp.int32(self.num_heads)))

    def _seat(self, round_):
        """This CTA's position in round `round_` of the deal."""
        cta = lax.axis_index("cta")
        if not self.balance:
            return cta
        return jnp.where(lax.rem(round_, 2) == 0, cta, self.num_ctas - 1 - cta)

    def my_item_count(self):
        if not self.persistent:
            return jnp.int32(1)
        if self.table is not None:
            return self.table[0][lax.axis_index("cta")]
        full_rounds, rest = divmod(self.num_items, self.num_ctas)
        return jnp.int32(full_rounds) + (self._seat(jnp.int32(full_rounds)) < rest).astype(jnp.int32)

    def item(self, i):
        """(q-block, head, batch row) of this CTA's i-th item."""
        if not self.persistent:
            reversed_q = lax.axis_index("q")
            head, batch = lax.axis_index("heads"), lax.axis_index("batch")
            return self.num_q_blocks - 1 - reversed_q, head, batch
        if self.table is not None:
            return self._decode(self.table[1][lax.axis_index("cta"), i])
        flat = i * self.num_ctas + self._seat(i)
        if self.order is not None:
            return self._decode(self.order[flat])
        if self.balance:
            rows = self.num_heads * self.batch
            reversed_q, rest = lax.div(flat, jnp.int32(rows)), lax.rem(flat, jnp.int32(rows))
        else:
            reversed_q = lax.rem(flat, jnp.int32(self.num_q_blocks))
            rest = lax.div(flat, jnp.int32(self.num_q_blocks))
        head, batch = lax.rem(rest, self.num_heads), lax.div(rest, jnp.int32(self.num_heads))
        return self.num_q_blocks - 1 - reversed_q, head, batch


def _work(full, partial):
    """Work units of items with these FULL and PARTIAL tile counts (numpy or jnp)."""
    return full + PARTIAL_TILE_WORK * partial + ITEM_WORK


def item_work(tile_counts: bytes, count_shape, num_q_blocks: int, num_heads: int,
              batch: int) -> np.ndarray:
    """Work of every item, flat = (batch·N + head)·nQ + q-block, from the metadata's static
    (FULL, PARTIAL) counts over [Bm, Hm, nQ'] (Bm, Hm = 1 when the mask does not vary
    there; nQ' >= nQ)."""
    assert count_shape[-1] >= num_q_blocks, (count_shape, num_q_blocks)
    counts = decode_tile_counts(tile_counts, count_shape)[..., :num_q_blocks, :].astype(np.int64)
    work = _work(counts[..., 0], counts[..., 1])
    return np.broadcast_to(work, (batch, num_heads, num_q_blocks)).reshape(-1)


def dealt_loads(schedule: Schedule, work: np.ndarray) -> np.ndarray:
    """Each CTA's total work under the arithmetic deal of `schedule` (persistent)."""
    c, nq, rows = schedule.num_ctas, schedule.num_q_blocks, schedule.num_heads * schedule.batch
    flat = np.arange(schedule.num_items)
    rounds, seat = np.divmod(flat, c)
    if schedule.balance:
        seat = np.where(rounds % 2 == 0, seat, c - 1 - seat)
        reversed_q, rest = np.divmod(flat, rows)
    else:
        rest, reversed_q = np.divmod(flat, nq)
    item = rest * nq + (nq - 1 - reversed_q)     # (batch·N + head)·nQ + q-block
    return np.bincount(seat, weights=work[item], minlength=c)


def lpt_table(work: np.ndarray, num_ctas: int):
    """Longest processing time first: items by decreasing work (stable), each to the CTA
    with the least work so far (the lowest-numbered on ties). Returns (counts [C] int32,
    items [C, L] int32 padded with 0, loads [C])."""
    order = np.argsort(-work, kind="stable")
    heap = [(0, cta) for cta in range(num_ctas)]
    lists = [[] for _ in range(num_ctas)]
    loads = np.zeros(num_ctas)
    for item in order:
        load, cta = heapq.heappop(heap)
        lists[cta].append(int(item))
        load += int(work[item])
        loads[cta] = load
        heapq.heappush(heap, (load, cta))
    counts = np.array([len(x) for x in lists], np.int32)
    items = np.zeros((num_ctas, max(1, counts.max())), np.int32)
    for cta, x in enumerate(lists):
        items[cta, :len(x)] = x
    return counts, items, loads


def balanced_deal(schedule: Schedule, meta) -> Schedule:
    """`schedule` (persistent) with the sorted snake when the metadata is data, with the
    table when its static tile counts are known and the table cuts the busiest CTA's
    work by more than TABLE_MIN_GAIN; else unchanged."""
    if not schedule.persistent:
        return schedule
    if meta.tile_counts is None:
        return schedule if meta.even_q_work else with_sorted_order(schedule, meta)
    if schedule.num_items > MAX_TABLE_ITEMS:
        return schedule
    table = _balanced_table(schedule, meta.tile_counts, tuple(meta.full_count.shape))
    if table is None:
        return schedule
    return dataclasses.replace(schedule, table=tuple(jnp.asarray(x) for x in table))


@functools.lru_cache(maxsize=64)
def _balanced_table(schedule: Schedule, tile_counts: bytes, count_shape):
    """The LPT table (counts, items) when it beats `schedule`'s deal by TABLE_MIN_GAIN,
    else None; cached, since each trace of a call asks again (the deal costs up to ~1 s
    of host time at MAX_TABLE_ITEMS)."""
    work = item_work(tile_counts, count_shape, schedule.num_q_blocks, schedule.num_heads,
                     schedule.batch)
    counts, items, loads = lpt_table(work, schedule.num_ctas)
    if loads.max() >= (1 - TABLE_MIN_GAIN) * dealt_loads(schedule, work).max():
        return None
    return counts, items


def with_sorted_order(schedule: Schedule, meta) -> Schedule:
    """The sorted snake: items by decreasing work, computed on the device from the
    metadata's (traced) counts, dealt in a snake."""
    return sorted_by_counts(schedule, meta.full_count, meta.partial_count)


def dealt_by_counts(schedule: Schedule, static_counts, full_count, partial_count) -> Schedule:
    """`schedule` (persistent) dealt by the work of its blocks, whose FULL / PARTIAL tile
    counts are `full_count` / `partial_count` [Bm, Hm', n'] (n' >= the schedule's blocks,
    Hm' in {1, the schedule's heads}; e.g. the kv-blocks of the dK/dV pass's transposed
    lists): the LPT table from `static_counts` (the same counts as a numpy int32
    [Bm, Hm', n', 2], known at trace time for static masks; at most MAX_TABLE_ITEMS
    items), else the sorted snake from the (traced) arrays."""
    if static_counts is None or schedule.num_items > MAX_TABLE_ITEMS:
        return sorted_by_counts(schedule, full_count, partial_count)
    static_counts = np.ascontiguousarray(static_counts, np.int32)
    table = _lpt_table_of_counts(schedule, static_counts.tobytes(), static_counts.shape)
    return dataclasses.replace(schedule, table=tuple(jnp.asarray(x) for x in table))


@functools.lru_cache(maxsize=64)
def _lpt_table_of_counts(schedule: Schedule, raw: bytes, count_shape):
    """(counts, items) of the LPT table over int32 (FULL, PARTIAL) counts [.., n', 2] given
    as bytes; cached, since each trace of a call asks again."""
    nq = schedule.num_q_blocks
    counts = np.frombuffer(raw, np.int32).reshape(count_shape)[..., :nq, :].astype(np.int64)
    work = _work(counts[..., 0], counts[..., 1])
    work = np.broadcast_to(work, (schedule.batch, schedule.num_heads, nq)).reshape(-1)
    table_counts, items, _ = lpt_table(work, schedule.num_ctas)
    return table_counts, items


def sorted_by_counts(schedule: Schedule, full_count, partial_count) -> Schedule:
    """The sorted snake over blocks whose FULL / PARTIAL tile counts are given as
    [Bm, Hm, n'] (n' >= the schedule's blocks): the forward's q-blocks, or the kv-blocks
    of the dK/dV pass's transposed lists."""
    nq = schedule.num_q_blocks
    counts = _work(jnp.asarray(full_count, jnp.int32)[..., :nq],
                   jnp.asarray(partial_count, jnp.int32)[..., :nq])
    work = jnp.broadcast_to(counts, (schedule.batch, schedule.num_heads, nq)).reshape(-1)
    order = jnp.argsort(-work, stable=True).astype(jnp.int32)
    return dataclasses.replace(schedule, balance=True, order=order)
