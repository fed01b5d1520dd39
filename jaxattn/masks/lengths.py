"""Per-sequence valid lengths as a mask (jax.nn's `query_seq_lengths` /
`key_value_seq_lengths`): row i of batch b is real when i < q_lengths[b], key j when
j < kv_lengths[b]; a pair is allowed when both are real.

q_lengths [2, 3], kv_lengths [4, 5], T=4, S=6 (batch row 0):

    1 1 1 1 0 0
    1 1 1 1 0 0
    0 0 0 0 0 0     <- padded query rows attend to nothing and return 0
    0 0 0 0 0 0

Lengths may be traced: tile states are exact arithmetic on them under jit (a tile is FULL
when its last row and last column are real, EMPTY when its first row or first column is
padding), so the kernels skip every padded tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.metadata import EMPTY, FULL, PARTIAL, MaskOperand
from jaxattn.masks.base import Mask, tile_bounds


class LengthMask(Mask):
    """i < q_lengths[b] and j < kv_lengths[b], for a query of length q_len and keys of
    length kv_len. Either lengths array may be None (every row / key real); each is
    int [B] (traced is fine). Lengths past the end count as the whole sequence."""

    is_dynamic = True

    def __init__(self, q_lengths=None, kv_lengths=None, *, q_len: int, kv_len: int):
        given = [a for a in (q_lengths, kv_lengths) if a is not None]
        if not given:
            raise ValueError("LengthMask: expected q_lengths or kv_lengths (int [B]), got neither. "
                             "Pass at least one; leave the mask out for full attention.")
        for name, a in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
            if a is not None and (jnp.ndim(a) != 1 or not jnp.issubdtype(jnp.result_type(a), jnp.integer)):
                raise ValueError(f"LengthMask {name}: expected an int array [B], got "
                                 f"{jnp.result_type(a)} {tuple(jnp.shape(a))}. One length per batch row.")
        batch = jnp.shape(given[0])[0]
        self.q_lengths = (jnp.full((batch,), q_len, jnp.int32) if q_lengths is None
                          else jnp.asarray(q_lengths).astype(jnp.int32))
        self.kv_lengths = (jnp.full((batch,), kv_len, jnp.int32) if kv_lengths is None
                           else jnp.asarray(kv_lengths).astype(jnp.int32))
        if self.q_lengths.shape != self.kv_lengths.shape:
            raise ValueError(f"LengthMask: q_lengths and kv_lengths must share the batch size, got "
                             f"{self.q_lengths.shape[0]} and {self.kv_lengths.shape[0]}.")
        self.q_len, self.kv_len = int(q_len), int(kv_len)
        # Per-token "is real" flags, the kernels' "q" / "kv" operands (built here, once:
        # operands() is also called inside kernels, only to count them).
        self.q_real = (jnp.arange(self.q_len, dtype=jnp.int32).reshape(1, -1)
                       < self.q_lengths.reshape(-1, 1)).astype(jnp.int32)
        self.kv_real = (jnp.arange(self.kv_len, dtype=jnp.int32).reshape(1, -1)
                        < self.kv_lengths.reshape(-1, 1)).astype(jnp.int32)

    def batch_heads(self):
        return (self.q_lengths.shape[0], 1)

    def validate(self, q_len, kv_len, batch, num_heads):
        if (self.q_len, self.kv_len) != (q_len, kv_len):
            raise ValueError(f"LengthMask: built for T={self.q_len}, S={self.kv_len}, applied to "
                             f"T={q_len}, S={kv_len}. Build it with the query's and keys' lengths.")
        if self.q_lengths.shape[0] not in (1, batch):
            raise ValueError(f"sequence lengths: expected shape [B] = [{batch}], got "
                             f"{tuple(self.q_lengths.shape)}. One length per batch row.")

    def operands(self):
        return (MaskOperand("q", self.q_real), MaskOperand("kv", self.kv_real))

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        q_real, kv_real = operand_values
        return (q_real != 0) & (kv_real != 0)

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        r0, r1, c0, c1 = (jnp.asarray(x, jnp.int32) for x in tile_bounds(q_len, kv_len, block_q, block_kv))
        ql = self.q_lengths.reshape(-1, 1, 1)  # [B, 1, 1] against the [nQ, 1] / [1, nK] bounds
        kl = self.kv_lengths.reshape(-1, 1, 1)
        r0, r1, c0, c1 = (x[None] for x in (r0, r1, c0, c1))
        full = (r1 < ql) & (c1 < kl)
        empty = (r0 >= ql) | (c0 >= kl)
        state = jnp.where(full, FULL, jnp.where(empty, EMPTY, PARTIAL)).astype(jnp.int8)
        return state[:, None]  # [B, 1, nQ, nK]

    def _key(self):
        return (id(self),)

    def __repr__(self):
        return f"LengthMask(B={self.q_lengths.shape[0]}, T={self.q_len}, S={self.kv_len})"


def _flatten(m):
    return (m.q_lengths, m.kv_lengths, m.q_real, m.kv_real), (m.q_len, m.kv_len)


def _unflatten(aux, children):
    m = object.__new__(LengthMask)
    m.q_lengths, m.kv_lengths, m.q_real, m.kv_real = children
    m.q_len, m.kv_len = aux
    return m


jax.tree_util.register_pytree_node(LengthMask, _flatten, _unflatten)
