"""Common sparse-attention recipes, built from the mask algebra."""

from __future__ import annotations

import numpy as np

from jaxattn.masks.base import Mask
from jaxattn.masks.data import SegmentMask
from jaxattn.masks.structured import (BlockSparseMask, CausalMask, GlobalMask, LocalMask,
                                      _check_int)


def longformer_mask(window: int, num_global: int, *, causal: bool = False) -> Mask:
    """Sliding window of ``window`` keys on each side (left only if causal) | global tokens."""
    window = _check_int("window", window, minimum=0)
    mask = LocalMask(window, 0 if causal else window) | GlobalMask(num_global)
    return mask & CausalMask() if causal else mask


def bigbird_mask(seq_len: int, *, window: int, num_global: int, num_random_blocks: int,
                 block_size: int = 128, causal: bool = False, seed: int = 0,
                 kv_len: int | None = None) -> Mask:
    """BigBird-style: local window | global tokens | ``num_random_blocks`` random key
    blocks of ``block_size`` per query block (drawn with ``seed``, among the blocks a
    causal row may see when ``causal``)."""
    seq_len = _check_int("seq_len", seq_len, minimum=1)
    kv_len = seq_len if kv_len is None else _check_int("kv_len", kv_len, minimum=1)
    block_size = _check_int("block_size", block_size, minimum=1)
    num_random_blocks = _check_int("num_random_blocks", num_random_blocks, minimum=0)
    n_q, n_k = -(-seq_len // block_size), -(-kv_len // block_size)
    rng = np.random.default_rng(seed)
    layout = np.zeros((n_q, n_k), bool)
    for r in range(n_q):
        candidates = np.arange(min(r + 1, n_k) if causal else n_k)
        if len(candidates):
            take = min(num_random_blocks, len(candidates))
            layout[r, rng.choice(candidates, size=take, replace=False)] = True
    mask = (LocalMask(window, 0 if causal else window) | GlobalMask(num_global)
            | BlockSparseMask(layout, block_size, block_size))
    return mask & CausalMask() if causal else mask


def causal_document_mask(segment_ids, kv_segment_ids=None) -> Mask:
    """Causal attention within each packed document: CausalMask() & SegmentMask(ids)."""
    return CausalMask() & SegmentMask(segment_ids, kv_segment_ids)
