"""Attention dropout's keep-mask: a counter-based hash of (seed, batch, head, i, j).

Nothing is stored: the reference (jaxattn/dropout.py) evaluates it over the whole
[B, N, T, S] matrix, and a kernel regenerates it tile by tile in its forward and in both
backward kernels, so every one of them drops exactly the same pairs:

    h    = seed
    h    = fmix32(h · 0x9E3779B1 + c)     for c in (batch, head, i, j), uint32 arithmetic
    keep = h >= floor(rate · 2³²)         (so P(drop) = rate, up to 2⁻³²)

fmix32 is MurmurHash3's finaliser. `head` is the query head n (under GQA n = k·G + g,
reading key/value head k), i and j are absolute query and key positions. Broadcast
dropout (one [T, S] mask for every batch row and head) hashes batch = head = 0. Kept
probabilities are divided by (1 − rate).

Only element-wise uint32 multiplies, adds, xors, logical shifts and an unsigned compare:
jnp spells them once here, and they lower in Pallas (Triton) kernels as they run in XLA.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

GOLDEN = np.uint32(0x9E3779B1)


def fmix32(h):
    """MurmurHash3's 32-bit finaliser (every input bit affects every output bit)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def mix(h, c):
    """One link of the chain: fmix32(h · golden + c), h and c uint32 (broadcasting)."""
    return fmix32(h * GOLDEN + c)


def keep_threshold(rate: float) -> np.uint32:
    """The hash value at and above which a pair is kept: floor(rate · 2³²)."""
    return np.uint32(min(int(rate * 2.0**32), 2**32 - 1))


def seed_array(seed, batch_offset=0, head_offset=0):
    """What a kernel takes as its dropout operand: uint32 [4] = (seed, batch offset, head
    offset, 0). The seed is any integer scalar, traced or not, converted as
    `jnp.asarray(seed, jnp.uint32)` converts it. The offsets (traced is fine) are the
    first batch row and query head of the arrays the kernel sees, for a kernel that runs
    on one shard of the batch or heads: it hashes offset + its own index, so every shard
    draws its part of the whole call's mask."""
    parts = [jnp.asarray(seed, jnp.uint32), jnp.asarray(batch_offset).astype(jnp.uint32),
             jnp.asarray(head_offset).astype(jnp.uint32), jnp.zeros((), jnp.uint32)]
    return jnp.stack([jnp.reshape(x, ()) for x in parts])


def with_offsets(seeds, batch_offset, head_offset):
    """A `seed_array` moved on by further batch and head offsets (traced is fine)."""
    return seeds + jnp.stack([jnp.zeros((), jnp.uint32),
                              jnp.asarray(batch_offset).astype(jnp.uint32),
                              jnp.asarray(head_offset).astype(jnp.uint32),
                              jnp.zeros((), jnp.uint32)])


def head_hash(seed, batch, head, *, broadcast: bool):
    """The chain after (seed, batch, head): uint32, broadcasting over array arguments.
    With `broadcast` batch and head are 0 whatever is passed."""
    if broadcast:
        batch = head = 0
    h = mix(jnp.asarray(seed, jnp.uint32), jnp.asarray(batch).astype(jnp.uint32))
    return mix(h, jnp.asarray(head).astype(jnp.uint32))


def keep_pairs(h_head, q_pos, kv_pos, rate: float):
    """bool keep-mask of the pairs (q_pos, kv_pos) (broadcasting, e.g. [bq, 1] × [1, bk]
    int32 absolute positions) given `head_hash` of their (batch, head)."""
    h = mix(mix(h_head, q_pos.astype(jnp.uint32)), kv_pos.astype(jnp.uint32))
    return h >= keep_threshold(rate)
