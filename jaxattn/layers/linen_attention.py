"""The linen twin of `jaxattn.layers.MultiHeadAttention` (same arguments, parameter names
and shapes: query [D, N, H], key/value [D, K, H], out [N, H, D']).

    attn = LinenMultiHeadAttention(num_heads=8, num_kv_heads=2, rope=True, is_causal=True,
                                   mask=masks.LocalMask(256, 0))
    params = attn.init(jax.random.key(0), x)
    y = attn.apply(params, x, mask=masks.SegmentMask(doc_ids))

Decoding, in Flax linen's style: init with decode=True on inputs of the cache's full
length to create the "cache" collection, then prefill and step with it mutable:

    cache = attn.init(key, jnp.zeros((batch, max_length, d)), decode=True)["cache"]
    y, upd = attn.apply({**params, "cache": cache}, prompt, decode=True, prefill_lengths=lens,
                        mutable=["cache"])
    y, upd = attn.apply({**params, **upd}, x_next, decode=True, mutable=["cache"])
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxattn.api import dot_product_attention
from jaxattn.layers._common import check_heads, check_inputs, check_layer_mask, combine
from jaxattn.layers._decode import cached_attention, check_cache, decode_positions
from jaxattn.layers.rope import apply_rope
from jaxattn.masks import Mask
from jaxattn.score_mod import as_score_mod

__all__ = ["LinenMultiHeadAttention"]


class LinenMultiHeadAttention(nn.Module):
    """Multi-head attention with GQA/MQA, optional RoPE, any jaxattn Mask (linen).

    Fields mirror the nnx layer's constructor; `out_features` None keeps the input width
    and `head_dim` None uses features // num_heads; `sinks=True` learns the param
    "sinks" [N] (zero-init).
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    mask: Mask | None = None
    is_causal: bool = False
    local_window_size: Any = None
    logits_soft_cap: float | None = None
    scale: float | None = None
    rope: bool = False
    rope_theta: float = 10000.0
    score_mod: Any = None
    sinks: bool = False
    implementation: str | None = None
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
                 mask=None, positions=None, kv_positions=None, decode: bool = False,
                 prefill_lengths=None) -> jax.Array:
        """inputs_q [B, T, D] (inputs_kv [B, S, D], default inputs_q) -> [B, T, D']; the
        call-time mask, positions and kv_positions, decode and prefill_lengths are as in
        the nnx layer. While the "cache" collection is being created (init with
        decode=True), the inputs' length is the cache's max_length and the call computes
        plain causal attention."""
        layer_mask = check_layer_mask(self.mask)
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        check_inputs(inputs_q, inputs_kv, "jax.vmap (or nn.vmap)")
        features = inputs_q.shape[-1]
        num_kv_heads, head_dim = check_heads(self.num_heads, self.num_kv_heads, features, self.head_dim)
        dense = lambda feats, name, axis=-1: nn.DenseGeneral(  # noqa: E731
            features=feats, axis=axis, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)
        q = dense((self.num_heads, head_dim), "query")(inputs_q)
        k = dense((num_kv_heads, head_dim), "key")(inputs_kv)
        v = dense((num_kv_heads, head_dim), "value")(inputs_kv)
        out_features = features if self.out_features is None else self.out_features
        sinks = self.param("sinks", nn.initializers.zeros_init(), (self.num_heads,),
                           self.param_dtype) if self.sinks else None
        if decode and self.has_variable("cache", "cached_key"):
            x = self._decode(q, k, v, inputs_q, inputs_kv, self_attention, mask, layer_mask,
                             positions, kv_positions, prefill_lengths, sinks)
            return dense(out_features, "out", axis=(-2, -1))(x)
        if decode:   # creating the cache: the inputs' length is its capacity
            b, s = inputs_q.shape[:2]
            self.variable("cache", "cached_key", jnp.zeros, (b, s, num_kv_heads, head_dim), k.dtype)
            self.variable("cache", "cached_value", jnp.zeros, (b, s, num_kv_heads, head_dim), v.dtype)
            self.variable("cache", "cache_lengths", jnp.zeros, (b,), jnp.int32)
        if self.rope:
            q_pos = jnp.arange(inputs_q.shape[1]) if positions is None else positions
            if kv_positions is None:
                kv_positions = q_pos if self_attention else jnp.arange(inputs_kv.shape[1])
            q = apply_rope(q, q_pos, self.rope_theta)
            k = apply_rope(k, kv_positions, self.rope_theta)
        x = dot_product_attention(q, k, v, mask=combine(layer_mask, mask), scale=self.scale,
                                  is_causal=self.is_causal or decode,
                                  local_window_size=self.local_window_size,
                                  logits_soft_cap=self.logits_soft_cap,
                                  score_mod=as_score_mod(self.score_mod), sinks=sinks,
                                  implementation=self.implementation)
        return dense(out_features, "out", axis=(-2, -1))(x)

    def _decode(self, q, k, v, inputs_q, inputs_kv, self_attention, mask, layer_mask, positions,
                kv_positions, prefill_lengths, sinks):
        if not self_attention or positions is not None or kv_positions is not None:
            raise ValueError("decode=True: expected self-attention without positions (the cache "
                             "gives them), got inputs_kv, positions or kv_positions. Drop them.")
        cached_key = self.variable("cache", "cached_key")
        cached_value = self.variable("cache", "cached_value")
        cache_lengths = self.variable("cache", "cache_lengths")
        check_cache(cached_key.value, *inputs_q.shape[:2])
        if self.rope:
            pos = decode_positions(cache_lengths.value, inputs_q.shape[1], prefill_lengths is not None)
            q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        x, cached_key.value, cached_value.value, cache_lengths.value = cached_attention(
            q, k, v, cached_key.value, cached_value.value, cache_lengths.value,
            prefill_lengths=prefill_lengths, mask=combine(layer_mask, mask), scale=self.scale,
            logits_soft_cap=self.logits_soft_cap, local_window_size=self.local_window_size,
            implementation=self.implementation, score_mod=as_score_mod(self.score_mod), sinks=sinks)
        return x
