"""What every kernel backend shares, each rule spelled once."""

from __future__ import annotations

import jax.numpy as jnp


def acc_dtype(dtype):
    """Accumulate in float32, or in float64 when the inputs are (gradient checks)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
