"""jaxattn's multi-head attention layer for Flax nnx.

    attn = MultiHeadAttention(num_heads=8, in_features=512, num_kv_heads=2, rope=True,
                              mask=masks.LocalMask(256, 0), is_causal=True,
                              implementation="pallas_triton", rngs=nnx.Rngs(0))
    y = attn(x)                                        # x [B, T, 512] -> [B, T, 512]
    y = attn(x, mask=masks.SegmentMask(doc_ids))       # per-batch masks at call time

    attn.init_cache((batch, max_length))                # decoding with a KV cache
    y = attn(prompt, decode=True, prefill_lengths=lens) # prefill: the kernels, slots 0..T-1
    y = attn(x_next, decode=True)                       # then one token (or a few) at a time

The structured mask given at construction is static: the kernels analyse it once and
skip every tile it rules out. Per-batch masks (segment ids, a boolean array) are given at
call time and ANDed in. Parameters: query [D, N, H], key/value [D, K, H], out [N, H, D']
(the same names and shapes as the linen twin, `jaxattn.layers.linen_attention`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.api import dot_product_attention
from jaxattn.layers._common import check_heads, check_inputs, check_layer_mask, combine
from jaxattn.layers._decode import cached_attention, check_cache, decode_positions
from jaxattn.layers.rope import apply_rope
from jaxattn.masks import Mask
from jaxattn.score_mod import as_score_mod

__all__ = ["MultiHeadAttention"]

_default_init = nnx.initializers.lecun_normal()


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with GQA/MQA, optional RoPE, any jaxattn Mask.

    Args:
      num_heads: query heads N.
      in_features: model width D of the inputs.
      num_kv_heads: key/value heads K (a divisor of N; 1 = MQA). Default N.
      head_dim: H. Default D // N.
      out_features: output width. Default D.
      mask: a static `jaxattn.masks.Mask` applied at every call (None = full attention).
      is_causal, local_window_size, logits_soft_cap, scale: as in `dot_product_attention`.
      rope: rotate q and k with RoPE (positions default to 0..T-1), base `rope_theta`.
      score_mod: as in `dot_product_attention` (a ScoreMod whose operands are fixed arrays).
      sinks: learn one attention-sink logit per query head (param `sinks` [N], zero-init;
        see `jaxattn.sinks`).
      implementation: as in `dot_product_attention` (None = best available).
      use_bias: biases in the four projections.
      dtype: computation dtype (None: the inputs'); param_dtype: parameter dtype.
    """

    def __init__(self, num_heads: int, in_features: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, out_features: int | None = None,
                 mask: Mask | None = None, is_causal: bool = False, local_window_size=None,
                 logits_soft_cap: float | None = None, scale: float | None = None,
                 rope: bool = False, rope_theta: float = 10000.0, score_mod=None, sinks: bool = False,
                 implementation: str | None = None,
                 use_bias: bool = False, dtype: Any = None, param_dtype: Any = jnp.float32,
                 kernel_init=_default_init, rngs: nnx.Rngs):
        num_kv_heads, head_dim = check_heads(num_heads, num_kv_heads, in_features, head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.in_features = in_features
        self.out_features = in_features if out_features is None else out_features
        self.mask = check_layer_mask(mask)
        self.is_causal = bool(is_causal)
        self.local_window_size = local_window_size
        self.logits_soft_cap = logits_soft_cap
        self.scale = scale
        self.rope, self.rope_theta = bool(rope), float(rope_theta)
        self.implementation = implementation
        self.score_mod = nnx.data(as_score_mod(score_mod))   # its operands are arrays (data)
        self.dtype = dtype
        # One learned logit per query head, joining every row's softmax (zero-init: exp(0) = 1).
        self.sinks = nnx.Param(jnp.zeros((num_heads,), param_dtype)) if sinks else nnx.data(None)
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=kernel_init, rngs=rngs)
        self.query = nnx.LinearGeneral(in_features, (num_heads, head_dim), **kw)
        self.key = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **kw)
        self.value = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **kw)
        self.out = nnx.LinearGeneral((num_heads, head_dim), self.out_features, axis=(-2, -1), **kw)
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_lengths: nnx.Cache | None = nnx.data(None)

    def init_cache(self, input_shape, dtype: Any = None):
        """An empty KV cache for decode=True calls, as Flax's `init_cache`: input_shape is
        (batch, max_length[, features]); keys and values [B, max_length, K, H] in `dtype`
        (default: the layer's dtype, else float32) and lengths int32 [B] (all 0)."""
        batch, max_length = input_shape[:2]
        dtype = dtype or self.dtype or jnp.float32
        shape = (batch, max_length, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_lengths = nnx.Cache(jnp.zeros((batch,), jnp.int32))

    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
                 mask=None, positions=None, kv_positions=None, decode: bool = False,
                 prefill_lengths=None) -> jax.Array:
        """inputs_q [B, T, D] (inputs_kv [B, S, D], default inputs_q) -> [B, T, D'].

        mask: None, a Mask (e.g. SegmentMask) or a bool array broadcastable to [B, N, T, S],
        ANDed with the layer's mask. positions / kv_positions: RoPE positions [T] or [B, T]
        (default 0..T-1; kv_positions default to positions for self-attention).

        decode=True (after init_cache; self-attention): the T tokens are appended to the
        KV cache and attend causally over it (positions are their slots); with
        prefill_lengths int32 [B] (or an int) the cache is filled from empty instead,
        through the prefill kernels (see jaxattn.layers._decode)."""
        if decode:
            return self._decode(inputs_q, inputs_kv, mask, positions, kv_positions, prefill_lengths)
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        check_inputs(inputs_q, inputs_kv)
        q = self.query(inputs_q)
        k = self.key(inputs_kv)
        v = self.value(inputs_kv)
        if self.rope:
            t, s = inputs_q.shape[1], inputs_kv.shape[1]
            q_pos = jnp.arange(t) if positions is None else positions
            if kv_positions is None:
                kv_positions = q_pos if self_attention else jnp.arange(s)
            q = apply_rope(q, q_pos, self.rope_theta)
            k = apply_rope(k, kv_positions, self.rope_theta)
        x = dot_product_attention(q, k, v, mask=combine(self.mask, mask), scale=self.scale,
                                  is_causal=self.is_causal, local_window_size=self.local_window_size,
                                  logits_soft_cap=self.logits_soft_cap, score_mod=self.score_mod,
                                  sinks=self._sinks(), implementation=self.implementation)
        return self.out(x)

    def _sinks(self):
        return None if self.sinks is None else self.sinks[...]

    def _decode(self, inputs, inputs_kv, mask, positions, kv_positions, prefill_lengths):
        if inputs_kv is not None or positions is not None or kv_positions is not None:
            raise ValueError("decode=True: expected self-attention without positions (the cache "
                             "gives them), got inputs_kv, positions or kv_positions. Drop them.")
        check_inputs(inputs, inputs)
        check_cache(None if self.cached_key is None else self.cached_key[...], *inputs.shape[:2])
        q, k, v = self.query(inputs), self.key(inputs), self.value(inputs)
        if self.rope:
            pos = decode_positions(self.cache_lengths[...], inputs.shape[1], prefill_lengths is not None)
            q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        x, ck, cv, lengths = cached_attention(
            q, k, v, self.cached_key[...], self.cached_value[...], self.cache_lengths[...],
            prefill_lengths=prefill_lengths, mask=combine(self.mask, mask), scale=self.scale,
            logits_soft_cap=self.logits_soft_cap, local_window_size=self.local_window_size,
            implementation=self.implementation, score_mod=self.score_mod, sinks=self._sinks())
        self.cached_key[...], self.cached_value[...], self.cache_lengths[...] = ck, cv, lengths
        return self.out(x)
