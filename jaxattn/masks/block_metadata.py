"""From a Mask and tile sizes to the kernels' BlockMetadata (pallas_kernels/metadata.py).

Static masks: numpy at trace time, cached per (mask, lengths, tiles); the tile states
come from each mask's arithmetic, so a 128k × 128k mask at 128 × 128 tiles costs a
[1024, 1024] int8 grid, never the dense matrix. Dynamic masks (segment ids, traced
dense masks): the same steps in jnp, jittable, with the list length fixed at nK.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import jax.numpy as jnp

from pallas_kernels.metadata import (FULL, PARTIAL, BlockMetadata, encode_positions,
                                     encode_tile_counts)
from jaxattn.masks.base import AndMask, Mask
from jaxattn.masks.data import DenseMask
from jaxattn.masks.structured import CausalMask, FullMask, LocalMask


def canonical_mask(mask=None, *, is_causal: bool = False, local_window_size=None) -> Mask:
    """One Mask from the public arguments: mask (None | bool array | Mask) AND the
    `is_causal` and `local_window_size` shorthands."""
    if mask is None:
        parts = []
    elif isinstance(mask, Mask):
        parts = [mask]
    else:
        parts = [DenseMask(mask)]
    if is_causal:
        parts.append(CausalMask())
    if local_window_size is not None:
        left, right = _window(local_window_size)
        parts.append(LocalMask(left, right))
    parts = [p for p in parts if not isinstance(p, FullMask)]
    if not parts:
        return FullMask()
    out = parts[0]
    for p in parts[1:]:
        out = AndMask.of(out, p)
    return out


def _window(w):
    if isinstance(w, (int, np.integer)) and not isinstance(w, bool):
        w = (int(w), int(w))
    if (not isinstance(w, (tuple, list)) or len(w) != 2
            or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in w)):
        raise ValueError(f"local_window_size must be an int or a (left, right) pair of ints, got {w!r}. "
                         "Example: local_window_size=(256, 0) for a causal window of 256 past keys.")
    if w[0] < 0 or w[1] < 0:
        raise ValueError(f"local_window_size must be non-negative, got {tuple(w)}. "
                         "Pass the number of keys visible on each side, e.g. (128, 0).")
    return int(w[0]), int(w[1])


def tile_states(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int):
    """int8 [Bm, Hm, nQ, nK] with tiles holding padded key columns demoted from FULL."""
    state = mask.tile_state(q_len, kv_len, block_q, block_kv)
    xp = np if isinstance(state, np.ndarray) else jnp
    while state.ndim < 4:
        state = state[None]
    if kv_len % block_kv:
        last_col = (xp.arange(state.shape[-1]) == state.shape[-1] - 1).reshape(1, 1, 1, -1)
        state = xp.where(last_col & (state == FULL), PARTIAL, state).astype(xp.int8)
    return state


def _lists(selected, length, xp):
    """Ascending indices of the True entries along the last axis, padded to `length`
    by repeating the last valid index; and their counts."""
    count = selected.sum(-1).astype(xp.int32)
    if xp is np:
        order = np.argsort(~selected, axis=-1, kind="stable")[..., :length]
    else:
        order = jnp.argsort(~selected, axis=-1, stable=True)[..., :length]
    last = xp.take_along_axis(order, xp.maximum(count - 1, 0)[..., None], axis=-1)
    pos = xp.arange(length).reshape((1,) * count.ndim + (length,))  # rank of index (no promotion)
    index = xp.where(pos < count[..., None], order, last)
    index = xp.where(count[..., None] > 0, index, 0)
    return count, index.astype(xp.int32)


def _metadata_from_states(state, q_len, kv_len, block_q, block_kv, xp):
    full, partial = state == FULL, state == PARTIAL
    t_full, t_partial = xp.swapaxes(full, -1, -2), xp.swapaxes(partial, -1, -2)
    if xp is np:
        def length(sel):
            return max(1, int(sel.sum(-1).max(initial=0)))
    else:
        def length(sel):
            return max(1, sel.shape[-1])
    fc, fi = _lists(full, length(full), xp)
    pc, pi = _lists(partial, length(partial), xp)
    tfc, tfi = _lists(t_full, length(t_full), xp)
    tpc, tpi = _lists(t_partial, length(t_partial), xp)
    facts = {}
    if xp is np:
        facts = dict(full_is_run=_lists_are_runs(fc, fi), t_full_is_run=_lists_are_runs(tfc, tfi),
                     dense=bool(np.all(full)), even_q_work=_even_work(fc + pc),
                     tile_counts=encode_tile_counts(fc, pc),
                     t_tile_counts=encode_tile_counts(tfc, tpc))
    return BlockMetadata(fc, fi, pc, pi, tfc, tfi, tpc, tpi, block_q=block_q, block_kv=block_kv,
                         q_len=q_len, kv_len=kv_len, **facts)


def _even_work(count) -> bool:
    """True when the median q-block visits at least 3/4 of the tiles of the busiest one."""
    return bool(4 * np.median(count) >= 3 * count.max(initial=0))


def _lists_are_runs(count, index) -> bool:
    """True when every list is a run of consecutive blocks (index[t] = index[0] + t)."""
    steps = np.arange(index.shape[-1])
    return bool(np.all((index - index[..., :1] == steps) | (steps >= count[..., None])))


# Mask evaluations the isolation check may spend (PARTIAL tiles × tile size, in chunks
# of ISOLATION_CHUNK); past it the check answers "may isolate" (safe, a little slower
# on PARTIAL tiles).
ISOLATION_CHECK_PAIRS = 1 << 26
ISOLATION_CHUNK = 1 << 22


def _tile_operand_values(operands, q_pos, kv_pos):
    """Static (numpy) mask operands at the positions of a stack of tiles: q_pos
    [1, 1, P, bq, 1] and kv_pos [1, 1, P, 1, bk] (clipped to the real lengths) give
    values broadcastable to [Bm, Hm, P, bq, bk]."""
    q, kv = q_pos[0, 0], kv_pos[0, 0]
    values = []
    for op in operands:
        a = np.asarray(op.array)
        if op.kind == "block":
            lbq, lbk = op.layout_block
            values.append(a[..., q // lbq, kv // lbk])
        elif op.kind == "q":
            values.append(a[:, q][:, None])
        elif op.kind == "kv":
            values.append(a[:, kv][:, None])
        else:   # "qkv" [Bm, Hm, T|1, S|1]
            qi = q if a.shape[-2] > 1 else np.zeros_like(q)
            ki = kv if a.shape[-1] > 1 else np.zeros_like(kv)
            values.append(a[..., qi, ki])
    return tuple(values)


def partial_tiles_isolate(mask: Mask, state, q_len: int, kv_len: int, block_q: int,
                          block_kv: int):
    """(keys, queries, lone_keys, lone_queries): whether some PARTIAL tile of `state`
    [Bm, Hm, nQ, nK] holds a key column that no query row of the tile may attend, and
    whether one holds a query row that may attend no key column of the tile; then which
    keys (bool [kv_len]) and which queries (bool [q_len]) are such a column or row in at
    least one PARTIAL tile (of any batch row or head). Exact: the mask (static, numpy
    operands) is evaluated on every PARTIAL tile, chunk by chunk; a check that would
    pass ISOLATION_CHECK_PAIRS answers (True, True, None, None): may isolate, anywhere.
    Padded rows and columns hold zeros, not user data, and are left out."""
    partial = state == PARTIAL
    tiles = np.argwhere(np.any(partial, axis=(0, 1)))                # [P, 2] (q-block, kv-block)
    lone_key_at, lone_query_at = np.zeros(kv_len, bool), np.zeros(q_len, bool)
    if len(tiles) == 0:
        return False, False, lone_key_at, lone_query_at
    bm, hm = state.shape[:2]
    if len(tiles) * bm * hm * block_q * block_kv > ISOLATION_CHECK_PAIRS:
        return True, True, None, None
    rows = np.arange(block_q)[None, :, None]
    cols = np.arange(block_kv)[None, None, :]
    operands = mask.operands()
    chunk = max(1, ISOLATION_CHUNK // (bm * hm * block_q * block_kv))
    for start in range(0, len(tiles), chunk):
        part = tiles[start:start + chunk]
        q_pos = (part[:, 0, None, None] * block_q + rows)[None, None]     # [1, 1, p, bq, 1]
        kv_pos = (part[:, 1, None, None] * block_kv + cols)[None, None]   # [1, 1, p, 1, bk]
        values = _tile_operand_values(operands, np.minimum(q_pos, q_len - 1),
                                      np.minimum(kv_pos, kv_len - 1))
        allowed = np.asarray(mask.evaluate(q_pos.astype(np.int32), kv_pos.astype(np.int32), values),
                             bool)
        allowed = allowed & (q_pos < q_len) & (kv_pos < kv_len)           # padding attends nothing
        allowed = np.broadcast_to(allowed, (bm, hm) + allowed.shape[2:])
        here = partial[:, :, part[:, 0], part[:, 1]]                      # [Bm, Hm, p]
        lone_keys = ~allowed.any(axis=3) & (kv_pos[:, :, :, 0] < kv_len)   # [Bm, Hm, p, bk]
        lone_queries = ~allowed.any(axis=4) & (q_pos[..., 0] < q_len)      # [Bm, Hm, p, bq]
        lone_keys = np.any(lone_keys & here[..., None], axis=(0, 1))       # [p, bk]
        lone_queries = np.any(lone_queries & here[..., None], axis=(0, 1))  # [p, bq]
        lone_key_at[kv_pos[0, 0, :, 0][lone_keys]] = True
        lone_query_at[q_pos[0, 0, :, :, 0][lone_queries]] = True
    return bool(lone_key_at.any()), bool(lone_query_at.any()), lone_key_at, lone_query_at


@functools.lru_cache(maxsize=256)
def _static_metadata(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int):
    state = tile_states(mask, q_len, kv_len, block_q, block_kv)
    meta = _metadata_from_states(state, q_len, kv_len, block_q, block_kv, np)
    keys, queries, key_at, query_at = partial_tiles_isolate(mask, state, q_len, kv_len, block_q,
                                                            block_kv)
    return dataclasses.replace(
        meta, partial_isolates_keys=keys, partial_isolates_queries=queries,
        isolated_keys=None if key_at is None else encode_positions(key_at),
        isolated_queries=None if query_at is None else encode_positions(query_at))


def build_block_metadata(mask: Mask, q_len: int, kv_len: int, block_q: int,
                         block_kv: int) -> BlockMetadata:
    """Block metadata for `mask` at tiles (block_q, block_kv). numpy arrays (cached) for
    static masks, jnp arrays (traceable) for dynamic ones."""
    if not mask.is_dynamic:
        return _static_metadata(mask, q_len, kv_len, block_q, block_kv)
    state = tile_states(mask, q_len, kv_len, block_q, block_kv)
    return _metadata_from_states(jnp.asarray(state), q_len, kv_len, block_q, block_kv, jnp)


def dense_tile_states(dense: np.ndarray, block_q: int, block_kv: int) -> np.ndarray:
    """Tile states straight from a dense [T, S] bool matrix (the oracle the tests hold
    the arithmetic to)."""
    t, s = dense.shape
    return np.asarray(DenseMask(np.asarray(dense)).tile_state(t, s, block_q, block_kv))[0, 0]
