"""Zigzag placement of a sequence over a ring (causal load balance).

The sequence is cut into 2P chunks of c = T/(2P) tokens and device d holds chunks
(d, 2P-1-d): one early, one late. Under a causal mask every (device, step) pair then has
the same work (2c² allowed pairs per step), so no device waits for another.
`ring_attention` permutes contiguous shards into this order with two ``ppermute``s (and
back); callers whose activations already live in that order pass
``sequence_layout="zigzag"`` (see `zigzag_permutation`).
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp

def zigzag_permutation(seq_len: int, num_shards: int) -> np.ndarray:
    """Index array `perm` with x_zigzag = x[:, perm]: shard d of x_zigzag holds chunks
    d and 2P-1-d of the 2P equal chunks of the sequence (seq_len % (2P) == 0)."""
    if seq_len % (2 * num_shards):
        raise ValueError(f"seq_len={seq_len} must be a multiple of 2 * num_shards = {2 * num_shards}.")
    c = seq_len // (2 * num_shards)
    chunks = [i for d in range(num_shards) for i in (d, 2 * num_shards - 1 - d)]
    return np.concatenate([np.arange(i * c, (i + 1) * c) for i in chunks])


def inverse_zigzag_permutation(seq_len: int, num_shards: int) -> np.ndarray:
    """x = x_zigzag[:, inverse_zigzag_permutation(...)]."""
    return np.argsort(zigzag_permutation(seq_len, num_shards))


def _to_zigzag(x, axis_name, p):
    """Contiguous shards (chunks 2d, 2d+1 on device d) -> zigzag (chunks d, 2p-1-d), with
    one ppermute per half: chunk k goes to device k (slot 0) if k < p, else to device
    2p-1-k (slot 1). Device e receives an even and an odd chunk; it puts chunk e first."""
    dest = lambda k: k if k < p else 2 * p - 1 - k  # noqa: E731
    half = x.shape[1] // 2
    a = jax.lax.ppermute(x[:, :half], axis_name, [(d, dest(2 * d)) for d in range(p)])
    b = jax.lax.ppermute(x[:, half:], axis_name, [(d, dest(2 * d + 1)) for d in range(p)])
    even = jax.lax.axis_index(axis_name) % 2 == 0
    return jnp.where(even, jnp.concatenate([a, b], 1), jnp.concatenate([b, a], 1))


def _from_zigzag(x, axis_name, p):
    """Inverse of _to_zigzag: the even chunk returns as half 0, the odd one as half 1."""
    dest = lambda k: k // 2  # noqa: E731
    half = x.shape[1] // 2
    even = jax.lax.axis_index(axis_name) % 2 == 0
    ev = jnp.where(even, x[:, :half], x[:, half:])
    od = jnp.where(even, x[:, half:], x[:, :half])
    e_chunk = lambda e: e if e % 2 == 0 else 2 * p - 1 - e  # noqa: E731
    o_chunk = lambda e: 2 * p - 1 - e if e % 2 == 0 else e  # noqa: E731
    a = jax.lax.ppermute(ev, axis_name, [(e, dest(e_chunk(e))) for e in range(p)])
    b = jax.lax.ppermute(od, axis_name, [(e, dest(o_chunk(e))) for e in range(p)])
    return jnp.concatenate([a, b], 1)


def _zigzag_move(xs, axis_name, p, inverse):
    """_to_zigzag (or, with `inverse`, _from_zigzag) of arrays that share the sequence
    axis, moved as one array stacked on the head axis (one pair of ppermutes for all)."""
    y = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=2)
    y = (_from_zigzag if inverse else _to_zigzag)(y, axis_name, p)
    offsets = np.cumsum([0] + [x.shape[2] for x in xs])
    return tuple(jax.lax.slice_in_dim(y, int(a), int(b), axis=2) for a, b in zip(offsets[:-1], offsets[1:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def zigzag(xs, axis_name, p, inverse):
    """The permutation with its inverse as its gradient (a permutation's transpose is
    its inverse): the backward moves cotangents as lean as the forward moves values,
    instead of differentiating the halves' slices, selects and concatenations (pads,
    masked copies and adds of every array)."""
    return _zigzag_move(xs, axis_name, p, inverse)


def _zigzag_fwd(xs, axis_name, p, inverse):
    return _zigzag_move(xs, axis_name, p, inverse), None


def _zigzag_bwd(axis_name, p, inverse, _, cotangents):
    return (_zigzag_move(tuple(cotangents), axis_name, p, not inverse),)


zigzag.defvjp(_zigzag_fwd, _zigzag_bwd)
