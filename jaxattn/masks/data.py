"""Masks that carry arrays: an explicit boolean matrix, and per-token segment ids.

Their tile states depend on data, so the kernel gets the arrays as operands and reads
one tile of them inside each PARTIAL tile. A mask built from numpy data is static
(hashable, metadata computed once with numpy); one built from jax arrays is dynamic
(metadata computed by a jittable jnp function, so it works on traced values).
"""

from __future__ import annotations

import hashlib

import numpy as np
import jax
import jax.numpy as jnp

from pallas_kernels.metadata import EMPTY, FULL, PARTIAL, MaskOperand
from jaxattn.masks.base import Mask


def _pad_axis(x, axis: int, size: int, value):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    if value == "edge":
        return (np if isinstance(x, np.ndarray) else jnp).pad(x, widths, mode="edge")
    return (np if isinstance(x, np.ndarray) else jnp).pad(x, widths, constant_values=value)


def _tile_reduce(x, block_q: int, block_kv: int, op):
    """Reduce the last two axes of x [..., Tp, Sp] over tiles: [..., nQ, nK]."""
    *lead, tp, sp = x.shape
    x = x.reshape(*lead, tp // block_q, block_q, sp // block_kv, block_kv)
    return op(op(x, axis=-1), axis=-2)


def non_boolean_mask_error(what: str, dtype) -> ValueError:
    """The one message for a mask array that is not boolean. A float mask is refused,
    never cast: an additive mask (0 = attend, -inf = blocked) cast to bool would flip
    every pair (0 -> False, -inf -> True), a silent wrong result."""
    if jnp.issubdtype(dtype, jnp.floating):
        fix = ("A float mask is ambiguous: an additive mask (0 = attend, -inf or a large negative = "
               "blocked) is a bias, pass it as jaxattn.dot_product_attention(..., bias=additive) or "
               "as the bool mask `additive == 0`; a 0/1 mask becomes `mask > 0`.")
    else:
        fix = "Convert with `mask != 0` (nonzero = attend)."
    return ValueError(f"{what} must be boolean (True = attend), got dtype {dtype}. {fix}")


class DenseMask(Mask):
    """array[..., i, j] for a bool array broadcastable to [B, N, T, S].

    [[1,0,1,0,1,0],[0,1,0,1,0,1],[1,1,1,1,1,1],[0,0,0,0,0,0]] gives exactly that matrix
    (its last row attends to nothing and returns 0). The kernel streams only the tiles
    of this array that are PARTIAL; EMPTY tiles are skipped and FULL ones need no reads.
    """

    def __init__(self, array):
        is_jax = isinstance(array, jax.Array) or isinstance(array, jax.core.Tracer)
        if not is_jax:
            array = np.array(array)  # a copy: later writes to the caller's buffer can't change the mask
        if array.ndim > 4:
            raise ValueError(f"DenseMask array must have at most 4 dims, broadcastable to [B, N, T, S], "
                             f"got shape {tuple(array.shape)}. Reshape it, e.g. mask[:, None] for [B, T, S].")
        if array.dtype != np.bool_:
            raise non_boolean_mask_error("DenseMask array", array.dtype)
        self._given_shape = tuple(array.shape)  # for error messages: what the user passed
        while array.ndim < 4:
            array = array[None]
        self.array = array
        self.is_dynamic = is_jax
        if not is_jax:
            self.array.setflags(write=False)
            self._digest = hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()

    def batch_heads(self):
        return (self.array.shape[0], self.array.shape[1])

    def validate(self, q_len, kv_len, batch, num_heads):
        b, h, t, s = self.array.shape
        if b not in (1, batch) or h not in (1, num_heads) or t not in (1, q_len) or s not in (1, kv_len):
            given = getattr(self, "_given_shape", tuple(self.array.shape))
            raise ValueError(
                f"mask shape: expected a bool array broadcastable to [B, N, T, S] = "
                f"[{batch}, {num_heads}, {q_len}, {kv_len}], got shape {given}. Give a bool array "
                "of shape [T, S], [B, 1, T, S] or [B, N, T, S] (size-1 dims broadcast).")

    def _full(self, q_len, kv_len):
        b, h = self.array.shape[:2]
        xp = jnp if self.is_dynamic else np
        return xp.broadcast_to(self.array, (b, h, q_len, kv_len))

    def operands(self):
        # Size-1 T/S dims are broadcast to [Bm, Hm, T, S] by the kernel's operand prep.
        return (MaskOperand("qkv", self.array),)

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        (value,) = operand_values
        return value != 0

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        full = self._full(q_len, kv_len)
        tp = -(-q_len // block_q) * block_q
        sp = -(-kv_len // block_kv) * block_kv
        # Padding is "don't care": True for the all() test, False for the any() test.
        as_true = _pad_axis(_pad_axis(full, 2, tp, True), 3, sp, True)
        as_false = _pad_axis(_pad_axis(full, 2, tp, False), 3, sp, False)
        xp = jnp if self.is_dynamic else np
        all_ = _tile_reduce(as_true, block_q, block_kv, xp.all)
        any_ = _tile_reduce(as_false, block_q, block_kv, xp.any)
        return xp.where(all_, FULL, xp.where(any_, PARTIAL, EMPTY)).astype(xp.int8)

    def _key(self):
        if self.is_dynamic:
            return (id(self),)
        return (self.array.shape, self._digest)

    def __repr__(self):
        return f"DenseMask(shape={tuple(self.array.shape)}{', traced' if self.is_dynamic else ''})"


class SegmentMask(Mask):
    """q_segment_ids[b, i] == kv_segment_ids[b, j] (arrays [B, T] and [B, S]).

    q ids [0, 0, 1, 1], kv ids [0, 0, 0, 1, 1, 2]:

    1 1 1 0 0 0
    1 1 1 0 0 0
    0 0 0 1 1 0
    0 0 0 1 1 0

    Packs several documents in one row; ``CausalMask() & SegmentMask(ids, ids)`` is causal
    document packing. Ids may be traced values: tile states come from per-tile min/max
    of the ids under jit: exact when queries and keys carry the same sorted ids (packed
    documents), conservative otherwise (a tile may be PARTIAL yet hold no allowed pair).
    """

    is_dynamic = True

    def __init__(self, q_segment_ids, kv_segment_ids=None):
        if kv_segment_ids is None:
            kv_segment_ids = q_segment_ids
        q = jnp.asarray(q_segment_ids)
        kv = jnp.asarray(kv_segment_ids)
        for name, a in (("q_segment_ids", q), ("kv_segment_ids", kv)):
            if a.ndim != 2:
                raise ValueError(f"{name} must have shape [B, length], got {tuple(a.shape)}. "
                                 "Add a batch axis: ids[None].")
            if not jnp.issubdtype(a.dtype, jnp.integer):
                raise ValueError(f"{name} must be integers, got dtype {a.dtype}. Use ids.astype(jnp.int32).")
        if q.shape[0] != kv.shape[0]:
            raise ValueError(f"q_segment_ids and kv_segment_ids must share the batch size, got "
                             f"{q.shape[0]} and {kv.shape[0]}. Give both one row of ids per batch element.")
        self.q_segment_ids = q.astype(jnp.int32)
        self.kv_segment_ids = kv.astype(jnp.int32)

    def batch_heads(self):
        return (self.q_segment_ids.shape[0], 1)

    def validate(self, q_len, kv_len, batch, num_heads):
        if self.q_segment_ids.shape != (batch, q_len) and self.q_segment_ids.shape != (1, q_len):
            raise ValueError(f"q_segment_ids must have shape [B, T] = [{batch}, {q_len}], got "
                             f"{tuple(self.q_segment_ids.shape)}. One id per query token.")
        if self.kv_segment_ids.shape[1] != kv_len:
            raise ValueError(f"kv_segment_ids must have shape [B, S] = [{batch}, {kv_len}], got "
                             f"{tuple(self.kv_segment_ids.shape)}. One id per key token.")

    def operands(self):
        return (MaskOperand("q", self.q_segment_ids), MaskOperand("kv", self.kv_segment_ids))

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        q_ids, kv_ids = operand_values
        return q_ids == kv_ids

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        def block_range(ids, block):
            n = -(-ids.shape[1] // block)
            ids = _pad_axis(ids, 1, n * block, "edge").reshape(ids.shape[0], n, block)
            return ids.min(-1), ids.max(-1)

        qmin, qmax = block_range(self.q_segment_ids, block_q)
        kmin, kmax = block_range(self.kv_segment_ids, block_kv)
        qmin, qmax = qmin[:, :, None], qmax[:, :, None]
        kmin, kmax = kmin[:, None, :], kmax[:, None, :]
        empty = (qmax < kmin) | (kmax < qmin)
        full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        state = jnp.where(full, FULL, jnp.where(empty, EMPTY, PARTIAL)).astype(jnp.int8)
        return state[:, None]

    def _key(self):
        return (id(self),)

    def __repr__(self):
        return f"SegmentMask(B={self.q_segment_ids.shape[0]}, T={self.q_segment_ids.shape[1]}, S={self.kv_segment_ids.shape[1]})"


def _dense_flatten(m):
    if m.is_dynamic:
        return (m.array,), None
    return (), m


def _dense_unflatten(aux, children):
    if aux is not None:
        return aux
    m = object.__new__(DenseMask)
    (m.array,) = children
    m.is_dynamic = True
    return m


jax.tree_util.register_pytree_node(DenseMask, _dense_flatten, _dense_unflatten)


# Segment and traced dense masks travel through jit as pytrees (their arrays are leaves).
def _segment_flatten(m):
    return (m.q_segment_ids, m.kv_segment_ids), None


def _segment_unflatten(_, children):
    m = object.__new__(SegmentMask)
    m.q_segment_ids, m.kv_segment_ids = children
    return m


jax.tree_util.register_pytree_node(SegmentMask, _segment_flatten, _segment_unflatten)
