"""Operand views and the derivative of a score function inside a kernel tile.

A score function ``fn(score, batch, head, q_pos, kv_pos, *operand_views) -> score`` is a
pure element-wise jnp function. Kernels call it on one tile: score [bq, bk] in the
accumulation dtype, batch and head int32 scalars, q_pos int32 [bq, 1], kv_pos int32
[1, bk]. It reads its operands (small arrays: per-head slopes, bucket tables) only by
indexing a view, ``slopes[head]`` or ``table[head, bucket]``: Pallas-Triton has no
dynamic slice or gather on loaded values, so the view turns the index into a load of
the operand's ref (a scalar load, or a gather load for a tile of indices, which Triton
lowers by pointer arithmetic).

Every operand reaches the kernel flattened and zero padded to a power-of-two length
(`flat_operand`); an index is clamped to each axis's bounds (as jnp's indexing clamps)
and linearised row-major, so kernels and the reference read the same element.

The backward needs d fn / d score (and, for operand gradients, d fn / d operand) on the
tile. `score_vjp` gets both from jax: it first calls fn with loading views to record
the values every index loads, then differentiates a replay of fn in which the views
return those recorded values, so the loads themselves are never differentiated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def flat_operand(x):
    """A score operand as the kernels take it: 1-d, zero padded to a power of two >= 16."""
    flat = jnp.reshape(x, (-1,))
    size = max(16, pl.next_power_of_2(max(1, flat.shape[0])))
    return jnp.pad(flat, (0, size - flat.shape[0]))


def linear_index(idx, shape, what: str = "score_mod operand"):
    """Row-major flat index of `idx` (an int or tuple of ints/int arrays, broadcasting)
    into an array of `shape`, each axis clamped to its bounds."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) != len(shape):
        raise ValueError(f"{what}: expected {len(shape)} indices for an operand of shape "
                         f"{tuple(shape)}, got {len(idx)}. Index every axis, e.g. x[head] or "
                         "x[head, bucket] (slices are not supported).")
    lin = jnp.int32(0)
    for i, d in zip(idx, shape):
        if isinstance(i, slice) or i is None or i is Ellipsis:
            raise ValueError(f"{what}: expected integer indices (scalars or int arrays), got {i!r}. "
                             "Index every axis with an integer, e.g. x[head].")
        i = jnp.asarray(i)
        if not jnp.issubdtype(i.dtype, jnp.integer):
            raise ValueError(f"{what}: expected integer indices, got dtype {i.dtype}. "
                             "Cast with .astype(jnp.int32).")
        lin = lin * d + jnp.clip(i.astype(jnp.int32), 0, d - 1)
    return lin


class RefView:
    """An operand inside a kernel: view[idx] loads ref[linear_index(idx)]. With a
    `record` list, each load appends (operand position, flat index, value)."""

    def __init__(self, ref, shape, position, record=None):
        self.ref, self.shape, self.position, self.record = ref, tuple(shape), position, record

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, idx):
        lin = linear_index(idx, self.shape)
        value = self.ref[lin]
        if self.record is not None:
            self.record.append((self.position, lin, value))
        return value


class _ReplayView:
    """view[idx] returns the next recorded load (fn is pure: it loads in the same order)."""

    def __init__(self, shape, values):
        self.shape, self._values = tuple(shape), values

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, idx):
        del idx
        return next(self._values)


def apply_score_mod(fn, score, batch, head, q_pos, kv_pos, refs, shapes):
    """fn on one tile, its operands read through RefViews; the result broadcast to the
    score's shape and dtype."""
    views = [RefView(r, s, p) for p, (r, s) in enumerate(zip(refs, shapes))]
    out = fn(score, batch, head, q_pos, kv_pos, *views)
    return jnp.broadcast_to(jnp.asarray(out, score.dtype), score.shape)


def score_vjp(fn, score, batch, head, q_pos, kv_pos, refs, shapes):
    """(fn(score) on the tile, pullback). pullback(d_out) -> (d_score [bq, bk], loads)
    with loads a list of (operand position, flat index, cotangent [bq, bk] of the loaded
    value per element of the tile) for every floating-point load (integer loads get no
    cotangent)."""
    record = []
    views = [RefView(r, s, p, record) for p, (r, s) in enumerate(zip(refs, shapes))]
    fn(score, batch, head, q_pos, kv_pos, *views)           # records the loads; result unused
    floating = [i for i, (_, _, v) in enumerate(record) if jnp.issubdtype(v.dtype, jnp.floating)]

    def replay(s, *float_values):
        values = [v for _, _, v in record]
        for i, fv in zip(floating, float_values):
            values[i] = fv
        it = iter(values)
        replay_views = [_ReplayView(sh, it) for sh in shapes]
        out = fn(s, batch, head, q_pos, kv_pos, *replay_views)
        return jnp.broadcast_to(jnp.asarray(out, s.dtype), s.shape)

    # The floating loads enter the vjp broadcast to the tile (fn is element-wise, so its
    # value is the same): their cotangents come back per element, with no reduction over
    # two axes at once, which Pallas-Triton cannot lower (`tile_sum` reduces one at a time).
    tiles = [jnp.broadcast_to(record[i][2], score.shape) for i in floating]
    out, pullback = jax.vjp(replay, score, *tiles)

    def pull(d_out):
        d_score, *d_values = pullback(d_out)
        return d_score, [(record[i][0], record[i][1], d) for i, d in zip(floating, d_values)]
    return out, pull


def tile_sum(x):
    """Sum of a [bq, bk] tile, one axis at a time (how Pallas-Triton lowers reductions)."""
    return jnp.sum(jnp.sum(x, axis=1), axis=0)
