"""Attention dropout, jaxattn's own definition: a counter-based hash, so the reference
and the kernels' forward and backward regenerate the same keep-mask from
(seed, batch, head, i, j) without storing it.

    h    = seed
    h    = fmix32(h * 0x9E3779B1 + c)     for c in (batch, head, i, j), uint32 arithmetic
    keep = h >= floor(rate · 2³²)         (so P(drop) = rate up to 2⁻³²)

fmix32 is MurmurHash3's finaliser; the hash is spelled once, in pallas_kernels/dropout.py,
which the kernels evaluate tile by tile. With `broadcast=True` batch and head are 0: one
[T, S] mask shared by every batch row and head (Flax's `broadcast_dropout`). Kept
probabilities are divided by (1 - rate).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.dropout import head_hash, keep_pairs


def dropout_keep(seed, shape, rate: float, *, broadcast: bool = False):
    """bool keep-mask for attention weights of `shape` [B, N, T, S] (or [B, K, G, T, S],
    heads numbered k·G + g). `seed`: uint32 scalar (traced is fine)."""
    *lead, t, s = shape
    b = lead[0]
    n = int(np.prod(lead[1:]))
    h = head_hash(seed, jnp.arange(b, dtype=jnp.uint32).reshape(b, 1, 1, 1),
                  jnp.arange(n, dtype=jnp.uint32).reshape(1, n, 1, 1), broadcast=broadcast)
    keep = keep_pairs(h, jnp.arange(t, dtype=jnp.uint32).reshape(1, 1, t, 1),
                      jnp.arange(s, dtype=jnp.uint32).reshape(1, 1, 1, s), rate)
    return jnp.broadcast_to(keep, (b, n, t, s)).reshape(shape)
