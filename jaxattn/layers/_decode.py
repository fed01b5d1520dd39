"""The KV-cache step shared by the nnx and linen layers' decode mode.

A cache is three arrays: keys and values [B, max_length, K, H] and lengths int32 [B]
(tokens written in each row). A decode-mode call with T new tokens per row either

* prefills (``prefill_lengths`` given; the cache is taken as empty): the T tokens attend
  causally among themselves through `dot_product_attention` (the FlashAttention kernels),
  their keys/values fill slots 0..T-1 and lengths become ``prefill_lengths`` (prompts of
  different lengths are right-padded to T; slots past a row's length are overwritten by
  the tokens that follow), or
* appends: the tokens take slots lengths[b] .. lengths[b] + T - 1 of each row and attend
  over the cache through `decode_attention` (T = 1 for plain generation).

Attention in decode mode is always causal; RoPE positions are the slots the tokens take.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.api import dot_product_attention
from jaxattn.decode import decode_attention, decode_implementations
from jaxattn.masks import canonical_mask

__all__ = ["decode_positions", "cached_attention", "check_cache"]


def check_cache(cache_k, batch: int, new_tokens: int):
    if cache_k is None:
        raise ValueError("decode=True: the KV cache is not initialised. Call layer.init_cache((batch, "
                         "max_length)) first (linen: init the layer with decode=True on inputs of the "
                         "full length).")
    if cache_k.shape[0] != batch or new_tokens > cache_k.shape[1]:
        raise ValueError(f"decode inputs: expected batch {cache_k.shape[0]} and at most {cache_k.shape[1]} "
                         f"tokens (the cache's shape {tuple(cache_k.shape)}), got batch {batch} with "
                         f"{new_tokens} tokens. Re-run init_cache with the batch and max_length you need.")


def decode_positions(lengths, new_tokens: int, prefill: bool):
    """Absolute positions [B, T] of the new tokens (the cache slots they take)."""
    start = jnp.zeros_like(lengths) if prefill else lengths
    return start[:, None] + jnp.arange(new_tokens, dtype=jnp.int32)[None, :]


def _write(cache, new, start):
    """cache [B, S, K, H] with new [B, T, K, H] written at slots start[b] .. start[b] + T - 1."""
    return jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (s, 0, 0)))(
        cache, new, start)


def cached_attention(q, k, v, cache_k, cache_v, lengths, *, prefill_lengths, mask, scale,
                     logits_soft_cap, local_window_size, implementation, score_mod=None,
                     sinks=None):
    """One decode-mode attention: returns (out [B, T, N, H], cache_k, cache_v, lengths).
    A score_mod sees the same positions in both: the slots the tokens take."""
    b, t = q.shape[:2]
    prefill = prefill_lengths is not None
    start = jnp.zeros_like(lengths) if prefill else lengths
    cache_k, cache_v = _write(cache_k, k, start), _write(cache_v, v, start)
    if prefill:
        out = dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                    local_window_size=local_window_size,
                                    logits_soft_cap=logits_soft_cap, score_mod=score_mod, sinks=sinks,
                                    implementation=implementation)
        return out, cache_k, cache_v, jnp.broadcast_to(jnp.asarray(prefill_lengths, jnp.int32), (b,))
    lengths = lengths + t
    full_mask = canonical_mask(mask, local_window_size=local_window_size)
    # Implementations without a decode path (xla, cudnn) leave the choice to decode_attention.
    out = decode_attention(q, cache_k, cache_v, lengths=lengths, mask=full_mask, scale=scale,
                           logits_soft_cap=logits_soft_cap, score_mod=score_mod, sinks=sinks,
                           implementation=implementation if implementation in decode_implementations() else None)
    return out, cache_k, cache_v, lengths
