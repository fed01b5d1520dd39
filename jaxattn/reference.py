"""The jnp oracle: dense attention, O(T·S) memory. The definition every kernel is held to.

Shape legend: B batch, T query length, S key length, N query heads, K key/value heads
(N a multiple of K: query head n reads key/value head n // (N // K)), H head dim.

    logits = scale · q·kᵀ (+ bias)              [B, N, T, S]
    logits = c · tanh(logits / c)              when logits_soft_cap = c
    p      = softmax over the allowed keys j of each row i
    out    = p · v                              [B, T, N, H]
    lse    = log Σ_allowed exp(logits)          [B, N, T], natural log

A row with no allowed key returns out = 0, lse = -inf, and zero gradients.
Computes in float32, or float64 when any input is float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.masks.base import Mask, full_operand_view


def compute_dtype(*dtypes):
    return jnp.float64 if any(jnp.dtype(d) == jnp.float64 for d in dtypes if d is not None) else jnp.float32


def allowed_pairs(mask: Mask, q_len: int, kv_len: int) -> jax.Array:
    """bool, broadcastable to [B, N, T, S]."""
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None]
    kv_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    values = tuple(full_operand_view(o, q_len, kv_len) for o in mask.operands())
    allowed = jnp.asarray(mask.evaluate(q_pos, kv_pos, values))
    allowed = allowed.reshape((1,) * (4 - allowed.ndim) + allowed.shape)
    return jnp.broadcast_to(allowed, (*allowed.shape[:2], q_len, kv_len))


@functools.partial(jax.jit, static_argnames=("scale", "logits_soft_cap", "return_residuals"))
def reference_attention(query, key, value, bias=None, mask: Mask | None = None, *,
                        scale: float, logits_soft_cap: float | None = None,
                        return_residuals: bool = False):
    """Inputs already validated by jaxattn.api; `mask` is a canonical Mask (or None)."""
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    g = n // k
    ct = compute_dtype(query.dtype, key.dtype, value.dtype)
    q = query.astype(ct).reshape(b, t, k, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key.astype(ct)) * jnp.asarray(scale, ct)
    if bias is not None:
        logits = logits + jnp.broadcast_to(bias.astype(ct), (b, n, t, s)).reshape(b, k, g, t, s)
    if logits_soft_cap is not None:
        cap = jnp.asarray(logits_soft_cap, ct)
        logits = cap * jnp.tanh(logits / cap)

    if mask is None:
        allowed = jnp.ones((1, 1, 1, 1, 1), bool)
    else:
        a = allowed_pairs(mask, t, s)  # [Bm, Hm, T, S], Hm in (1, N)
        allowed = a[:, :, None] if a.shape[1] == 1 else a.reshape(a.shape[0], k, g, t, s)

    # Masked logits get a finite stand-in (never -inf: -inf - -inf is NaN) and their
    # probabilities are zeroed explicitly, so an all-masked row sums to l = 0.
    neg = jnp.asarray(-0.7 * jnp.finfo(ct).max, ct)
    logits = jnp.where(allowed, logits, neg)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    # A row whose allowed logits are all -inf (e.g. an all -inf bias row) is empty too:
    # shift by 0 so exp gives 0 instead of exp(-inf - -inf) = NaN.
    m = jnp.where(jnp.isfinite(m), m, 0)
    p = jnp.where(allowed, jnp.exp(logits - m), 0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, 1)
    out = jnp.einsum("bkgts,bskh->btkgh", p / l_safe, value.astype(ct))
    out = out.reshape(b, t, n, h).astype(query.dtype)
    if not return_residuals:
        return out
    lse = jnp.where(nonempty, m + jnp.log(l_safe), -jnp.inf)[..., 0].reshape(b, n, t)
    return out, lse
