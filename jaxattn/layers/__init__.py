"""Flax layers on jaxattn attention: the `attention_fn` adapter for Flax's own layers,
jaxattn's nnx and linen multi-head attention, and a per-layer-mask transformer."""

from jaxattn.layers.attention_fn import attention_fn, flax_mask_to_jaxattn
from jaxattn.layers.linen_attention import LinenMultiHeadAttention
from jaxattn.layers.nnx_attention import MultiHeadAttention
from jaxattn.layers.rope import apply_rope
from jaxattn.layers.transformer import Decoder, TransformerBlock, interleaved_pattern

__all__ = [
    "attention_fn", "flax_mask_to_jaxattn", "MultiHeadAttention", "LinenMultiHeadAttention",
    "apply_rope", "TransformerBlock", "Decoder", "interleaved_pattern",
]
