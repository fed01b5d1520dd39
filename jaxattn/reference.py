"""The jnp oracle: dense attention, O(T·S) memory. The definition every kernel is held to.

Shape legend: B batch, T query length, S key length, N query heads, K key/value heads
(N a multiple of K: query head n reads key/value head n // (N // K)), H head dim.

    logits = scale · q·kᵀ (+ bias)              [B, N, T, S]
    logits = c · tanh(logits / c)              when logits_soft_cap = c
    logits = fn(logits, b, n, i, j, *operands)  when score_mod = ScoreMod(fn, *operands)
    p      = softmax over the allowed keys j of each row i
    out    = p · v                              [B, T, N, H]
    lse    = log Σ_allowed exp(logits)          [B, N, T], natural log

A row with no allowed key returns out = 0, lse = -inf, and zero gradients. A key no
query may attend and a query that may attend no key never reach a result, even when
they hold NaN or Inf (padding, unwritten cache slots): they are selected away, never
multiplied by a zero weight. Computes in float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import MASK_VALUE, acc_dtype
from jaxattn.dropout import dropout_keep
from jaxattn.masks.base import Mask, full_operand_view


def grouped_allowed_pairs(mask: Mask, q_len: int, kv_len: int, kv_heads: int, groups: int):
    """allowed_pairs laid out for grouped heads: [Bm, K|1, G|1, T, S] (query head n is
    (n // G, n % G))."""
    a = allowed_pairs(mask, q_len, kv_len)  # [Bm, Hm, T, S], Hm in (1, N)
    return a[:, :, None] if a.shape[1] == 1 else a.reshape(a.shape[0], kv_heads, groups, q_len, kv_len)


def select_reachable(q, k, v, allowed):
    """q [B, T, K, G, H], k/v [B, S, K, H] with every key no query may attend, and every
    query that may attend no key, replaced by zeros (allowed: [Bm, K|1, G|1, T, S]). The
    products q·kᵀ and p·v then never meet NaN/Inf held there, and their gradients are
    exact zeros (a select's gradient, not 0 · NaN)."""
    key_ok = jnp.moveaxis(jnp.any(allowed, axis=(2, 3)), -1, 1)[..., None]       # [Bm, S, K|1, 1]
    query_ok = jnp.moveaxis(jnp.any(allowed, axis=-1), -1, 1)[..., None]         # [Bm, T, K|1, G|1, 1]
    zero = lambda ok, x: jnp.where(ok, x, jnp.zeros((), x.dtype))  # noqa: E731
    return zero(query_ok, q), zero(key_ok, k), zero(key_ok, v)


def allowed_pairs(mask: Mask, q_len: int, kv_len: int) -> jax.Array:
    """bool, broadcastable to [B, N, T, S]."""
    # Positions as [1, 1, T, 1] and [1, 1, 1, S], so every mask's formula and its operand
    # views ([Bm, Hm, T|1, S|1]) meet at one rank (clean under jax_numpy_rank_promotion="raise").
    q_pos = jnp.arange(q_len, dtype=jnp.int32).reshape(1, 1, q_len, 1)
    kv_pos = jnp.arange(kv_len, dtype=jnp.int32).reshape(1, 1, 1, kv_len)
    values = tuple(full_operand_view(o, q_len, kv_len) for o in mask.operands())
    allowed = jnp.asarray(mask.evaluate(q_pos, kv_pos, values))
    allowed = allowed.reshape((1,) * (4 - allowed.ndim) + allowed.shape)
    return jnp.broadcast_to(allowed, (*allowed.shape[:2], q_len, kv_len))


def _weights_parts(query, key, value, bias, mask, scale, logits_soft_cap, precision,
                   score_mod=None):
    """Unnormalised probabilities p [B, K, G, T, S], row sums l and maxima m, and the
    (reachable-selected) values, in the accumulation dtype."""
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    g = n // k
    ct = acc_dtype(query.dtype)
    q, key = query.astype(ct).reshape(b, t, k, g, h), key.astype(ct)
    value = None if value is None else value.astype(ct)
    if mask is None:
        allowed = jnp.ones((1, 1, 1, 1, 1), bool)
    else:
        allowed = grouped_allowed_pairs(mask, t, s, k, g)
        q, key, value_or_key = select_reachable(q, key, key if value is None else value, allowed)
        value = None if value is None else value_or_key
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key, precision=precision) * jnp.asarray(scale, ct)
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
        logits = logits + jnp.broadcast_to(bias.astype(ct), (b, n, t, s)).reshape(b, k, g, t, s)
    if logits_soft_cap is not None:
        cap = jnp.asarray(logits_soft_cap, ct)
        logits = cap * jnp.tanh(logits / cap)
    if score_mod is not None:   # on [B, N, T, S], before the mask
        ids = [jnp.arange(d, dtype=jnp.int32).reshape([d if a == i else 1 for a in range(4)])
               for i, d in enumerate((b, n, t, s))]
        logits = score_mod.reference_apply(logits.reshape(b, n, t, s), *ids).reshape(b, k, g, t, s)

    # Masked logits get a finite stand-in (never -inf: -inf - -inf is NaN) and their
    # probabilities are zeroed explicitly, so an all-masked row sums to l = 0.
    logits = jnp.where(allowed, logits, jnp.asarray(MASK_VALUE, ct))
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    # A row whose allowed logits are all -inf (e.g. an all -inf bias row) is empty too:
    # shift by 0 so exp gives 0 instead of exp(-inf - -inf) = NaN.
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    p = jnp.where(allowed, jnp.exp(logits - m), jnp.zeros_like(logits))
    l = jnp.sum(p, axis=-1, keepdims=True)
    return p, l, m, value


@functools.partial(jax.jit, static_argnames=("logits_soft_cap", "return_residuals", "precision",
                                             "dropout_rate", "broadcast_dropout"))
def reference_attention(query, key, value, bias=None, mask: Mask | None = None, *,
                        scale, logits_soft_cap: float | None = None,
                        return_residuals: bool = False, precision=None,
                        dropout_rate: float = 0.0, dropout_seed=None,
                        broadcast_dropout: bool = False, score_mod=None):
    """Inputs already validated by jaxattn.api; `mask` is a canonical Mask (or None);
    `score_mod` a jaxattn.ScoreMod (or None).

    `scale` is a Python float or a (possibly traced) scalar; `precision` goes to both
    matmuls (jax.lax.Precision, a pair of them, or None for the default). Dropout: see
    `jaxattn.dropout`; the lse is that of the attention before dropout."""
    b, t, n, h = query.shape
    ct = acc_dtype(query.dtype)
    p, l, m, value = _weights_parts(query, key, value, bias, mask, scale, logits_soft_cap, precision,
                                    score_mod)
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, jnp.ones_like(l))
    weights = p / l_safe
    if dropout_rate:
        keep = dropout_keep(dropout_seed, weights.shape, dropout_rate, broadcast=broadcast_dropout)
        weights = jnp.where(keep, weights / jnp.asarray(1.0 - dropout_rate, ct), jnp.zeros_like(weights))
    out = jnp.einsum("bkgts,bskh->btkgh", weights, value, precision=precision)
    out = out.reshape(b, t, n, h).astype(query.dtype)
    if not return_residuals:
        return out
    lse = jnp.where(nonempty, m + jnp.log(l_safe), jnp.full_like(m, -jnp.inf))[..., 0].reshape(b, n, t)
    return out, lse


@functools.partial(jax.jit, static_argnames=("logits_soft_cap", "precision"))
def reference_attention_weights(query, key, bias=None, mask: Mask | None = None, *, scale,
                                logits_soft_cap: float | None = None, precision=None,
                                score_mod=None):
    """The attention probabilities [B, N, T, S] (float32, or float64 for float64 inputs):
    O(T·S) memory by nature. A row with no allowed key is all zeros."""
    b, t, n, _ = query.shape
    p, l, _, _ = _weights_parts(query, key, None, bias, mask, scale, logits_soft_cap, precision,
                                score_mod)
    return (p / jnp.where(l > 0, l, jnp.ones_like(l))).reshape(b, n, t, key.shape[1])
