"""A pre-norm transformer block and a decoder-only LM in nnx where every layer picks its
own attention mask: the common recipe of interleaving cheap local (or sparse) layers
with a few full-attention layers.

    pattern = interleaved_pattern(6, local=masks.LocalMask(128, 0), every=3)
    #   -> [local, local, full, local, local, full]   (None = full)
    model = Decoder(vocab_size=256, d_model=128, num_heads=4, num_kv_heads=1,
                    layer_masks=pattern, implementation="pallas_triton", rngs=nnx.Rngs(0))
    logits = model(tokens)                              # [B, T] -> [B, T, vocab]
    logits = model(tokens, segment_ids=doc_ids)         # packed documents

Every layer is causal (the mask of a layer is ANDed with CausalMask); RoPE gives positions.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers.nnx_attention import MultiHeadAttention
from jaxattn.masks import Mask, SegmentMask

__all__ = ["TransformerBlock", "Decoder", "interleaved_pattern"]


def interleaved_pattern(num_layers: int, *, local: Mask, every: int = 2,
                        full: Mask | None = None) -> list[Mask | None]:
    """Per-layer masks: `local` everywhere except every `every`-th layer (1-based: layers
    every-1, 2·every-1, ...), which gets `full` (None = unrestricted attention).
    Gemma-2 alternates (every=2); Gemma-3 uses five local per global (every=6)."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}.")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected a positive int, got {every!r}. Use every=1 for all-full.")
    return [full if (i + 1) % every == 0 else local for i in range(num_layers)]


class TransformerBlock(nnx.Module):
    """x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)); causal, RoPE, GQA, any layer mask."""

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, mlp_dim: int | None = None, mask: Mask | None = None,
                 is_causal: bool = True, rope: bool = True, logits_soft_cap: float | None = None,
                 sinks: bool = False, implementation: str | None = None, dtype: Any = None,
                 rngs: nnx.Rngs):
        mlp_dim = 4 * d_model if mlp_dim is None else mlp_dim
        self.attn_norm = nnx.RMSNorm(d_model, dtype=dtype, rngs=rngs)
        self.attn = MultiHeadAttention(num_heads, d_model, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                       mask=mask, is_causal=is_causal, rope=rope,
                                       logits_soft_cap=logits_soft_cap, sinks=sinks,
                                       implementation=implementation, dtype=dtype, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d_model, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, mlp_dim, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, d_model, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, mask=None, positions=None, decode=False, prefill_lengths=None):
        if decode:   # the KV cache gives the positions (see MultiHeadAttention)
            h = self.attn(self.attn_norm(x), mask=mask, decode=True, prefill_lengths=prefill_lengths)
        else:
            h = self.attn(self.attn_norm(x), mask=mask, positions=positions)
        x = x + h
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class Decoder(nnx.Module):
    """Token embedding, one TransformerBlock per entry of `layer_masks`, RMSNorm, LM head.

    Args:
      layer_masks: one entry per layer: a static Mask ANDed with causal attention, or None
        for full causal attention. `interleaved_pattern` builds the usual recipes.
      implementation: one name for every layer, or one per layer.
      sinks: every layer learns one attention-sink logit per head (see MultiHeadAttention).
      Other arguments as in TransformerBlock.
    """

    def __init__(self, vocab_size: int, d_model: int, num_heads: int, *,
                 layer_masks: Sequence[Mask | None], num_kv_heads: int | None = None,
                 head_dim: int | None = None, mlp_dim: int | None = None,
                 logits_soft_cap: float | None = None, sinks: bool = False,
                 implementation: str | None | Sequence[str | None] = None,
                 dtype: Any = None, rngs: nnx.Rngs):
        layer_masks = list(layer_masks)
        if not layer_masks:
            raise ValueError("layer_masks: expected one entry per layer (None = full attention), got none.")
        impls = ([implementation] * len(layer_masks) if implementation is None or isinstance(implementation, str)
                 else list(implementation))
        if len(impls) != len(layer_masks):
            raise ValueError(f"implementation: expected one name or {len(layer_masks)} (one per layer), "
                             f"got {len(impls)}.")
        self.layer_masks = tuple(layer_masks)
        self.embed = nnx.Embed(vocab_size, d_model, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([
            TransformerBlock(d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             mlp_dim=mlp_dim, mask=m, is_causal=True, logits_soft_cap=logits_soft_cap,
                             sinks=sinks, implementation=impl, dtype=dtype, rngs=rngs)
            for m, impl in zip(layer_masks, impls)])
        self.norm = nnx.RMSNorm(d_model, dtype=dtype, rngs=rngs)
        self.lm_head = nnx.Linear(d_model, vocab_size, use_bias=False, dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_length: int, dtype: Any = None):
        """Empty KV caches of every layer for decode=True calls (see MultiHeadAttention)."""
        for block in self.blocks:
            block.attn.init_cache((batch, max_length), dtype)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, decode: bool = False,
                 prefill_lengths=None) -> jax.Array:
        """tokens int [B, T] -> logits [B, T, vocab]. segment_ids [B, T]: packed documents
        (attention stays inside a document); positions [B, T] default 0..T-1.

        decode=True (after init_cache): the tokens continue each row's cached sequence;
        with prefill_lengths (int32 [B] or an int) they are the prompt, filling the
        caches from empty."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected int [batch, length], got shape {tuple(tokens.shape)}.")
        if decode and (segment_ids is not None or positions is not None):
            raise ValueError("decode=True: expected no segment_ids or positions (the caches give the "
                             "positions), got some. Drop them.")
        mask = None if segment_ids is None else SegmentMask(segment_ids)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, mask=mask, positions=positions, decode=decode, prefill_lengths=prefill_lengths)
        return self.lm_head(self.norm(x)).astype(jnp.float32)
