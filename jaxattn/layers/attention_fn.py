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
* passes `precision` on (the reference honours it; see `jaxattn.dot_product_attention`);
* computes attention dropout (`dropout_rate`, `dropout_rng`, `broadcast_dropout`) with
  jaxattn's own counter-based keep-mask (`jaxattn.dropout`): deterministic for a given
  rng, but not the same mask as Flax's `random.bernoulli`. The Triton kernels compute
  it (forward and backward) as the reference does; with `deterministic=True` or rate 0
  there is none;
* sows the attention weights when Flax asks (`sow_weights=True`), computed by the
  reference with a warning: they cost O(T·S) memory;
* refuses, with a message that says what to change, what it cannot honour instead of
  silently ignoring it: custom (quantised) einsums, RoPE positions without a `rope` to
  apply them with. Bad shapes raise ValueError first, with Flax's wording.

Masks: boolean, or Flax's own 0/1 float and nonzero-int masks (`make_attention_mask`
returns float32 by default). A concrete float mask holding any other value (an additive
0 / -inf mask) is refused: it belongs in `bias`.

One difference from Flax's default: a query row whose mask allows no key returns zeros
here (jaxattn's contract) where Flax returns the mean of all values.

Prefer a structured mask given to the factory (`attention_fn(masks.CausalMask())`) over a
dense one given at call time: a dense mask is data, so the kernels can only skip the
tiles it rules out after reading it, and cost memory O(T·S) to build.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.api import attention_weights, dot_product_attention
from jaxattn.masks import DenseMask, Mask
from jaxattn.masks.data import non_boolean_mask_error
from jaxattn.score_mod import as_score_mod

__all__ = ["attention_fn", "flax_mask_to_jaxattn"]


def flax_mask_to_jaxattn(mask, batch_shape: tuple[int, ...]) -> Mask:
    """A Flax dense mask broadcastable to [*batch_shape, heads, T, S] as a DenseMask of
    shape [B, heads|1, T|1, S|1] with B = prod(batch_shape) (or 1 when it has no batch).

    Non-boolean masks are read as Flax reads them (see `_flax_mask_as_bool`)."""
    m = _flax_mask_as_bool(mask)
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


def _flax_mask_as_bool(mask):
    """Flax's own masks are often float 0/1 (`make_attention_mask`, `make_causal_mask` and
    `combine_masks` return float32 by default) or int, read as nonzero = attend. A float
    mask with any other value is an additive mask (0 / -inf) given to the wrong argument:
    read as nonzero it would attend exactly where it should not, so a concrete one is
    refused. A traced float mask cannot be inspected; it is read as Flax reads it."""
    m = jnp.asarray(mask)
    if m.dtype == jnp.bool_:
        return m
    if jnp.issubdtype(m.dtype, jnp.floating) and not isinstance(m, jax.core.Tracer):
        if not np.isin(np.asarray(m), (0, 1)).all():
            raise non_boolean_mask_error("mask (with values other than 0 and 1)", m.dtype)
    elif not (jnp.issubdtype(m.dtype, jnp.floating) or jnp.issubdtype(m.dtype, jnp.integer)):
        raise non_boolean_mask_error("mask", m.dtype)
    return m != 0


def _check_shapes(query, key, value):
    """Flax's shape rules, with the words its tests match ("same rank", "batch dims",
    "lengths must match", "depths must match")."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape"):
            raise ValueError(f"{name}: expected an array [batch..., length, heads, head_dim], got "
                             f"{type(x).__name__}.")
    shapes = tuple(tuple(x.shape) for x in (query, key, value))
    if query.ndim < 3 or not query.ndim == key.ndim == value.ndim:
        raise ValueError(f"query/key/value: expected arrays [batch..., length, heads, head_dim] of the "
                         f"same rank, got shapes {shapes}. Give all three the same batch dims.")
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        raise ValueError(f"query/key/value: expected the same batch dims (batch dims must match), got "
                         f"shapes {shapes}.")
    if key.shape[-3] != value.shape[-3]:
        raise ValueError(f"key/value: expected one length (k, v lengths must match), got {key.shape[-3]} "
                         f"and {value.shape[-3]}.")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query/key: expected one head dim (q, k depths must match), got "
                         f"{query.shape[-1]} and {key.shape[-1]}.")


def _flatten_bias(bias, batch_shape):
    b = jnp.asarray(bias)
    nb = len(batch_shape)
    b = b.reshape((1,) * max(0, nb + 3 - b.ndim) + b.shape)
    lead, tail = b.shape[:nb], b.shape[nb:]
    if all(d == 1 for d in lead):
        return b.reshape((1, *tail))
    b = jnp.broadcast_to(b, (*batch_shape, *tail))
    return b.reshape((math.prod(batch_shape), *tail))


def attention_fn(mask: Mask | None = None, *, implementation: str | None = None,
                 is_causal: bool = False, local_window_size=None, logits_soft_cap: float | None = None,
                 scale: float | None = None, rope=None, ignore_precision: bool = False,
                 score_mod=None, sinks=None):
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
      ignore_precision: drop the layer's `precision` and compute with the implementation's
        default (so a float32 layer asking for HIGHEST still runs on the GPU kernels, as TF32).
      score_mod, sinks: as in `jaxattn.dot_product_attention` (fixed values: a Flax layer
        has no parameter for them; `jaxattn.layers.MultiHeadAttention(sinks=True)` learns
        its sinks).

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
    score_mod = as_score_mod(score_mod)

    def fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
           dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False, dtype=None,
           precision=None, module=None, is_causal: bool = False, force_fp32_for_softmax: bool = False,
           qk_attn_weights_einsum=None, attn_weights_value_einsum=None, input_positions=None,
           promote_dtype=None, **unknown: Any):
        # Flax's linen layer passes only the keywords named in this signature, so each one it
        # may send is spelled out above; anything else a future Flax sends must be a no-op.
        # Bad input first (ValueError), then what jaxattn cannot serve (NotImplementedError).
        if promote_dtype is not None and not callable(promote_dtype):
            raise ValueError(f"promote_dtype: expected a callable, got {promote_dtype!r}.")
        _check_shapes(query, key, value)
        if (isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float, np.floating, np.integer))
                or not 0 <= dropout_rate < 1):
            raise ValueError(f"dropout_rate must be in the range [0, 1), got {dropout_rate!r}. "
                             "Pass 0.0 for no attention dropout.")
        use_dropout = bool(dropout_rate) and not deterministic
        if use_dropout and dropout_rng is None:
            raise ValueError("dropout_rng is required when dropout_rate > 0 and deterministic=False, "
                             "got None. Give the Flax layer a 'dropout' rng stream.")
        # Flax's rules for custom einsums (linen's dot_product_attention): both or neither,
        # and never with `precision` / `einsum_dot_general`.
        einsum_dot_general = unknown.pop("einsum_dot_general", None)
        if (qk_attn_weights_einsum is None) != (attn_weights_value_einsum is None):
            raise ValueError("qk_attn_weights_einsum and attn_weights_value_einsum: expected both or "
                             f"neither, got only {'qk' if attn_weights_value_einsum is None else 'value'}"
                             "_einsum. Give both (or leave both unset).")
        if qk_attn_weights_einsum is not None and (precision is not None or einsum_dot_general is not None):
            raise ValueError("precision / einsum_dot_general: expected None with custom einsums "
                             f"(qk_attn_weights_einsum), got precision={precision!r}, einsum_dot_general="
                             f"{einsum_dot_general!r}. Configure the einsums themselves.")
        if einsum_dot_general is not None:
            unknown["einsum_dot_general"] = einsum_dot_general
        if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
            raise NotImplementedError(
                "jaxattn attention cannot use custom (e.g. quantised AQT) einsums: leave the Flax "
                "layer's qk_attn_weights_einsum_cls / attn_weights_value_einsum_cls unset.")
        if input_positions is not None and rope is None:
            raise NotImplementedError(
                "got input_positions but no rotary embedding to apply them with: build the adapter "
                "with attention_fn(..., rope=nnx.RoPE()), or use "
                "jaxattn.layers.MultiHeadAttention(..., rope=True).")
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

        batch_shape = tuple(query.shape[:-3])
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
        precision = None if ignore_precision else precision
        seed = None
        if use_dropout:
            seed = jax.random.bits(dropout_rng, (), jnp.uint32)

        out = dot_product_attention(q, k, v, flat_bias, combined, scale=scale, is_causal=causal,
                                    local_window_size=local_window_size,
                                    logits_soft_cap=logits_soft_cap, precision=precision,
                                    dropout_rate=float(dropout_rate) if use_dropout else 0.0,
                                    dropout_seed=seed, broadcast_dropout=bool(broadcast_dropout),
                                    score_mod=score_mod, sinks=sinks, implementation=implementation)
        if module is not None:
            # The softmax is float32 here anyway; the sown weights take Flax's dtype.
            weights_dtype = jnp.float32 if force_fp32_for_softmax else query.dtype
            _sow_weights(module, q, k, flat_bias, combined, causal, precision, batch_shape, weights_dtype)
        return out.reshape((*batch_shape, *out.shape[-3:]))

    def _sow_weights(module, q, k, flat_bias, combined, causal, precision, batch_shape, dtype):
        """Flax's `sow_weights`: the probabilities (before dropout) [batch..., N, T, S], from
        the reference, since the kernels never form them."""
        warnings.warn(
            "jaxattn: sowing attention weights materialises the [batch, heads, T, S] probabilities "
            "(O(T·S) memory, computed by the reference path); call the layer with sow_weights=False "
            "outside of debugging.", stacklevel=4)
        weights = attention_weights(q, k, flat_bias, combined, scale=scale, is_causal=causal,
                                    local_window_size=local_window_size,
                                    logits_soft_cap=logits_soft_cap, precision=precision,
                                    score_mod=score_mod, sinks=sinks)
        weights = weights.astype(dtype).reshape((*batch_shape, *weights.shape[1:]))
        from flax import nnx  # the adapter serves linen too; nnx is imported only when sowing
        if isinstance(module, nnx.Module):
            module.sow(nnx.Intermediate, "attention_weights", weights)
        else:
            module.sow("intermediates", "attention_weights", weights)

    fn.__name__ = "jaxattn_attention_fn"
    fn.__qualname__ = fn.__name__
    return fn
