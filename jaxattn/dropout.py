"""Attention dropout, jaxattn's own definition: a counter-based hash, so any code (the
reference today, a kernel's forward and backward later) regenerates the same keep-mask
from (seed, batch, head, i, j) without storing it.

    h    = seed
    h    = fmix32(h * 0x9E3779B1 + c)     for c in (batch, head, i, j), uint32 arithmetic
    keep = h >= floor(rate · 2³²)         (so P(drop) = rate up to 2⁻³²)

fmix32 is MurmurHash3's finaliser. With `broadcast=True` batch and head are 0: one
[T, S] mask shared by every batch row and head (Flax's `broadcast_dropout`). Kept
probabilities are divided by (1 - rate).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B1)


def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_keep(seed, shape, rate: float, *, broadcast: bool = False):
    """bool keep-mask for attention weights of `shape` [B, N, T, S] (or [B, K, G, T, S],
    heads numbered k·G + g). `seed`: uint32 scalar (traced is fine)."""
    *lead, t, s = shape
    b = lead[0]
    n = int(np.prod(lead[1:]))
    coords = (jnp.arange(b, dtype=jnp.uint32).reshape(b, 1, 1, 1),
              jnp.arange(n, dtype=jnp.uint32).reshape(1, n, 1, 1),
              jnp.arange(t, dtype=jnp.uint32).reshape(1, 1, t, 1),
              jnp.arange(s, dtype=jnp.uint32).reshape(1, 1, 1, s))
    if broadcast:
        coords = (jnp.zeros((1, 1, 1, 1), jnp.uint32),) * 2 + coords[2:]
    h = jnp.asarray(seed, jnp.uint32).reshape(1, 1, 1, 1)
    for c in coords:
        h = _fmix32(h * _GOLDEN + c)
    threshold = np.uint32(min(int(rate * 2.0**32), 2**32 - 1))
    keep = h >= threshold
    return jnp.broadcast_to(keep, (b, n, t, s)).reshape(shape)
