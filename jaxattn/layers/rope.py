"""Rotary position embedding (RoPE), shared by the nnx and linen layers.

The "rotate half" convention (GPT-NeoX, Llama, Flax's nnx.RoPE): channel i of the first
half is paired with channel i of the second half and the pair is rotated by the angle
position · theta^(-2i/H). q·k then depends on positions only through their difference.
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_angles(positions, head_dim: int, theta: float = 10000.0):
    """Angles [..., T, H/2] (float32) for integer positions [..., T]."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}. "
                         "Pick an even head_dim or build the layer with rope=False.")
    inv_freq = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    return jnp.asarray(positions, jnp.float32)[..., None] * inv_freq


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
