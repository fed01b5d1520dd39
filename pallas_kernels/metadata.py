"""The block-sparse contract shared by every kernel backend.

A kernel never sees a Mask object. It sees two things, both defined here:

* :class:`BlockMetadata` — for tile sizes ``(block_q, block_kv)`` every tile of the
  [T, S] score matrix is EMPTY (never loaded), FULL (every pair allowed: no mask work)
  or PARTIAL (the mask is evaluated inside the tile). Per q-block the forward and dQ
  kernels get the ordered kv-blocks to visit, split into a full list and a partial list;
  per kv-block the dK/dV kernel gets the transposed lists.

* mask operands (:class:`MaskOperand`, kinds in ``OPERAND_KINDS``) — the arrays (segment
  ids, a dense mask, a block layout) the kernel loads a tile of, to evaluate the mask
  function ``FlashStatic.mask_fn`` (pallas_kernels/flash_vjp.py) inside a PARTIAL tile.

Shape legend (written once): B batch, N query heads, T query length, S key length,
nQ = ceil(T / block_q), nK = ceil(S / block_kv). ``Bm`` is 1 or B and ``Hm`` is 1 or N:
metadata of a mask that is the same for every batch row / head has a leading 1 there.

Lengths that are not a multiple of the tile: the kernels pad T and S up to whole tiles.
A tile that holds padded key columns (j >= kv_len) is never FULL, so the kernel masks
the padding in it; padded query rows are never read back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp

# Tile states, ordered so that AND is min and OR is max.
EMPTY = 0
PARTIAL = 1
FULL = 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMetadata:
    """Which tiles each kernel visits.

    Fields (all int32):

    full_count      [Bm, Hm, nQ]        number of FULL kv-blocks of each q-block
    full_index      [Bm, Hm, nQ, Lf]    their kv-block indices, ascending; entries past the
                                        count repeat the last valid index (safe to prefetch)
    partial_count   [Bm, Hm, nQ]        number of PARTIAL kv-blocks of each q-block
    partial_index   [Bm, Hm, nQ, Lp]    their indices, ascending, padded the same way
    t_full_count    [Bm, Hm, nK]        transposed lists for the dK/dV pass: the FULL
    t_full_index    [Bm, Hm, nK, Lft]   q-blocks of each kv-block ...
    t_partial_count [Bm, Hm, nK]        ... and its PARTIAL q-blocks
    t_partial_index [Bm, Hm, nK, Lpt]

    Static fields: block_q, block_kv (tile sizes), q_len, kv_len (unpadded lengths), and
    facts known at trace time for static masks (for dynamic masks the safe value: False
    for the first three, True for the two isolation facts):
    full_is_run   every q-block's FULL list is a run k0, k0+1, ... (full, causal, local)
    t_full_is_run the same for the transposed FULL lists
    dense         every tile is FULL (dense attention, no kv padding)
    partial_isolates_keys     some PARTIAL tile holds a key column that no query row of
                              the tile may attend (True unless shown otherwise)
    partial_isolates_queries  some PARTIAL tile holds a query row that may attend no key
                              column of the tile (True unless shown otherwise)
    even_q_work   most q-blocks visit about as many tiles as the busiest one (the median
                  count is within a quarter of the largest: full, windows, BigBird; not
                  causal). A persistent kernel may then deal q-blocks in order without
                  unbalancing its CTAs (False unless shown)
    tile_counts   for static masks, the (FULL, PARTIAL) tile counts of every q-block,
                  int32 [Bm, Hm, nQ, 2] as bytes (encode_tile_counts / decode_tile_counts;
                  bytes hash once and compare fast in the pytree's static part); None for
                  dynamic masks or past MAX_STATIC_TILE_COUNTS q-blocks. Lets a persistent
                  kernel balance its CTAs' work when it is traced, where the count arrays
                  are tracers
    t_tile_counts the same for the transposed lists: (FULL, PARTIAL) counts of every
                  kv-block, int32 [Bm, Hm, nK, 2] as bytes (the persistent dK/dV kernel's
                  deal)
    isolated_keys  for static masks, where the key columns of the first isolation fact lie:
                   the sorted positions (int32 as bytes; encode_positions /
                   decode_positions) of every key that some PARTIAL tile holds unattended.
                   None when unknown (dynamic masks; more than MAX_ISOLATED_POSITIONS or a
                   quarter of the keys; the isolation check's budget spent): any key may be one
    isolated_queries the same for the query rows of the second fact
    Kernels zero such K/V (Q) rows inside PARTIAL tiles, so NaN/Inf held by a masked
    key (or query) cannot meet a zero probability in a dot (0 · NaN = NaN); where these
    facts are False (causal, aligned windows: every column of a PARTIAL tile has some
    row that attends it) that per-tile reduction and select are skipped.
    L* >= 1 always (an all-empty row has count 0 and index 0).
    """

    full_count: jax.Array
    full_index: jax.Array
    partial_count: jax.Array
    partial_index: jax.Array
    t_full_count: jax.Array
    t_full_index: jax.Array
    t_partial_count: jax.Array
    t_partial_index: jax.Array
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_kv: int = dataclasses.field(metadata=dict(static=True))
    q_len: int = dataclasses.field(metadata=dict(static=True))
    kv_len: int = dataclasses.field(metadata=dict(static=True))
    full_is_run: bool = dataclasses.field(default=False, metadata=dict(static=True))
    t_full_is_run: bool = dataclasses.field(default=False, metadata=dict(static=True))
    dense: bool = dataclasses.field(default=False, metadata=dict(static=True))
    partial_isolates_keys: bool = dataclasses.field(default=True, metadata=dict(static=True))
    partial_isolates_queries: bool = dataclasses.field(default=True, metadata=dict(static=True))
    even_q_work: bool = dataclasses.field(default=False, metadata=dict(static=True))
    tile_counts: bytes | None = dataclasses.field(default=None, metadata=dict(static=True))
    t_tile_counts: bytes | None = dataclasses.field(default=None, metadata=dict(static=True))
    isolated_keys: bytes | None = dataclasses.field(default=None, metadata=dict(static=True))
    isolated_queries: bytes | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_q_blocks(self) -> int:
        return self.full_count.shape[-1]

    @property
    def num_kv_blocks(self) -> int:
        return self.t_full_count.shape[-1]

    def visited_tiles(self) -> jax.Array:
        """Tiles the forward pass visits, summed over every (Bm, Hm) slice."""
        return jnp.sum(self.full_count) + jnp.sum(self.partial_count)


# Largest Bm·Hm·nQ whose tile counts BlockMetadata.tile_counts carries (65536 q-blocks:
# e.g. 8M tokens in 128-row blocks, or a per-head mask of 64 heads at 128k).
MAX_STATIC_TILE_COUNTS = 1 << 16

def encode_tile_counts(full_count, partial_count) -> bytes | None:
    """BlockMetadata.tile_counts (or t_tile_counts) of static (numpy) counts; None past
    MAX_STATIC_TILE_COUNTS."""
    if full_count.size > MAX_STATIC_TILE_COUNTS:
        return None
    return np.stack([full_count, partial_count], -1).astype(np.int32).tobytes()


def decode_tile_counts(raw: bytes, count_shape) -> np.ndarray:
    """int32 [Bm, Hm, nQ, 2] (FULL, PARTIAL) from BlockMetadata.tile_counts."""
    return np.frombuffer(raw, np.int32).reshape(*count_shape, 2)


# Most positions BlockMetadata.isolated_keys (isolated_queries) lists. A check of the
# inputs at the listed rows reads only those; past this (or a quarter of the rows) a
# read of every row costs about as much as the gather.
MAX_ISOLATED_POSITIONS = 1 << 12


def encode_positions(flags) -> bytes | None:
    """BlockMetadata.isolated_keys (or isolated_queries) from a bool vector over the
    positions; None past MAX_ISOLATED_POSITIONS or a quarter of the positions."""
    positions = np.flatnonzero(flags).astype(np.int32)
    if len(positions) > min(MAX_ISOLATED_POSITIONS, len(flags) // 4):
        return None
    return positions.tobytes()


def decode_positions(raw: bytes) -> np.ndarray:
    """int32 positions from BlockMetadata.isolated_keys (or isolated_queries)."""
    return np.frombuffer(raw, np.int32)


# Operand kinds a mask may ask the kernel to load for a tile at rows
# [q0, q0 + block_q) and columns [k0, k0 + block_kv) of batch row b, head h:
#   "q"     array [Bm, T]          -> tile [block_q, 1]         (query segment ids)
#   "kv"    array [Bm, S]          -> tile [1, block_kv]        (key segment ids)
#   "qkv"   array [Bm, Hm, T|1, S|1] -> tile [block_q, block_kv]  (dense mask, int8/bool)
#   "block" array [Bm, Hm, nBq, nBk] with layout block sizes (bq, bk) = layout_block
#                                  -> scalar layout[b, h, q0 // bq, k0 // bk]
# (Bm in {1, B}, Hm in {1, N}.) pallas_kernels.common.prepare_operands pads "q"/"kv"/"qkv"
# operands along T/S to whole tiles and turns a "block" layout whose blocks are not
# multiples of the tiles into a "qkv" operand, so kernels load exactly these tiles.
OPERAND_KINDS = ("q", "kv", "qkv", "block")


@dataclasses.dataclass(frozen=True)
class MaskOperand:
    """One array a mask needs inside its PARTIAL tiles, and how the kernel loads it."""
    kind: str
    array: Any
    layout_block: tuple[int, int] | None = None  # (bq, bk) for kind "block"

    def __post_init__(self):
        if self.kind not in OPERAND_KINDS:
            raise ValueError(f"operand kind must be one of {OPERAND_KINDS}, got {self.kind!r}")
