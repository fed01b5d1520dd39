"""What the Mosaic GPU forward reads per tile besides Q, K and V: the additive bias
and dense ("qkv") mask operands.

The bias [Bb, Hb, T|1, S|1] (Bb in {1, B}, Hb in {1, N}) takes one of three routes:

* "tile" ([.., T, S]): for every listed K/V tile the producer warpgroup also copies the
  bias rows of the CTA's 128 queries by TMA, one [64, block_kv] half per consumer
  warpgroup, into its own shared-memory slots (one ready barrier per half, released
  by both consumers). Each consumer loads its half in the wgmma accumulator layout.
* "col" ([.., 1, S]): a per-key vector (float32 [Bb, Hb, S]), read like a "kv" mask
  operand: `block_kv` values, one per accumulator column, at the tile's kv-block.
* "row" ([.., T|1, 1]): a per-query vector (float32 [Bb, Hb, T]), read once per work
  item like a "q" operand: one value per accumulator row.

A rank-1 bias is broadcast over the tile in registers only; it is never materialised
as [T, S] in memory. Every tile, FULL or PARTIAL, gets its bias as
``scale·q·k + bias``, ahead of the soft cap and of the mask's select (the order of
jaxattn/reference.py): the kernel then runs with scale 1 in its exp2 fold, so the
bias meets the scores in logit units whatever the sign or size of the scale.

A dense "qkv" mask operand (int8 [Bm, Hm, T, S], 1 byte per pair) is copied by TMA
like a "tile" bias, but only for PARTIAL tiles (FULL tiles need no mask values), into
slots of its own counted over the CTA's PARTIAL steps. A block-sparse layout whose
blocks the tiles do not divide becomes such an operand (pallas_kernels.common.prepare_operands).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import pad_axis, prepare_bias
from pallas_kernels.mosaic_gpu.config import CONSUMER_WARPGROUPS, ROWS_PER_WARPGROUP

_WGMMA = plgpu.Layout.WGMMA
_WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)
_WGMMA_COL = plgpu.Layout.WGMMA.reduce(0)


def swizzled_smem(shape, dtype):
    """Shared memory laid out for TMA and the wgmma layout: (8, swizzle / itemsize)
    element tiles, the widest swizzle (128, 64 or 32 bytes) a row of the tile fills."""
    swizzle = plgpu.find_swizzle(shape[-1] * jnp.dtype(dtype).itemsize * 8)
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle)))


def bias_route(bias_shape) -> str | None:
    """"tile", "col" or "row" for a 4-d bias shape (module docstring), None for no bias."""
    if bias_shape is None:
        return None
    t_full, s_full = bias_shape[2] > 1, bias_shape[3] > 1
    if t_full and s_full:
        return "tile"
    return "col" if s_full else "row"


def prepare_forward_bias(bias, *, q_pad: int, kv_pad: int):
    """(route, array) as the kernel reads the bias: "tile" zero padded to whole tiles in
    its own dtype (float64 as float32); "col" / "row" as float32 vectors [Bb, Hb, L]
    zero padded to L = kv_pad / q_pad (a [.., 1, 1] bias becomes a row vector)."""
    route = bias_route(None if bias is None else bias.shape)
    if route is None:
        return None, None
    if route == "tile":
        return route, prepare_bias(bias, q_pad, kv_pad, jnp.float32)
    if route == "col":
        return route, pad_axis(bias[:, :, 0, :].astype(jnp.float32), 2, kv_pad)
    rows = jnp.broadcast_to(bias[:, :, :, 0], (*bias.shape[:2], q_pad if bias.shape[2] == 1
                                                else bias.shape[2]))
    return route, pad_axis(rows.astype(jnp.float32), 2, q_pad)


# Shared memory a stream needs per slot beyond the tile: its ready and consumed barriers
# (8 bytes each). Buffer alignment is left to the 1024-byte slack of MosaicConfig.smem_bytes;
# the tightest plans (a bf16 bias and a dense mask at head dim 128, 1.5 KB to spare) were
# allocated on an H200 (2026-11-30), and lowering itself refuses a layout past 227 KB.
BARRIER_BYTES_PER_SLOT = 2 * 8


@dataclasses.dataclass(frozen=True)
class TileStream:
    """A [Bm, Hm, Tp, Sp] array copied tile by tile into `slots` shared-memory slots:
    slot c % slots holds the c-th tile the CTA copies; each consumer warpgroup's
    64-row half has a ready barrier, and a slot is refilled once both consumers
    released it. `dtype` and `block_kv` size the slots."""

    dtype: object
    block_kv: int
    slots: int

    def scratch_types(self):
        shape = (self.slots, CONSUMER_WARPGROUPS, ROWS_PER_WARPGROUP, self.block_kv)
        return (swizzled_smem(shape, self.dtype),
                plgpu.Barrier(num_barriers=self.slots * CONSUMER_WARPGROUPS),
                plgpu.Barrier(num_arrivals=CONSUMER_WARPGROUPS, num_barriers=self.slots))

    def smem_bytes(self) -> int:
        """Its slots and their barriers."""
        return self.slots * (CONSUMER_WARPGROUPS * ROWS_PER_WARPGROUP * self.block_kv
                             * jnp.dtype(self.dtype).itemsize + BARRIER_BYTES_PER_SLOT)

    @staticmethod
    def copy(ref, scratch, count, slots, batch, head, cta_start, kv_start):
        """Producer: the tile at (cta_start, kv_start) of (batch, head) into the slot of
        copy number `count`, after both consumers released that slot's previous tile."""
        smem, ready, consumed = scratch
        slot = lax.rem(count, slots)

        @pl.when(count >= slots)
        def _():
            plgpu.barrier_wait(consumed.at[slot])

        bm = batch if ref.shape[0] > 1 else 0
        hm = head if ref.shape[1] > 1 else 0
        for half in range(CONSUMER_WARPGROUPS):
            rows = pl.ds(cta_start + half * ROWS_PER_WARPGROUP, ROWS_PER_WARPGROUP)
            plgpu.copy_gmem_to_smem(ref.at[bm, hm, rows, pl.ds(kv_start, smem.shape[-1])],
                                    smem.at[slot, half],
                                    ready.at[slot * CONSUMER_WARPGROUPS + half])

    @staticmethod
    def take(scratch, count, slots, wg):
        """Consumer `wg`: its [64, block_kv] half of copy number `count`, in the wgmma
        accumulator layout; the slot is released at once (the values are in registers)."""
        smem, ready, consumed = scratch
        slot = lax.rem(count, slots)
        plgpu.barrier_wait(ready.at[slot * CONSUMER_WARPGROUPS + wg])
        tile = plgpu.load(smem.at[slot, wg], layout=_WGMMA)
        plgpu.barrier_arrive(consumed.at[slot])
        return tile


@dataclasses.dataclass(frozen=True)
class TileInputs:
    """The bias and dense mask operands of one forward call, as the kernel reads them.

    bias_route: None, "tile", "col" or "row"; bias_scale: the call's scale (the kernel
    then folds scale 1 into its exp2); bias_stream / dense_streams: the TMA slots of a
    "tile" bias and of each "qkv" operand; dense_positions: where the "qkv" operands
    sit among the mask operands."""

    bias_route: str | None = None
    bias_scale: float = 1.0
    bias_stream: TileStream | None = None
    dense_streams: tuple[TileStream, ...] = ()
    dense_positions: tuple[int, ...] = ()

    def streams(self):
        return ((self.bias_stream,) if self.bias_stream else ()) + self.dense_streams

    def scratch_types(self):
        return tuple(s.scratch_types() for s in self.streams())

    def smem_bytes(self) -> int:
        return sum(s.smem_bytes() for s in self.streams())

    def bind(self, bias_ref, dense_refs, scratch) -> "BoundTileInputs":
        scratch = list(scratch)
        bias_scratch = scratch.pop(0) if self.bias_stream else None
        return BoundTileInputs(self, bias_ref, tuple(dense_refs), bias_scratch, tuple(scratch))


@dataclasses.dataclass(frozen=True)
class BoundTileInputs:
    """TileInputs bound to the kernel's refs and scratch: what the producer copies and
    what the consumers add or hand to the mask."""

    spec: TileInputs
    bias_ref: object
    dense_refs: tuple
    bias_scratch: tuple | None
    dense_scratch: tuple

    # ---- producer ------------------------------------------------------------
    def copy_step(self, step_count, partial_count, is_partial, batch, head, cta_start, kv_start):
        """Copies for one listed tile: the "tile" bias on every step (copy number
        `step_count`), each dense mask operand on PARTIAL steps (copy `partial_count`)."""
        if self.bias_scratch is not None:
            TileStream.copy(self.bias_ref, self.bias_scratch, step_count, self.spec.bias_stream.slots,
                            batch, head, cta_start, kv_start)
        if self.dense_refs:
            @pl.when(is_partial)
            def _():
                for ref, scratch, stream in zip(self.dense_refs, self.dense_scratch,
                                                self.spec.dense_streams):
                    TileStream.copy(ref, scratch, partial_count, stream.slots, batch, head,
                                    cta_start, kv_start)

    # ---- consumers -----------------------------------------------------------
    def row_bias(self, batch, head, q_start):
        """A "row" bias's values for this warpgroup's 64 rows (once per work item), or None."""
        if self.spec.bias_route != "row":
            return None
        return _vector(self.bias_ref, batch, head, q_start, ROWS_PER_WARPGROUP, _WGMMA_ROW)

    @property
    def reads_key_vector(self) -> bool:
        """Whether each tile needs its kv start for a "col" bias (col_bias)."""
        return self.spec.bias_route == "col"

    def col_bias(self, batch, head, kv_start, block_kv: int):
        """A "col" bias's values for the tile's `block_kv` keys (issued ahead of QKᵀ so
        the global load overlaps the wgmma), or None."""
        if self.spec.bias_route != "col":
            return None
        return _vector(self.bias_ref, batch, head, kv_start, block_kv, _WGMMA_COL)

    def add_bias(self, s, *, step_count, wg, row_values, col_values):
        """Raw scores q·k → scale·q·k + bias of this tile ([64, block_kv], wgmma layout);
        unchanged without a bias. row_values / col_values: from row_bias / col_bias."""
        route = self.spec.bias_route
        if route is None:
            return s
        if route == "tile":
            bias = TileStream.take(self.bias_scratch, step_count, self.spec.bias_stream.slots,
                                   wg).astype(jnp.float32)
        elif route == "col":
            bias = lax.broadcast_in_dim(col_values, s.shape, [1])
        else:
            bias = lax.broadcast_in_dim(row_values, s.shape, [0])
        return s * self.spec.bias_scale + bias

    def dense_tiles(self, partial_count, wg):
        """Each "qkv" operand's [64, block_kv] tile of this PARTIAL step (int32, wgmma
        layout), in operand order."""
        return tuple(TileStream.take(scratch, partial_count, stream.slots, wg).astype(jnp.int32)
                     for scratch, stream in zip(self.dense_scratch, self.spec.dense_streams))


def _vector(ref, batch, head, start, size: int, layout):
    """`size` float32 values of a [Bb, Hb, L] bias vector from `start`, in `layout`."""
    bm = batch if ref.shape[0] > 1 else 0
    hm = head if ref.shape[1] > 1 else 0
    return plgpu.load(ref.at[bm, hm, pl.ds(start, size)], layout=layout, optimized=False)


def plan_tile_inputs(*, bias_route, bias_dtype, bias_scale, dense_positions, block_kv, stages,
                     budget: int) -> TileInputs:
    """Slots for the TMA-copied inputs within `budget` bytes of shared memory: `stages`
    slots each when they fit, otherwise the bias's (the largest) first reduced, then the
    dense operands', down to one slot each. NotImplementedError when one slot each does
    not fit."""
    bias_slots = stages if bias_route == "tile" else 0
    dense_slots = [stages] * len(dense_positions)

    def make():
        return TileInputs(
            bias_route=bias_route, bias_scale=bias_scale,
            bias_stream=TileStream(bias_dtype, block_kv, bias_slots) if bias_slots else None,
            dense_streams=tuple(TileStream(jnp.int8, block_kv, n) for n in dense_slots),
            dense_positions=tuple(dense_positions))

    plan = make()
    while plan.smem_bytes() > budget:
        if bias_slots > 1:
            bias_slots -= 1
        elif any(n > 1 for n in dense_slots):
            i = max(range(len(dense_slots)), key=lambda j: dense_slots[j])
            dense_slots[i] -= 1
        else:
            raise NotImplementedError(
                f"the Mosaic GPU forward's shared memory cannot hold one slot of each tile "
                f"input: expected at most {budget} bytes beside Q, K and V, got "
                f"{plan.smem_bytes()} for a {jnp.dtype(bias_dtype).name if bias_route == 'tile' else 'no'} "
                f"[T, S] bias and {len(dense_positions)} dense mask(s) at block_kv {block_kv}. "
                f"A bfloat16 bias halves its tiles; implementation=None or 'pallas_triton' "
                f"runs the call on the Triton kernels")
        plan = make()
    return plan

