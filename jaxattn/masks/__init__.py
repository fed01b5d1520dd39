"""Attention masks: small immutable objects with `&`/`|` algebra and a dense oracle."""

from jaxattn.masks.base import AndMask, Mask, OrMask
from jaxattn.masks.structured import (BlockSparseMask, CausalMask, FullMask, GlobalMask,
                                      LocalMask, PrefixLMMask, StridedMask)
from jaxattn.masks.data import DenseMask, SegmentMask
from jaxattn.masks.lengths import LengthMask
from jaxattn.masks.recipes import bigbird_mask, causal_document_mask, longformer_mask
from jaxattn.masks.block_metadata import build_block_metadata, canonical_mask
from jaxattn.masks.plan import explain

__all__ = [
    "Mask", "AndMask", "OrMask", "FullMask", "CausalMask", "LocalMask", "StridedMask",
    "GlobalMask", "PrefixLMMask", "BlockSparseMask", "DenseMask", "SegmentMask", "LengthMask",
    "bigbird_mask", "longformer_mask", "causal_document_mask", "build_block_metadata",
    "canonical_mask", "explain",
]
