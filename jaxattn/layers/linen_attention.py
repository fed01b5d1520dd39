"""The linen twin of `jaxattn.layers.MultiHeadAttention` (same arguments, parameter names
and shapes: query [D, N, H], key/value [D, K, H], out [N, H, D']).

    attn = LinenMultiHeadAttention(num_heads=8, num_kv_heads=2, rope=True, is_causal=True,
                                   mask=masks.LocalMask(256, 0))
    params = attn.init(jax.random.key(0), x)
    y = attn.apply(params, x, mask=masks.SegmentMask(doc_ids))
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxattn.api import dot_product_attention
from jaxattn.layers._common import check_heads, check_inputs, check_layer_mask, combine
from jaxattn.layers.rope import apply_rope
from jaxattn.masks import Mask

__all__ = ["LinenMultiHeadAttention"]


class LinenMultiHeadAttention(nn.Module):
    """Multi-head attention with GQA/MQA, optional RoPE, any jaxattn Mask (linen).

    Fields mirror the nnx layer's constructor; `out_features` None keeps the input width
    and `head_dim` None uses features // num_heads.
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
    implementation: str | None = None
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
                 mask=None, positions=None, kv_positions=None) -> jax.Array:
        """inputs_q [B, T, D] (inputs_kv [B, S, D], default inputs_q) -> [B, T, D']; the
        call-time mask, positions and kv_positions are as in the nnx layer."""
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
        if self.rope:
            q_pos = jnp.arange(inputs_q.shape[1]) if positions is None else positions
            if kv_positions is None:
                kv_positions = q_pos if self_attention else jnp.arange(inputs_kv.shape[1])
            q = apply_rope(q, q_pos, self.rope_theta)
            k = apply_rope(k, kv_positions, self.rope_theta)
        x = dot_product_attention(q, k, v, mask=combine(layer_mask, mask), scale=self.scale,
                                  is_causal=self.is_causal, local_window_size=self.local_window_size,
                                  logits_soft_cap=self.logits_soft_cap,
                                  implementation=self.implementation)
        out_features = features if self.out_features is None else self.out_features
        return dense(out_features, "out", axis=(-2, -1))(x)
