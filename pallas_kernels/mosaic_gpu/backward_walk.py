"""What the Mosaic GPU backward kernels share: walking a block's tile lists, and the
pieces of a tile's arithmetic (FlashAttention-2's backward, Algorithm 2) that
backward_tiles.py puts together.

Tile lists (pallas_kernels/metadata.py) arrive in global memory untouched. A program
walks its block's FULL list, then its PARTIAL list, as one flat sequence of pipeline
steps; the dK/dV kernel repeats that sequence once per query head of its KV head (GQA),
so a step is decoded into (head in group, block index, is-partial). Both the memory
warpgroup (to start the TMA copy of the step's tile) and the compute warpgroups (to
place the mask) decode the same step from the same scalars, so they always agree.
EMPTY tiles are in no list and are never loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
# dce_jaxpr: which inputs of a jaxpr its outputs depend on (jax has no public form of it)
from jax._src.interpreters import partial_eval as pe

from pallas_kernels.common import LOG2E

WGMMA = plgpu.Layout.WGMMA
WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)   # one value per accumulator row
WGMMA_COL = plgpu.Layout.WGMMA.reduce(0)   # one value per accumulator column


def tile_list_pipeline(tile, lists, *, stages: int, wgs: int, compute_thread, in_specs,
                       memory_registers: int = 40):
    """The pipeline both backward kernels run: one TMA warpgroup (few registers) streams
    the blocks `in_specs` name, step by step along this program's tile list
    (`lists.total` steps), to `wgs` compute warpgroups that call `tile`; consumed slots
    are released by the kernels themselves (manual barriers)."""
    return plgpu.emit_pipeline_warp_specialized(
        tile,
        grid=(lists.total,),
        max_concurrent_steps=stages,
        num_compute_wgs=wgs,
        memory_registers=memory_registers,
        wg_axis="wg",
        manual_consumed_barriers=True,
        compute_context=compute_thread,
        in_specs=in_specs,
    )


def run_persistent_producer(num_items, item_lists, *, buffers: int, buffer_free, copy_resident,
                            stages: int, slot_free, locate_step, copy_step):
    """The producer loop both persistent backward kernels run over this CTA's items.

    Per item: its resident tiles (K/V of a kv-block, or Q/dO of a q-block) go into buffer
    `item % buffers` once the compute warpgroups have released it (`buffer_free`, from the
    item `buffers` back); then each step's streamed tiles go into slot `(first + step) %
    stages` once released (`slot_free`, from the step `stages` back), `first` counting the
    CTA's steps so far. item_lists(item) -> (..., lists); copy_resident(item_data, buf);
    locate_step(item_data, step) -> where (read before the wait, so its global-memory
    latency overlaps it); copy_step(item_data, where, slot). Returns the CTA's step count."""
    def run_item(item, first):
        item_data = item_lists(item)
        lists = item_data[-1]
        buf = lax.rem(item, buffers)

        @pl.when(item >= buffers)
        def _():
            plgpu.barrier_wait(buffer_free.at[buf])

        copy_resident(item_data, buf)

        @pl.loop(0, lists.total)
        def _(s):
            at = first + s
            slot = lax.rem(at, stages)
            where = locate_step(item_data, s)

            @pl.when(at >= stages)
            def _():
                plgpu.barrier_wait(slot_free.at[slot])

            copy_step(item_data, where, slot)

        return first + lists.total

    return lax.fori_loop(0, num_items, run_item, jnp.int32(0))


def copy_resident_rows(sources, buffers, buf, ready, *, batch, block, head, rows: int,
                       wgs: int):
    """A persistent kernel's resident copies for one item: block `block` of each source
    [B, T, heads, Hp] in GMEM (K and V, or Q and dO), one `rows`-row share per compute
    warpgroup, into buffer `buf` of `buffers` (each [buffers, wgs, rows, Hp] in SMEM), all
    arriving on `ready`."""
    for w in range(wgs):
        item_rows = pl.ds(block * (rows * wgs) + w * rows, rows)
        for source, buffer in zip(sources, buffers):
            plgpu.copy_gmem_to_smem(source.at[batch, item_rows, head], buffer.at[buf, w], ready)


def swizzled(shape, dtype) -> tuple:
    """Tiling + 128-byte swizzle transforms for a [rows, head_dim] operand of wgmma."""
    bits = jnp.finfo(dtype).bits
    swizzle = plgpu.find_swizzle(shape[-1] * bits)
    return (plgpu.TilingTransform((8, 8 * swizzle // bits)), plgpu.SwizzleTransform(swizzle))


@dataclasses.dataclass(frozen=True)
class Step:
    """One decoded pipeline step: the tile's block index along the walked axis, the
    query head within the KV head's group (0 for the dQ kernel), whether the tile
    is PARTIAL (mask evaluated) rather than FULL, and, when the lists came with
    ranks, the tile's rank (backward_fused.py: how many kv-blocks add to this
    q-block's dQ before this one)."""
    block: jax.Array
    head: jax.Array
    partial: jax.Array
    rank: jax.Array | None = None


class TileLists:
    """The FULL-then-PARTIAL lists of one block for the `groups` query heads
    head0 … head0 + groups − 1, read as scalars from the metadata arrays in GMEM
    (counts [Bm, Hm, n], indices [Bm, Hm, n, L]; Bm in {1, B}, Hm in {1, N}).
    rank_refs, optional: two arrays shaped like the two index arrays, one int32 per
    list entry, read at the same position as the entry (Step.rank)."""

    def __init__(self, meta_refs, *, batch, block, head0, groups: int, rank_refs=None):
        self.full_count, self.full_index, self.partial_count, self.partial_index = meta_refs
        self.rank_refs = rank_refs
        self.bm = batch if self.full_count.shape[0] > 1 else 0
        self.per_head = self.full_count.shape[1] > 1
        self.block, self.groups = block, groups
        rows = [head0 + g for g in range(groups)] if self.per_head else [0]
        self.rows = rows
        self.n_full = [self.full_count[self.bm, r, block] for r in rows]
        self.n_partial = [self.partial_count[self.bm, r, block] for r in rows]
        self.l_full = self.full_index.shape[-1]
        self.l_partial = self.partial_index.shape[-1]
        # Steps before head g's sequence starts (shared lists: g · (n_full + n_partial)).
        self.starts = []
        start = jnp.int32(0)
        for g in range(groups):
            self.starts.append(start)
            h = g if self.per_head else 0
            start = start + self.n_full[h] + self.n_partial[h]
        self.total = start

    def decode(self, step) -> Step:
        head = jnp.int32(0)
        for g in range(1, self.groups):        # few heads per group: unrolled selects
            head = lax.select(step >= self.starts[g], jnp.int32(g), head)
        if self.per_head:
            start, n_full, row = self.starts[0], self.n_full[0], self.rows[0]
            for g in range(1, self.groups):
                here = head == g
                start = lax.select(here, self.starts[g], start)
                n_full = lax.select(here, self.n_full[g], n_full)
                row = lax.select(here, self.rows[g], row)
        else:
            start = head * (self.n_full[0] + self.n_partial[0])
            n_full, row = self.n_full[0], 0
        i = step - start
        partial = i >= n_full
        # Both lists are read at clamped positions; the select keeps the right entry.
        at_full = (self.bm, row, self.block, jnp.minimum(i, self.l_full - 1))
        at_partial = (self.bm, row, self.block, jnp.clip(i - n_full, 0, self.l_partial - 1))
        block = lax.select(partial, self.partial_index[at_partial], self.full_index[at_full])
        rank = None
        if self.rank_refs is not None:
            rank_full, rank_partial = self.rank_refs
            rank = lax.select(partial, rank_partial[at_partial], rank_full[at_full])
        return Step(block=block, head=head, partial=partial, rank=rank)


def logits_and_probabilities(s, lse2, *, scale: float, cap: float | None, row_axis: int):
    """P = exp2(scale·log2e·s − lse·log2e) for one tile of raw scores s = q·k (f32,
    WGMMA layout), with the soft cap c·tanh(x/c) applied to x = scale·s first.
    lse2 (lse·log2e, +inf on rows with no allowed key, which makes P exactly 0) is laid
    out along `row_axis` of the tile (the query axis). Returns (p, tanh or None)."""
    lse_b = lax.broadcast_in_dim(lse2, s.shape, [row_axis])
    if cap is None:
        return jnp.exp2(s * (scale * LOG2E) - lse_b), None
    t = jnp.tanh(s * (scale / cap))
    return jnp.exp2(t * (cap * LOG2E) - lse_b), t


def keep_partial(p, partial, mask_fn: Callable | None, positions, kv_len: int,
                 kv_padded: bool, operands=lambda: (), operand_count: int = 0,
                 q_len: int | None = None):
    """On a PARTIAL tile, P is selected to exactly 0 where the mask (or kv_pos >= kv_len,
    or q_pos >= q_len when `q_len` is given: the query tile's padding rows, which would
    otherwise evaluate the mask past T and reach keys no query attends) rules a pair out;
    FULL tiles skip this work entirely (lax.cond on the step's kind).
    positions(with_q) -> (q_pos or None, kv_pos): int32 positions of the tile's elements,
    same shape and layout as p (the mask is element-wise, so the tile may be transposed);
    operands() -> the `operand_count` mask operands' values for this tile (OperandTiles)."""
    if mask_fn is None and not kv_padded and q_len is None:
        return p
    with_q = q_len is not None or (
        mask_fn is not None and reads_query_positions(mask_fn, p.shape, operand_count))

    def masked():
        q_pos, kv_pos = positions(with_q)
        keep = kv_pos < kv_len
        if q_len is not None:
            keep = keep & (q_pos < q_len)
        if mask_fn is not None:
            # A mask that never reads the query positions (segments, block layouts) gets
            # none built: Mosaic GPU cannot lay out a value nothing uses.
            keep = keep & mask_fn(kv_pos if q_pos is None else q_pos, kv_pos, operands())
        return jnp.where(keep, p, 0.0)

    return lax.cond(partial, masked, lambda: p)


def reads_query_positions(mask_fn: Callable, shape, operand_count: int) -> bool:
    """Whether mask_fn(q_pos, kv_pos, operands)'s result depends on q_pos: q_pos is live
    in its jaxpr on tile-shaped int32 arguments once dead code is removed (a position
    map may compute with q_pos and then not use it; traced once per kernel trace, on
    the host)."""
    tile = jax.ShapeDtypeStruct(tuple(shape), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda q, kv, *ops: mask_fn(q, kv, ops))(
        tile, tile, *([tile] * operand_count)).jaxpr
    _, used_inputs = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return bool(used_inputs[0])


class OperandTiles:
    """Loads the mask operands of one tile, shaped and laid out like the tile.

    refs: the operand arrays in GMEM, prepared by common.prepare_operands; kinds: their
    ((kind, layout_block), ...). q_axis: which axis of the tile runs along the queries
    (0 in the dQ kernel, 1 in the transposed dK/dV kernel). Only PARTIAL tiles call it."""

    def __init__(self, refs, kinds, *, q_axis: int):
        self.refs, self.kinds, self.q_axis = refs, kinds, q_axis

    def __call__(self, shape, *, batch, head, q_start, kv_start):
        values = []
        q_len, kv_len = shape[self.q_axis], shape[1 - self.q_axis]
        for (kind, layout_block), ref in zip(self.kinds, self.refs):
            bm = batch if ref.shape[0] > 1 else 0
            if kind in ("q", "kv"):
                along_q = kind == "q"
                axis = self.q_axis if along_q else 1 - self.q_axis
                start, size = (q_start, q_len) if along_q else (kv_start, kv_len)
                row = plgpu.load(ref.at[bm, pl.ds(start, size)], (),
                                 layout=WGMMA_ROW if axis == 0 else WGMMA_COL, optimized=False)
                values.append(lax.broadcast_in_dim(row, shape, [axis]))
            else:   # "block": one layout entry covers the whole tile
                lbq, lbk = layout_block
                hm = head if ref.shape[1] > 1 else 0
                entry = ref[bm, hm, lax.div(q_start, jnp.int32(lbq)),
                            lax.div(kv_start, jnp.int32(lbk))]
                values.append(jnp.full(shape, entry, jnp.int32))
        return tuple(values)


def tile_positions(shape, q_start, q_axis: int, kv_start, kv_axis: int, with_q: bool = True):
    """Absolute (q_pos, kv_pos) of every element of a [rows, cols] tile in WGMMA layout
    (q_pos None when not `with_q`): one iota per axis in the row or column layout,
    broadcast over the tile, so a thread holds its 2 row and 16 column positions (what
    that did to the dK/dV kernel's registers: BACKWARD_NOTES.md)."""
    def iota(axis):
        vector = plgpu.broadcasted_iota(jnp.int32, (shape[axis],), 0,
                                        layout=WGMMA_ROW if axis == 0 else WGMMA_COL)
        return lax.broadcast_in_dim(vector, shape, [axis])
    return (q_start + iota(q_axis) if with_q else None), kv_start + iota(kv_axis)


def dlogits(p, dp, delta, tanh, *, row_axis: int):
    """dS = P ∘ (dP − D), times the soft cap's derivative 1 − tanh² when capped: the
    gradient w.r.t. scale·q·k (dQ and dK multiply by `scale` once at the end)."""
    ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [row_axis]))
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    return ds
