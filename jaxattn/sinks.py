"""Attention sinks: one learned logit per query head that joins every row's softmax.

With sinks [N], row i of head n normalises over its allowed keys and one extra logit
sinks[n] whose value vector is zero:

    p_ij = exp(s_ij) / (exp(sinks[n]) + Σ_allowed exp(s_ij)),     out_i = Σ_j p_ij v_j.

That is the sink-less attention rescaled through its log-sum-exp, which every
implementation with a differentiable lse already returns:

    lse' = logaddexp(lse, sinks[n]),     out' = out · exp(lse − lse').

So no kernel changes: the gradients reach q, k, v through `out` and `lse` (the kernels'
custom VJP takes a cotangent on the lse), and d sinks is exact by autodiff of these two
lines. A row with no allowed key (lse = −inf) gives out' = 0 and lse' = sinks[n].
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import acc_dtype


def check_sinks(sinks, num_heads: int):
    """sinks must be None or a floating array of shape [N]."""
    if sinks is None:
        return None
    if (not hasattr(sinks, "shape") or not hasattr(sinks, "dtype")
            or not jnp.issubdtype(sinks.dtype, jnp.floating)):
        raise ValueError(f"sinks: expected a float array of shape [N] = [{num_heads}] (one logit per "
                         f"query head), got {type(sinks).__name__} "
                         f"{getattr(sinks, 'dtype', '')}. Pass e.g. jnp.zeros([{num_heads}]).")
    if tuple(sinks.shape) != (num_heads,):
        raise ValueError(f"sinks: expected shape [N] = [{num_heads}] (one logit per query head), got "
                         f"{tuple(sinks.shape)}. Give one value per query head.")
    return sinks


def add_sinks(out, lse, sinks):
    """(out [B, T, N, H], lse [B, N, T]) of attention without sinks → the same with
    sinks [N] in every row's softmax; see the module docstring."""
    acc = lse.dtype if jnp.issubdtype(lse.dtype, jnp.floating) else acc_dtype(out.dtype)
    sink = sinks.astype(acc)[None, :, None]                                  # [1, N, 1]
    new_lse = jnp.logaddexp(lse, sink)
    # exp(lse − lse') with a guard: an empty row (lse = −inf) gets weight 0, and the
    # unselected branch never sees −inf − (−inf) (its gradient would be NaN).
    empty = jnp.isneginf(lse)
    safe_lse = jnp.where(empty, jnp.zeros_like(lse), lse)
    safe_new = jnp.where(empty, jnp.zeros_like(new_lse), new_lse)
    weight = jnp.where(empty, jnp.zeros_like(lse), jnp.exp(safe_lse - safe_new))   # [B, N, T]
    scaled = out.astype(acc) * jnp.swapaxes(weight, 1, 2)[..., None]
    return scaled.astype(out.dtype), new_lse
