"""`attention_fn`: jaxattn as the attention function of Flax's own layers.

    layer = nnx.MultiHeadAttention(num_heads=8, in_features=512, decode=False, rngs=rngs,
                                   attention_fn=attention_fn(masks.LocalMask(128, 0)))
    layer = linen.MultiHeadDotProductAttention(num_heads=8,
                                               attention_fn=attention_fn(implementation="pallas_triton"))

Flax calls the attention function with q, k, v of shape [batch..., T|S, heads, head_dim],
an *unscaled* query (its default divides q by sqrt(head_dim) itself), an optional dense
boolean mask broadcastable to [batch..., heads, T, S], and keywords about dropout, dtype,
precision, weight sowing and (nnx) causality. The adapter:

* scales logits by 1/sqrt(head_dim) (or the `scale` given to the factory), as Flax does;
* ANDs the structured mask given to the factory, Flax's dense mask (as a `DenseMask`),
  and `is_causal` from the factory or from the nnx call into one jaxattn mask;
* flattens any number of batch dims (or adds one) so jaxattn sees BTNH;
* refuses, with a message that says what to change, what it cannot honour instead of
  silently ignoring it: attention dropout while not deterministic, sowing attention
  weights, a non-default matmul precision, custom (quantised) einsums, RoPE positions
  without a `rope` to apply them with.

One difference from Flax's default: a query row whose mask allows no key returns zeros
here (jaxattn's contract) where Flax returns the mean of all values.

Prefer a structured mask given to the factory (`attention_fn(masks.CausalMask())`) over a
dense one given at call time: a dense mask is data, so the kernels can only skip the
tiles it rules out after reading it, and cost memory O(T·S) to build.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.api import dot_product_attention
from jaxattn.masks import DenseMask, Mask

__all__ = ["attention_fn", "flax_mask_to_jaxattn"]


def flax_mask_to_jaxattn(mask, batch_shape: tuple[int, ...]) -> Mask:
    """A Flax dense mask broadcastable to [*batch_shape, heads, T, S] as a DenseMask of
    shape [B, heads|1, T|1, S|1] with B = prod(batch_shape) (or 1 when it has no batch).

    Non-boolean masks are read as Flax reads them: nonzero = attend."""
    m = jnp.asarray(mask)
    if m.dtype != jnp.bool_:
        m = m.astype(jnp.bool_)
    nb = len(batch_shape)
    if m.ndim > nb + 3:
        raise ValueError(
            f"mask: expected a boolean array broadcastable to [batch..., heads, q_len, kv_len] "
            f"with {nb} batch dim(s), got shape {tuple(m.shape)}. Drop the extra leading axes.")
    m = m.reshape((1,) * (nb + 3 - m.ndim) + m.shape)
    lead, tail = m.shape[:nb], m.shape[nb:]
    if any(d not in (1, want) for d, want in zip(lead, batch_shape)):
        raise ValueError(
            f"mask: batch dims {tuple(lead)} are not broadcastable to the inputs' batch dims "
            f"{tuple(batch_shape)}. Use size-1 dims to broadcast.")
    if all(d == 1 for d in lead):
        return DenseMask(m.reshape((1, *tail)))
    m = jnp.broadcast_to(m, (*batch_shape, *tail))
    return DenseMask(m.reshape((math.prod(batch_shape), *tail)))


def _flatten_bias(bias, batch_shape):
    b = jnp.asarray(bias)
    nb = len(batch_shape)
    b = b.reshape((1,) * max(0, nb + 3 - b.ndim) + b.shape)
    lead, tail = b.shape[:nb], b.shape[nb:]
    if all(d == 1 for d in lead):
        return b.reshape((1, *tail))
    b = jnp.broadcast_to(b, (*batch_shape, *tail))
    return b.reshape((math.prod(batch_shape), *tail))


def _is_default_precision(precision) -> bool:
    if precision is None:
        return True
    if isinstance(precision, (tuple, list)):
        return all(_is_default_precision(p) for p in precision)
    return precision in (jax.lax.Precision.DEFAULT, "default", "DEFAULT", "bfloat16", "fastest")


def attention_fn(mask: Mask | None = None, *, implementation: str | None = None,
                 is_causal: bool = False, local_window_size=None, logits_soft_cap: float | None = None,
                 scale: float | None = None, rope=None, ignore_precision: bool = False):
    """Build an attention function for Flax's `attention_fn=` argument.

    Args:
      mask: a static `jaxattn.masks.Mask` ANDed with whatever mask Flax passes (None: no
        structure beyond Flax's). Masks holding jax arrays (SegmentMask) change per batch:
        give those to a jaxattn layer at call time, or pass Flax a dense mask instead.
      implementation: as in `jaxattn.dot_product_attention` (None = best available).
      is_causal, local_window_size, logits_soft_cap, scale: as in
        `jaxattn.dot_product_attention`; `scale` None means 1/sqrt(head_dim), which is what
        Flax's own attention uses.
      rope: None, or a rotary embedding applied to q and k before attention, called as
        Flax's `nnx.dot_product_attention_with_rope` calls it: `rope(x)` on [..., T, H] per
        head, or `rope(x, input_positions)` when the layer is called with input_positions
        (e.g. `attention_fn(rope=nnx.RoPE())`).
      ignore_precision: accept a non-default `precision` from the layer and compute with the
        implementation's own precision (float32 accumulation) instead of raising.

    Returns:
      fn(query, key, value, bias=None, mask=None, **flax_keywords) -> [batch..., T, N, H].
    """
    if mask is not None and not isinstance(mask, Mask):
        raise ValueError(
            f"attention_fn(mask=...): expected None or a jaxattn.masks.Mask, got {type(mask).__name__}. "
            "A boolean array belongs in the Flax layer's call (mask=...); structure goes here, "
            "e.g. attention_fn(masks.LocalMask(128, 0)).")
    if mask is not None and mask.is_dynamic:
        raise ValueError(
            "attention_fn(mask=...): got a mask holding jax arrays (e.g. SegmentMask), which would be "
            "baked into the function. Pass per-batch masks to the layer call as a dense boolean mask, "
            "or use jaxattn.layers.MultiHeadAttention(...)(x, mask=masks.SegmentMask(ids)).")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"attention_fn(is_causal=...): expected a bool, got {is_causal!r}.")
    static_mask, static_causal = mask, bool(is_causal)

    def fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
           dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False, dtype=None,
           precision=None, module=None, is_causal: bool = False, force_fp32_for_softmax: bool = False,
           qk_attn_weights_einsum=None, attn_weights_value_einsum=None, input_positions=None,
           promote_dtype=None, **unknown: Any):
        # Flax's linen layer passes only the keywords named in this signature, so each one it
        # may send is spelled out above; anything else a future Flax sends must be a no-op.
        del broadcast_dropout, dropout_rng, force_fp32_for_softmax  # softmax is float32 anyway
        if dropout_rate and not deterministic:
            raise NotImplementedError(
                f"jaxattn attention has no attention-probability dropout, but got dropout_rate="
                f"{dropout_rate} with deterministic=False. Build the Flax layer with dropout_rate=0.0 "
                "(apply dropout to the layer's output instead), or call it with deterministic=True.")
        if module is not None:
            raise NotImplementedError(
                "jaxattn never materialises the attention weights, so it cannot sow them: call the "
                "Flax layer with sow_weights=False.")
        if not ignore_precision and not _is_default_precision(precision):
            raise NotImplementedError(
                f"jaxattn attention takes no matmul precision (it accumulates in float32), got "
                f"precision={precision!r}. Build the Flax layer with precision=None, or use "
                "attention_fn(..., ignore_precision=True) to accept the implementation's precision.")
        if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
            raise NotImplementedError(
                "jaxattn attention cannot use custom (e.g. quantised AQT) einsums: leave the Flax "
                "layer's qk_attn_weights_einsum_cls / attn_weights_value_einsum_cls unset.")
        if input_positions is not None and rope is None:
            raise NotImplementedError(
                "got input_positions but no rotary embedding to apply them with: build the adapter "
                "with attention_fn(..., rope=nnx.RoPE()), or use "
                "jaxattn.layers.MultiHeadAttention(..., rope=True).")
        if promote_dtype is not None and not callable(promote_dtype):
            raise ValueError(f"promote_dtype: expected a callable, got {promote_dtype!r}.")
        extra = {k: v for k, v in unknown.items() if v is not None and v is not False}
        if extra:
            raise NotImplementedError(
                f"jaxattn attention_fn does not understand the keyword(s) {sorted(extra)} "
                "(values other than None/False). Remove them or file an issue.")

        if dtype is not None:
            query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
        elif promote_dtype is not None:
            query, key, value = promote_dtype((query, key, value), dtype=None)
        else:
            common = jnp.result_type(query, key, value)
            query, key, value = (jnp.asarray(x, common) for x in (query, key, value))

        if rope is not None:  # per head, over [..., T, H], as Flax's dot_product_attention_with_rope
            if input_positions is None:
                apply = jax.vmap(rope, in_axes=-2, out_axes=-2)
                query, key = apply(query), apply(key)
            else:
                apply = jax.vmap(rope, in_axes=(-2, None), out_axes=-2)
                query, key = apply(query, input_positions), apply(key, input_positions)

        if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                f"query/key/value: expected arrays [batch..., length, heads, head_dim] with the same "
                f"number of dims, got shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}.")
        batch_shape = tuple(query.shape[:-3])
        if tuple(key.shape[:-3]) != batch_shape or tuple(value.shape[:-3]) != batch_shape:
            raise ValueError(
                f"query/key/value: expected the same batch dims, got {tuple(query.shape)}, "
                f"{tuple(key.shape)}, {tuple(value.shape)}.")
        b = math.prod(batch_shape) if batch_shape else 1
        q = query.reshape((b, *query.shape[-3:]))
        k = key.reshape((b, *key.shape[-3:]))
        v = value.reshape((b, *value.shape[-3:]))

        combined = static_mask
        if mask is not None:
            dense = flax_mask_to_jaxattn(mask, batch_shape)
            combined = dense if combined is None else combined & dense
        causal = static_causal or bool(is_causal)
        flat_bias = None if bias is None else _flatten_bias(bias, batch_shape)

        out = dot_product_attention(q, k, v, flat_bias, combined, scale=scale, is_causal=causal,
                                    local_window_size=local_window_size,
                                    logits_soft_cap=logits_soft_cap, implementation=implementation)
        return out.reshape((*batch_shape, *out.shape[-3:]))

    fn.__name__ = "jaxattn_attention_fn"
    fn.__qualname__ = fn.__name__
    return fn
