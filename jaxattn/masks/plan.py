"""Plans: computing a mask at the cost of its density, with the kernels as they are.

A strided pattern cuts through every tile: ``StridedMask(s)`` allows the keys j with
(i - j) mod s = 0, so nearly every tile of the score matrix is PARTIAL and a tile walk
does dense work. Sorting positions by residue (i mod s) fixes the geometry. Query i =
p·s + r and key j = p'·s + r of one residue class r meet at class positions (p, p'),
and on those pairs

    StridedMask(s)                      -> every pair (the classes are the blocks of a
                                           block-diagonal matrix)
    CausalMask(c), LocalMask(l, r, c)   -> a band on p' - p: an ordinary causal or local
                                           mask inside each class (a dilated window
                                           LocalMask(w, 0) & StridedMask(s) becomes
                                           LocalMask(w // s, 0))

so the kernels skip tiles again, each class being one (batch, head) problem of length
T / s. Where those classes are shorter than a tile, a residue mod s' (s' = s/2, s/4, ...
while s' stays a whole number) makes fewer, longer classes in which the mask stays strided
(``StridedMask(s / s')``), and fewer tiles cover them. Keys can be shifted in front (``Residue.pre`` rows) so that key class = query class
also when the stride has an offset.

A mask is written as a union of terms (AND-terms of its leaves). Terms whose best layouts
differ (``(LocalMask(256, 0) | StridedMask(256)) & CausalMask()``: the window in natural
order, the strided part in residue order) run as separate parts, each term minus the terms
before it (``NotMask``), so every allowed pair is computed exactly once; their results
merge exactly through the log-sum-exp (jaxattn/planned.py). The planner tries the orders
of the terms and, per part, the natural and the residue layouts, and keeps the plan that
visits the fewest tiles; when nothing beats the plain tile walk, the mask keeps today's path.

``explain(mask, T, S)`` shows the plain walk and the chosen plan.

Masks holding arrays (SegmentMask) are planned through placeholders (``DataSlot``): in
residue layout their ids are permuted like the tokens (jaxattn/planned.py).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools

import numpy as np

from pallas_kernels.metadata import EMPTY, PARTIAL
from jaxattn.masks.base import AndMask, Mask, OrMask, register_static_mask
from jaxattn.masks.block_metadata import tile_states
from jaxattn.masks.complement import NotMask
from jaxattn.masks.data import SegmentMask
from jaxattn.masks.structured import (CausalMask, FullMask, GlobalMask, LocalMask,
                                      StridedMask)

#: Unions of more AND-terms than this are not planned (the search tries every order).
MAX_TERMS = 4


# ---------------------------------------------------------------------------------
# Layouts, parts, plans
# ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Residue:
    """Positions sorted by residue mod `stride`; `pre` padding key rows go in front so
    that key class = query class (pre = -offset mod stride of the StridedMask)."""

    stride: int
    pre: int = 0

    def class_lengths(self, q_len: int, kv_len: int) -> tuple[int, int]:
        return -(-q_len // self.stride), -(-(kv_len + self.pre) // self.stride)

    def __str__(self):
        return f"residue mod {self.stride}" + (f", keys shifted by {self.pre}" if self.pre else "")


@dataclasses.dataclass(frozen=True)
class Part:
    """One kernel call of a plan.

    mask:        the pairs this part computes, in natural coordinates (its term minus
                 the terms of earlier parts)
    layout:      None (natural order) or a Residue layout
    kernel_mask: the mask the kernels see (class coordinates for a Residue layout)
    q_len, kv_len: the lengths of one kernel problem (one residue class)
    problems:    how many problems per (batch row, head): the stride, or 1
    tiles:       forward tiles visited, all problems together, per (batch row, head)
    """

    mask: Mask
    layout: Residue | None
    kernel_mask: Mask
    q_len: int
    kv_len: int
    problems: int
    tiles: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """What runs for `mask` at these lengths and forward tiles. `parts` is empty when
    the plain tile walk is the best (today's path)."""

    mask: Mask
    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    plain_tiles: int
    parts: tuple[Part, ...] = ()

    @property
    def planned(self) -> bool:
        return bool(self.parts)

    @property
    def tiles(self) -> int:
        return sum(p.tiles for p in self.parts) if self.parts else self.plain_tiles


# ---------------------------------------------------------------------------------
# Placeholders for masks that hold arrays
# ---------------------------------------------------------------------------------
@register_static_mask
class DataSlot(Mask):
    """Stands for the `index`-th array-holding mask (a SegmentMask) while planning: any
    tile may hold allowed pairs (PARTIAL everywhere), so tile counts stay upper bounds."""

    def __init__(self, index: int):
        self.index = index

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        return np.full((-(-q_len // block_q), -(-kv_len // block_kv)), PARTIAL, np.int8)

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        raise NotImplementedError("a DataSlot is a planning placeholder; fill it first")

    def _key(self):
        return (self.index,)

    def __repr__(self):
        return f"SegmentMask#{self.index}"


def skeleton(mask: Mask):
    """(mask with each SegmentMask replaced by a DataSlot, the SegmentMasks), or None
    when the mask holds other arrays (a traced DenseMask): those are not planned."""
    leaves: list[Mask] = []

    def walk(m):
        if isinstance(m, (AndMask, OrMask)):
            parts = [walk(p) for p in m.parts]
            return None if any(p is None for p in parts) else type(m)(tuple(parts))
        if isinstance(m, NotMask):
            inner = walk(m.inner)
            return None if inner is None else NotMask(inner)
        if isinstance(m, SegmentMask):
            leaves.append(m)
            return DataSlot(len(leaves) - 1)
        if m.is_dynamic:
            return None
        return m

    out = walk(mask)
    return None if out is None else (out, tuple(leaves))


def substitute(mask: Mask, slot_fn) -> Mask:
    """`mask` with every DataSlot k replaced by slot_fn(k)."""
    if isinstance(mask, (AndMask, OrMask)):
        return type(mask)(tuple(substitute(p, slot_fn) for p in mask.parts))
    if isinstance(mask, NotMask):
        return NotMask(substitute(mask.inner, slot_fn))
    if isinstance(mask, DataSlot):
        return slot_fn(mask.index)
    return mask


# ---------------------------------------------------------------------------------
# Terms: the mask as a union of AND-terms of leaves
# ---------------------------------------------------------------------------------
def terms(mask: Mask) -> list[tuple[Mask, ...]] | None:
    """Distribute AND over OR: a list of AND-terms (tuples of distinct leaves, FullMask
    dropped), or None when there are more than MAX_TERMS."""
    if isinstance(mask, OrMask):
        out = []
        for p in mask.parts:
            sub = terms(p)
            if sub is None:
                return None
            out.extend(sub)
    elif isinstance(mask, AndMask):
        out = [()]
        for p in mask.parts:
            sub = terms(p)
            if sub is None:
                return None
            out = [a + b for a in out for b in sub]
            if len(out) > MAX_TERMS:
                return None
    elif isinstance(mask, FullMask):
        out = [()]
    else:
        out = [(mask,)]
    if len(out) > MAX_TERMS:
        return None
    return [tuple(dict.fromkeys(t)) for t in out]


def _and(leaves) -> Mask:
    leaves = tuple(leaves)
    if not leaves:
        return FullMask()
    return leaves[0] if len(leaves) == 1 else AndMask(leaves)


def residue_layouts(term: tuple[Mask, ...]) -> tuple[Residue, ...]:
    """Residue layouts worth trying for a term: its largest stride s, where a strided
    mask becomes one full block per class, and s' = s/2, s/4, ... (halving while s' is
    even), where it stays strided inside fewer, longer classes (stride s / s' there). The
    longer classes win where s's classes are shorter than a tile: at 4k, StridedMask(256)
    has classes of 16 rows, each padded to a whole tile; mod 32 they are 128 rows long
    and 4× fewer tiles cover them. () without a StridedMask."""
    strided = [m for m in term if isinstance(m, StridedMask) and m.stride > 1]
    if not strided:
        return ()
    s = max(m.stride for m in strided)
    offset = next(m.offset for m in strided if m.stride == s)
    layouts, size = [], s
    while size > 1:
        layouts.append(Residue(size, (-offset) % size))
        if size % 2:
            break
        size //= 2
    return tuple(layouts)


# ---------------------------------------------------------------------------------
# Class coordinates
# ---------------------------------------------------------------------------------
class _Empty:
    """Marks a mask with no allowed pair among a layout's class pairs."""

    def __repr__(self):
        return "EMPTY"


EMPTY_MASK = _Empty()


def _band(m: Mask):
    """(lo, hi) with lo <= j - i <= hi (None = unbounded) for causal/local masks."""
    if isinstance(m, CausalMask):
        return None, m.offset
    if isinstance(m, LocalMask):
        lo = None if m.left is None else m.offset - m.left
        hi = None if m.right is None else m.offset + m.right
        return lo, hi
    return None


def _band_mask(lo, hi):
    """The mask lo <= j - i <= hi with the plainest name (FullMask, CausalMask, LocalMask)."""
    if lo is None and hi is None:
        return FullMask()
    if lo is None:
        return CausalMask(hi)
    if hi is None:
        return LocalMask(0, None, lo)
    if hi < lo:
        return EMPTY_MASK
    if lo <= 0 <= hi:
        return LocalMask(-lo, hi)
    return LocalMask(hi - lo, 0, hi) if hi < 0 else LocalMask(0, hi - lo, lo)


def to_class_coords(mask: Mask, layout: Residue, slot_fn=None):
    """`mask` restricted to the pairs of one residue class (query p·s + r, key p'·s + r
    - pre), as a mask on (p, p') that is the same for every class; EMPTY_MASK when no
    such pair is allowed; None when the mask depends on the class (GlobalMask, strides
    that do not divide the layout's, block or dense masks). DataSlots become
    slot_fn(index) (kept as they are without slot_fn)."""
    s, pre = layout.stride, layout.pre
    if isinstance(mask, FullMask):
        return mask
    band = _band(mask)
    if band is not None:
        lo, hi = band
        # j - i = (p' - p)·s - pre on class pairs.
        return _band_mask(None if lo is None else -(-(lo + pre) // s),
                          None if hi is None else (hi + pre) // s)
    if isinstance(mask, StridedMask):
        # i + offset - j = (p - p')·s + pre + offset on class pairs.
        if s % mask.stride == 0:   # the same for every pair of the class
            return FullMask() if (pre + mask.offset) % mask.stride == 0 else EMPTY_MASK
        if mask.stride % s == 0:   # still strided: every (stride / s)-th class position
            if (pre + mask.offset) % s:
                return EMPTY_MASK
            k = mask.stride // s
            return StridedMask(k, ((pre + mask.offset) // s) % k)
        return None
    if isinstance(mask, GlobalMask) and mask.num_global == 0:
        return EMPTY_MASK
    if isinstance(mask, DataSlot):
        return mask if slot_fn is None else slot_fn(mask.index)
    if isinstance(mask, NotMask):
        inner = to_class_coords(mask.inner, layout, slot_fn)
        if inner is None:
            return None
        if inner is EMPTY_MASK:
            return FullMask()
        return EMPTY_MASK if isinstance(inner, FullMask) else NotMask(inner)
    if isinstance(mask, (AndMask, OrMask)):
        parts = [to_class_coords(p, layout, slot_fn) for p in mask.parts]
        if any(p is None for p in parts):
            return None
        is_and = isinstance(mask, AndMask)
        empties = [p is EMPTY_MASK for p in parts]
        fulls = [isinstance(p, FullMask) for p in parts]
        if any(empties if is_and else fulls):  # EMPTY absorbs an AND, FullMask an OR
            return EMPTY_MASK if is_and else FullMask()
        kept = tuple(dict.fromkeys(p for p, e, f in zip(parts, empties, fulls) if not (e or f)))
        if not kept:
            return FullMask() if is_and else EMPTY_MASK
        return kept[0] if len(kept) == 1 else type(mask)(kept)
    return None


# ---------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def visited_tiles(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int) -> int:
    """Non-empty tiles of a static mask: the tiles a forward tile walk visits."""
    return int(np.count_nonzero(tile_states(mask, q_len, kv_len, block_q, block_kv) != EMPTY))


def _part(mask, layout, q_len, kv_len, block_q, block_kv) -> Part | None:
    if layout is None:
        return Part(mask, None, mask, q_len, kv_len, 1,
                    visited_tiles(mask, q_len, kv_len, block_q, block_kv))
    kernel_mask = to_class_coords(mask, layout)
    if kernel_mask is None or kernel_mask is EMPTY_MASK:
        return None
    tq, tk = layout.class_lengths(q_len, kv_len)
    tiles = visited_tiles(kernel_mask, tq, tk, block_q, block_kv) * layout.stride
    return Part(mask, layout, kernel_mask, tq, tk, layout.stride, tiles)


def _plan_in_order(order, q_len, kv_len, block_q, block_kv):
    parts = []
    for k, term in enumerate(order):
        subtract = []
        for earlier in order[:k]:
            rest = tuple(m for m in earlier if m not in term)
            if not rest:  # this term lies inside an earlier one: nothing left to compute
                break
            subtract.append(NotMask(_and(rest)))
        else:
            mask = _and(term + tuple(subtract))
            options = [_part(mask, layout, q_len, kv_len, block_q, block_kv)
                       for layout in (None, *residue_layouts(term))]
            options = [p for p in options if p is not None]
            parts.append(min(options, key=lambda p: p.tiles))
    return tuple(parts)


@functools.lru_cache(maxsize=256)
def plan_mask(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int) -> Plan:
    """The cheapest plan for a static mask (DataSlots allowed) at these forward tiles."""
    plain = visited_tiles(mask, q_len, kv_len, block_q, block_kv)
    none = Plan(mask, q_len, kv_len, block_q, block_kv, plain)
    found = terms(mask)
    if not found or not any(residue_layouts(t) for t in found):
        return none
    best = None
    for order in itertools.permutations(found):
        parts = _plan_in_order(order, q_len, kv_len, block_q, block_kv)
        if best is None or sum(p.tiles for p in parts) < sum(p.tiles for p in best):
            best = parts
    if not best or sum(p.tiles for p in best) >= plain:
        return none
    return Plan(mask, q_len, kv_len, block_q, block_kv, plain, best)


# ---------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------
def allowed_pair_count(mask: Mask, q_len: int, kv_len: int, kv_start: int = 0,
                       block: int = 256) -> int:
    """Allowed pairs of a static mask in rows [0, q_len) x columns [kv_start, kv_len),
    evaluated one block of rows at a time over the columns its non-empty tiles span."""
    if mask.operands():
        return int(np.count_nonzero(mask.to_dense(q_len, kv_len)[:, kv_start:]))
    state = tile_states(mask, q_len, kv_len, block, block)[0, 0]
    total = 0
    for qb in range(state.shape[0]):
        cols = np.flatnonzero(state[qb] != EMPTY)
        c0, c1 = max(int(cols[0]) * block, kv_start) if cols.size else 0, 0
        if cols.size:
            c1 = min((int(cols[-1]) + 1) * block, kv_len)
        if c1 <= c0:
            continue
        q_pos = np.arange(qb * block, min((qb + 1) * block, q_len), dtype=np.int64)[:, None]
        kv_pos = np.arange(c0, c1, dtype=np.int64)[None, :]
        total += int(np.count_nonzero(np.broadcast_to(mask.evaluate(q_pos, kv_pos),
                                                      (q_pos.shape[0], c1 - c0))))
    return total


def part_pair_count(part: Part, q_len: int, kv_len: int) -> int:
    """Allowed pairs of a part, counted where it runs: a residue part per class, whose
    real rows and keys (the rest is padding) differ only at the class ends."""
    if part.layout is None:
        return allowed_pair_count(part.mask, q_len, kv_len)
    s, pre = part.layout.stride, part.layout.pre
    shapes = collections.Counter(
        (-(-(q_len - r) // s), 1 if r < pre else 0, -(-(kv_len + pre - r) // s))
        for r in range(s))
    return sum(n * allowed_pair_count(part.kernel_mask, tq, tk, k0)
               for (tq, k0, tk), n in shapes.items() if tq > 0 and tk > k0)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What runs for a mask: the plain tile walk beside the chosen plan.

    plan:          the Plan (its parts empty when the plain walk runs)
    allowed_pairs: allowed (query, key) pairs of the whole mask
    part_pairs:    allowed pairs of each part (they add up to allowed_pairs)
    """

    plan: Plan
    allowed_pairs: int
    part_pairs: tuple[int, ...]

    @property
    def density(self) -> float:
        return self.allowed_pairs / (self.plan.q_len * self.plan.kv_len)

    def __str__(self):
        p = self.plan
        area = p.block_q * p.block_kv
        lines = [f"mask {p.mask!r}",
                 f"T={p.q_len} S={p.kv_len}, tiles {p.block_q}x{p.block_kv}: "
                 f"{self.allowed_pairs} allowed pairs, density {self.density:.3%}",
                 f"plain tile walk: {p.plain_tiles} tiles visited, "
                 f"{_efficiency(self.allowed_pairs, p.plain_tiles, area)}"]
        if not p.planned:
            lines.append("plan: the plain tile walk (no layout visits fewer tiles)")
            return "\n".join(lines)
        lines.append(f"plan: {len(p.parts)} part(s), {p.tiles} tiles visited "
                     f"({p.plain_tiles / max(p.tiles, 1):.1f}x fewer), "
                     f"{_efficiency(self.allowed_pairs, p.tiles, area)}"
                     + (", merged by log-sum-exp" if len(p.parts) > 1 else ""))
        for k, (part, pairs) in enumerate(zip(p.parts, self.part_pairs), 1):
            where = ("natural order" if part.layout is None else
                     f"{part.layout}: {part.problems} classes of T={part.q_len} S={part.kv_len}, "
                     f"kernel mask {part.kernel_mask!r}")
            lines.append(f"  part {k}: {part.mask!r}")
            lines.append(f"    {where}; {part.tiles} tiles, {pairs} allowed pairs, "
                         f"{_efficiency(pairs, part.tiles, area)}")
        return "\n".join(lines)


def _efficiency(pairs, tiles, area):
    return f"{pairs / max(tiles * area, 1):.1%} of computed pairs useful"


def explain(mask: Mask, q_len: int, kv_len: int | None = None, *, block_q: int = 128,
            block_kv: int = 64) -> Explanation:
    """What dot_product_attention runs for `mask` at these lengths: the layouts and parts
    of the plan, tiles visited against allowed pairs, beside the plain tile walk. The
    default tiles are the Triton forward's at head dim 128 on a GPU; `print()` the result
    for a table."""
    kv_len = q_len if kv_len is None else kv_len
    if not isinstance(mask, Mask) or mask.is_dynamic:
        raise ValueError(f"explain: expected a static jaxattn.masks.Mask, got {mask!r}. Segment ids "
                         "and traced arrays are data: explain the mask without them.")
    for name, v in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"explain: expected {name} a positive int, got {v!r}. Pass e.g. {name}=128.")
    plan = plan_mask(mask, int(q_len), int(kv_len), int(block_q), int(block_kv))
    parts = tuple(part_pair_count(p, q_len, kv_len) for p in plan.parts)
    total = sum(parts) if plan.planned else allowed_pair_count(mask, q_len, kv_len)
    return Explanation(plan, total, parts)
