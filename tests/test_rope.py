"""jaxattn.layers.rope against flax.nnx.RoPE: the same rotation, and the differences that
rope.py's docstring gives as the reason to keep our own (a failure here means the docstring
is out of date, and nnx.RoPE may now serve)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.layers.rope import apply_rope

B, T, N, H = 2, 8, 3, 16


def _x(dtype=jnp.float32):
    return jax.random.normal(jax.random.key(0), (B, T, N, H), jnp.float32).astype(dtype)


def test_same_rotation_as_flax_for_one_position_vector():
    x, pos = _x(), jnp.arange(T) + 3
    theirs = nnx.RoPE()(x.swapaxes(1, 2), pos).swapaxes(1, 2)  # nnx.RoPE wants [..., T, H]
    np.testing.assert_allclose(apply_rope(x, pos), theirs, atol=1e-6)


def test_flax_rope_cannot_take_positions_per_batch_row():
    x, pos = _x(), jnp.stack([jnp.arange(T), jnp.arange(T) + 5])
    ours = apply_rope(x, pos)
    for row in range(B):  # ours: each row rotated by its own positions
        np.testing.assert_allclose(ours[row], apply_rope(x[row:row + 1], pos[row])[0], atol=1e-6)
    with pytest.raises(TypeError):
        nnx.RoPE()(x.swapaxes(1, 2), pos)


def test_dtype_kept_where_flax_promotes():
    x = _x(jnp.bfloat16)
    assert apply_rope(x, jnp.arange(T)).dtype == jnp.bfloat16
    assert nnx.RoPE()(x.swapaxes(1, 2), jnp.arange(T)).dtype == jnp.float32
