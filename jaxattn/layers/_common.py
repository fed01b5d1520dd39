"""Checks and mask plumbing shared by the nnx and linen layers."""

from __future__ import annotations

from jaxattn.masks import DenseMask, Mask
from jaxattn.masks.data import non_boolean_mask_error


def check_layer_mask(mask) -> Mask | None:
    """A mask fixed at construction must be static (hashable, no jax arrays)."""
    if mask is None:
        return None
    if not isinstance(mask, Mask):
        raise ValueError(
            f"mask: expected None or a jaxattn.masks.Mask at construction, got {type(mask).__name__}. "
            "Per-batch boolean arrays go to the call: layer(x, mask=array).")
    if mask.is_dynamic:
        raise ValueError(
            "mask: a mask holding jax arrays (e.g. SegmentMask) changes per batch; pass it at call "
            "time, layer(x, mask=masks.SegmentMask(ids)), not to the constructor.")
    return mask


def combine(layer_mask: Mask | None, call_mask) -> Mask | None:
    """layer_mask AND call_mask; a boolean array at call time becomes a DenseMask
    (broadcastable to [B, N, T, S]). Non-boolean arrays are refused, as by
    `jaxattn.dot_product_attention`."""
    if call_mask is None:
        return layer_mask
    if not isinstance(call_mask, Mask):
        if not hasattr(call_mask, "dtype"):
            raise ValueError(f"mask: expected None, a jaxattn.masks.Mask or a bool array broadcastable "
                             f"to [B, N, T, S], got {type(call_mask).__name__}.")
        if call_mask.dtype != bool:
            # Never cast: an additive float mask cast to bool attends exactly where it
            # should not (0 -> False, -inf -> True).
            raise non_boolean_mask_error("mask", call_mask.dtype)
        call_mask = DenseMask(call_mask)
    return call_mask if layer_mask is None else layer_mask & call_mask


def check_heads(num_heads: int, num_kv_heads: int | None, features: int, head_dim: int | None):
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}.")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a positive divisor of num_heads={num_heads} "
                         f"(num_heads must be a multiple of it: GQA/MQA), got {num_kv_heads!r}. Use 1 for MQA or num_heads for MHA.")
    if head_dim is None:
        if features % num_heads:
            raise ValueError(f"head_dim: in_features={features} is not divisible by num_heads={num_heads}; "
                             "pass head_dim=... explicitly.")
        head_dim = features // num_heads
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}.")
    return num_kv_heads, head_dim


def check_inputs(inputs_q, inputs_kv, vmap_hint: str = "jax.vmap"):
    """Both inputs must be [batch, length, features]."""
    if inputs_q.ndim != 3 or inputs_kv.ndim != 3:
        raise ValueError(f"inputs: expected [batch, length, features], got shapes "
                         f"{tuple(inputs_q.shape)} and {tuple(inputs_kv.shape)}. "
                         f"Use {vmap_hint} for extra leading axes.")
