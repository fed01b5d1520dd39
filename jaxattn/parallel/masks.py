"""Masks in the local coordinates of one shard-pair computation (ring attention).

A Mask speaks absolute positions. A device of a ring computes its query rows against a
remote K/V shard; with zigzag placement each side is a concatenation of "pieces"
(global_start, length). ``localize(mask, q_pieces, kv_pieces)`` returns a Mask over
local positions (i, j) equal to mask(map_q(i), map_kv(j)), or None when no pair is
allowed; every offset is a static int (jaxattn.parallel unrolls the ring, so each
(device, step) pair is known at trace time):

* CausalMask / LocalMask / StridedMask over one contiguous piece: the same mask with
  ``offset + q_start - kv_start``;
* SegmentMask / DenseMask: the ids / rows / columns of the pieces, gathered (traced
  data stays traced);
* BlockSparseMask: its layout re-gridded at gcd(block, offsets): exact and static;
* And / Or: part by part, dropping parts that are statically empty or full;
* several pieces for a position mask: one static mask reproducing every piece pair if
  there is one (zigzag causal -> CausalMask() or FullMask()), else ``PiecewiseView``,
  which evaluates the inner mask at mapped positions (element-wise ``where`` on static
  piece bounds, so it runs inside kernels) and takes its tile states from the inner
  mask's own arithmetic tile states on a gcd sub-grid.

So every Mask, including ones added later, is handled exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import jax
import jax.numpy as jnp

from pallas_kernels.metadata import EMPTY, FULL, MaskOperand
from jaxattn.masks import (AndMask, BlockSparseMask, CausalMask, DenseMask, FullMask,
                           LocalMask, Mask, OrMask, SegmentMask, StridedMask)
from jaxattn.masks.base import full_operand_view, states_from

__all__ = ["localize", "shift", "merge_pieces", "PiecewiseView"]


def merge_pieces(pieces):
    """Drop empty pieces and join globally adjacent ones: ((0, 4), (4, 2)) -> ((0, 6),)."""
    out = []
    for g, n in pieces:
        if n <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == g:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((g, n))
    return tuple(out)


def _local_starts(pieces):
    return tuple(int(x) for x in np.cumsum([0] + [n for _, n in pieces])[:-1])


def _length(pieces):
    return sum(n for _, n in pieces)


def _global_index(pieces) -> np.ndarray:
    return np.concatenate([np.arange(g, g + n) for g, n in pieces]).astype(np.int32)


def _take_pieces(arr, pieces, axis):
    """arr restricted to the pieces along `axis` (static slices, concatenated)."""
    xp = np if isinstance(arr, np.ndarray) else jnp
    parts = [arr[(slice(None),) * (axis % arr.ndim) + (slice(g, g + n),)] for g, n in pieces]
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=axis)


def _granule(block, pieces):
    """Largest g dividing `block`, every global piece start and every local start: a
    g-aligned local sub-block then maps to one g-aligned global sub-block."""
    g = block
    for x in [s for s, _ in pieces] + list(_local_starts(pieces)):
        g = math.gcd(g, int(x))
    return max(g, 1)


def _map_positions(pos, pieces):
    """Local positions -> global, element-wise on static piece bounds (kernel-safe)."""
    where = np.where if isinstance(pos, np.ndarray) else jnp.where
    out = pos + pieces[0][0]
    for (g, _), start in zip(pieces[1:], _local_starts(pieces)[1:]):
        out = where(pos >= start, pos + (g - start), out)
    return out


def _localize_operand(op: MaskOperand, qp, kp) -> MaskOperand:
    if op.kind == "q":
        return MaskOperand("q", _take_pieces(op.array, qp, 1))
    if op.kind == "kv":
        return MaskOperand("kv", _take_pieces(op.array, kp, 1))
    if op.kind == "qkv":
        a = op.array
        a = _take_pieces(a, qp, 2) if a.shape[2] > 1 else a
        a = _take_pieces(a, kp, 3) if a.shape[3] > 1 else a
        return MaskOperand("qkv", a)
    lay, (bq, bk) = _regrid(op.array, op.layout_block, qp, kp)
    return MaskOperand("block", lay, (bq, bk))


def _regrid(layout, layout_block, qp, kp):
    """A block layout [..., nBq, nBk] of blocks (bq, bk), as seen by the local pieces, at
    blocks (gq, gk) = gcd with every piece offset: exact."""
    bq, bk = layout_block
    gq, gk = _granule(bq, qp), _granule(bk, kp)
    rows = _global_index(qp)[::gq] // bq
    cols = _global_index(kp)[::gk] // bk
    xp = np if isinstance(layout, np.ndarray) else jnp
    return xp.asarray(layout)[..., rows[:, None], cols[None, :]], (gq, gk)


@functools.lru_cache(maxsize=256)
def _global_states(inner: Mask, q_end: int, kv_end: int, gq: int, gk: int) -> np.ndarray:
    return np.asarray(inner.tile_state(q_end, kv_end, gq, gk))


class PiecewiseView(Mask):
    """inner evaluated at (map_q(i), map_kv(j)) for local positions i, j, where the maps
    send local positions through static pieces (global_start, length). The general
    fallback of `localize`: exact for every Mask.

    PiecewiseView(CausalMask(), q_pieces=((0, 2), (4, 2)), kv_pieces=((0, 6),)): local rows
    0..3 are global rows 0, 1, 4, 5:

    1 0 0 0 0 0
    1 1 0 0 0 0
    1 1 1 1 1 0
    1 1 1 1 1 1
    """

    def __init__(self, inner: Mask, q_pieces, kv_pieces):
        self.inner, self.q_pieces, self.kv_pieces = inner, tuple(q_pieces), tuple(kv_pieces)
        self._operands = tuple(_localize_operand(o, self.q_pieces, self.kv_pieces)
                               for o in inner.operands())

    @property
    def is_dynamic(self):  # type: ignore[override]
        return self.inner.is_dynamic

    def operands(self):
        return self._operands

    def batch_heads(self):
        return self.inner.batch_heads()

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        return self.inner.evaluate(_map_positions(q_pos, self.q_pieces),
                                   _map_positions(kv_pos, self.kv_pieces), operand_values)

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        if self.is_dynamic:  # unknown traced mask: states from its dense local evaluation
            qpos = jnp.arange(q_len, dtype=jnp.int32)[:, None]
            kpos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
            vals = tuple(full_operand_view(o, q_len, kv_len) for o in self._operands)
            bm, hm = self.batch_heads()
            dense = jnp.broadcast_to(self.evaluate(qpos, kpos, vals), (bm, hm, q_len, kv_len))
            return DenseMask(dense).tile_state(q_len, kv_len, block_q, block_kv)
        # The inner mask's own tile states on a sub-grid fine enough that every local
        # sub-block is one global sub-block; a local tile is FULL (EMPTY) iff all of its
        # sub-blocks are. (A sub-block clipped at a piece end maps to a superset of
        # its rows: its FULL/EMPTY still holds for the subset, so this stays sound.)
        gq, gk = _granule(block_q, self.q_pieces), _granule(block_kv, self.kv_pieces)
        q_end = max(g + n for g, n in self.q_pieces)
        k_end = max(g + n for g, n in self.kv_pieces)
        grid = _global_states(self.inner, q_end, k_end, gq, gk)
        rows = _global_index(self.q_pieces)[:q_len:gq] // gq
        cols = _global_index(self.kv_pieces)[:kv_len:gk] // gk
        sub = grid[..., rows[:, None], cols[None, :]]
        rq, rk = block_q // gq, block_kv // gk
        nq, nk = -(-sub.shape[-2] // rq), -(-sub.shape[-1] // rk)
        pad = [(0, 0)] * (sub.ndim - 2) + [(0, nq * rq - sub.shape[-2]), (0, nk * rk - sub.shape[-1])]
        def all_tiles(value):
            x = np.pad(sub == value, pad, constant_values=True)
            x = x.reshape(*x.shape[:-2], nq, rq, nk, rk)
            return x.all(axis=(-3, -1))
        return states_from(all_tiles(FULL), all_tiles(EMPTY))

    def _key(self):
        if self.is_dynamic:
            return (id(self),)
        return (self.inner, self.q_pieces, self.kv_pieces)

    def __repr__(self):
        return f"PiecewiseView({self.inner!r}, q={self.q_pieces}, kv={self.kv_pieces})"


def _view_flatten(m):
    if not m.is_dynamic:
        return (), m
    return tuple(o.array for o in m._operands), m


def _view_unflatten(aux, children):
    if not children:
        return aux
    m = object.__new__(PiecewiseView)
    m.inner, m.q_pieces, m.kv_pieces = aux.inner, aux.q_pieces, aux.kv_pieces
    m._operands = tuple(dataclasses.replace(o, array=a) for o, a in zip(aux._operands, children))
    return m


jax.tree_util.register_pytree_node(PiecewiseView, _view_flatten, _view_unflatten)


def _normalize(m: Mask, lq: int, lk: int):
    """Statically empty -> None, statically full -> FullMask(), else m."""
    if m.is_dynamic:
        return m
    state = np.asarray(m.tile_state(lq, lk, lq, lk))
    if (state == EMPTY).all():
        return None
    if (state == FULL).all():
        return FullMask()
    return m


def shift(m: Mask, qa: int, lq: int, ka: int, lk: int):
    """m over rows [qa, qa+lq) and columns [ka, ka+lk), in local coordinates."""
    return localize(m, ((qa, lq),), ((ka, lk),))


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a == b)


def localize(m: Mask, qp, kp):
    """The mask of local positions (i, j) -> m(map_q(i), map_kv(j)); None when no pair
    is allowed. qp / kp: merged, non-empty pieces."""
    lq, lk = _length(qp), _length(kp)
    if isinstance(m, (AndMask, OrMask)):
        is_and = isinstance(m, AndMask)
        parts = []
        for part in m.parts:
            local = localize(part, qp, kp)
            if local is None and is_and:
                return None
            if isinstance(local, FullMask) and not is_and:
                return local
            if local is not None and not isinstance(local, FullMask):
                parts.append(local)
        if not parts:
            return FullMask() if is_and else None
        return _normalize(parts[0] if len(parts) == 1 else type(m)(tuple(parts)), lq, lk)
    if isinstance(m, FullMask):
        return m
    if isinstance(m, SegmentMask):
        return SegmentMask(_take_pieces(m.q_segment_ids, qp, 1), _take_pieces(m.kv_segment_ids, kp, 1))
    if isinstance(m, DenseMask):
        (op,) = m.operands()
        return _normalize(DenseMask(_localize_operand(op, qp, kp).array), lq, lk)
    if isinstance(m, BlockSparseMask):
        (op,) = m.operands()
        lay, (gq, gk) = _regrid(op.array[0, 0] != 0, op.layout_block, qp, kp)
        return _normalize(BlockSparseMask(lay, gq, gk), lq, lk)
    if len(qp) == 1 and len(kp) == 1:
        (qa, _), (ka, _) = qp[0], kp[0]
        if isinstance(m, CausalMask):
            local = CausalMask(m.offset + qa - ka)
        elif isinstance(m, LocalMask):
            local = LocalMask(m.left, m.right, m.offset + qa - ka)
        elif isinstance(m, StridedMask):
            local = StridedMask(m.stride, m.offset + qa - ka)
        elif qa == 0 and ka == 0 and not m.operands():
            local = m
        else:
            local = PiecewiseView(m, qp, kp)
        return _normalize(local, lq, lk)
    # Several pieces: try one static mask that reproduces every piece pair.
    if not m.is_dynamic:
        first = shift(m, qp[0][0], lq, kp[0][0], lk)
        for cand in (FullMask(), first):
            if cand is not None and all(
                    _same(shift(cand, ls, n, ks, nk), shift(m, g, n, kg, nk))
                    for (g, n), ls in zip(qp, _local_starts(qp))
                    for (kg, nk), ks in zip(kp, _local_starts(kp))):
                return _normalize(cand, lq, lk)
    return _normalize(PiecewiseView(m, qp, kp), lq, lk)
