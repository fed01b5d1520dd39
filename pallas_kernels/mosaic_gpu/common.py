"""Tile lists and mask operands as the Mosaic GPU kernels read them.

The block metadata (pallas_kernels/metadata.py) reaches the kernel as four int32 arrays
in global memory: per (batch row, head, q-block) a FULL count and list and a PARTIAL
count and list. A kernel walks "steps": step 0 .. num_full-1 are the FULL tiles, step
num_full .. total-1 the PARTIAL ones, in list order. The producer warpgroup turns a
step into the kv-block its TMA copy starts at; the consumers only need the kv-block of
PARTIAL steps (for the mask positions).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.metadata import BlockMetadata
from pallas_kernels.common import LN2, LOG2E, MASK_VALUE, pad_btnh

__all__ = ["LN2", "LOG2E", "MASK_VALUE", "pad_btnh", "padded_head_dim", "num_sms", "TileLists",
           "OperandRef", "prepare_operands"]


def num_sms() -> int:
    """Streaming multiprocessors of the GPU (132 on an H100/H200 SXM when unknown, e.g.
    when lowering for an abstract device)."""
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0) or 132) if device.platform == "gpu" else 132


def padded_head_dim(h: int) -> int:
    """Head dim the kernels run at: 64, 128 or 256 (a 128-byte swizzled row of 16-bit
    values holds 64 elements; wgmma's K is a multiple of 64)."""
    for size in (64, 128, 256):
        if h <= size:
            return size
    raise NotImplementedError(f"head dim {h} > 256 is not supported by the Mosaic GPU kernels")


@dataclasses.dataclass(frozen=True)
class TileLists:
    """The forward tile lists of one BlockMetadata, as kernel inputs (arrays) or, once
    bound to the kernel's refs, as something to read (`walker`)."""

    full_count: object
    full_index: object
    partial_count: object
    partial_index: object
    full_is_run: bool

    @classmethod
    def from_metadata(cls, meta: BlockMetadata) -> "TileLists":
        as_i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
        return cls(as_i32(meta.full_count), as_i32(meta.full_index), as_i32(meta.partial_count),
                   as_i32(meta.partial_index), meta.full_is_run)

    def arrays(self):
        return (self.full_count, self.full_index, self.partial_count, self.partial_index)

    def bind(self, refs) -> "TileLists":
        return dataclasses.replace(self, full_count=refs[0], full_index=refs[1],
                                   partial_count=refs[2], partial_index=refs[3])

    def walker(self, batch, head, q_block) -> "_Walker":
        # Metadata has a leading 1 on the batch/head axis when the mask does not vary there.
        bm = batch if self.full_count.shape[0] > 1 else 0
        hm = head if self.full_count.shape[1] > 1 else 0
        return _Walker(self, (bm, hm, q_block))


class _Walker:
    """Steps of one (batch row, head, q-block): counts and kv-block per step."""

    def __init__(self, lists: TileLists, at):
        self.lists, self.at = lists, at
        self.num_full = lists.full_count[at]
        self.total = self.num_full + lists.partial_count[at]
        # full, causal, windows: every FULL list is one run k0, k0 + 1, ...
        self.first_full = lists.full_index[(*at, 0)] if lists.full_is_run else None

    def full_block(self, step):
        lists = self.lists
        if lists.full_is_run:
            return self.first_full + step
        last = lists.full_index.shape[-1] - 1
        return lists.full_index[(*self.at, jnp.minimum(step, last))]

    def partial_block(self, step):
        last = self.lists.partial_index.shape[-1] - 1
        return self.lists.partial_index[(*self.at, jnp.clip(step - self.num_full, 0, last))]

    def kv_block(self, step):
        """kv-block of any step (FULL or PARTIAL): what the producer copies."""
        return lax.select(step < self.num_full, self.full_block(step), self.partial_block(step))


@dataclasses.dataclass(frozen=True)
class OperandRef:
    """A mask operand in global memory and how the forward reads it for a PARTIAL tile
    (kinds: pallas_kernels/metadata.py). "block" (a layout whose blocks the kernel tiles
    divide) is one scalar per tile; "q" and "kv" (per-token vectors such as segment ids,
    padded by `prepare_operands`) are read as one value per accumulator row or column
    and broadcast over the tile by the caller. Dense "qkv" operands are copied by TMA
    (tile_inputs.py), not read through this class."""

    ref: object
    kind: str
    layout_block: tuple[int, int] | None

    def tile(self, batch, head, q_start, kv_start):
        """The "block" operand's scalar for the tile at (q_start, kv_start)."""
        assert self.kind == "block", self.kind
        lbq, lbk = self.layout_block
        bm = batch if self.ref.shape[0] > 1 else 0
        hm = head if self.ref.shape[1] > 1 else 0
        return self.ref[bm, hm, q_start // lbq, kv_start // lbk]

    def vector(self, batch, start, size: int, layout):
        """`size` consecutive values of a "q" or "kv" operand from `start`, in `layout`
        (one value per row, or per column, of the wgmma accumulator)."""
        assert self.kind in ("q", "kv"), self.kind
        bm = batch if self.ref.shape[0] > 1 else 0
        return plgpu.load(self.ref.at[bm, pl.ds(start, size)], (), layout=layout, optimized=False)


def prepare_operands(operands, kinds, *, q_pad: int, kv_pad: int):
    """Operand arrays as the backward kernels read them: int32, "q" / "kv" ids
    zero-padded to the padded lengths (padded keys are masked by kv_len, padded queries
    dropped). (The forward, which also reads dense "qkv" tiles, prepares its operands with
    pallas_kernels.common.prepare_operands.)"""
    prepared = []
    for (kind, _), arr in zip(kinds, operands):
        arr = jnp.asarray(arr).astype(jnp.int32)
        if kind in ("q", "kv"):
            length = q_pad if kind == "q" else kv_pad
            arr = jnp.pad(arr, [(0, 0), (0, length - arr.shape[1])])
        prepared.append(arr)
    return tuple(prepared)
