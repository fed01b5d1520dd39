"""Rotary position embedding (RoPE), used by both the nnx and the linen layers.

The "rotate half" convention (GPT-NeoX, Llama, Flax's nnx.RoPE): channel i of the first
half is paired with channel i of the second half and the pair is rotated by the angle
position · theta^(-2i/H). q·k then depends on positions only through their difference.

Why not `flax.nnx.RoPE` (flax 0.12.12), which computes the same rotation (float32 results
agree to ~2e-7)? It does not fit the layers' needs in three ways:
* positions per batch row: the layers take positions [B, T] (packed documents restart
  their positions), while nnx.RoPE flattens its positions with `jnp.outer`, so only one
  [T] vector works;
* layout: nnx.RoPE rotates [..., T, H] (sequence next to the head dim); the layers hold
  [B, T, N, H] and would transpose q and k around every call;
* dtype: nnx.RoPE returns float32 for bfloat16 inputs; `apply_rope` computes in float32
  and returns the input's dtype, as the kernels expect.
It is also an nnx Module, and the linen layer calls the same function. Users of Flax's own
attention layers can still pass `nnx.RoPE` through `jaxattn.layers.attention_fn(rope=...)`.
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_angles(positions, head_dim: int, theta: float = 10000.0):
    """Angles [..., T, H/2] (float32) for integer positions [..., T]."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}. "
                         "Pick an even head_dim or build the layer with rope=False.")
    inv_freq = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    positions = jnp.asarray(positions, jnp.float32)[..., None]
    return positions * inv_freq.reshape((1,) * (positions.ndim - 1) + (-1,))  # same rank: no promotion


def apply_rope(x, positions, theta: float = 10000.0):
    """Rotate x [B, T, N, H] by positions [T] or [B, T]; computed in float32, returns x's dtype."""
    h = x.shape[-1]
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None]
    if positions.ndim != 2 or positions.shape[-1] != x.shape[1]:
        raise ValueError(f"positions: expected shape [T] or [B, T] with T={x.shape[1]}, "
                         f"got {tuple(positions.shape)}.")
    ang = rope_angles(positions, h, theta)[:, :, None, :]  # [B|1, T, 1, H/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : h // 2], xf[..., h // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
