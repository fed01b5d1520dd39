"""The FLOP model every jaxattn benchmark reports, with the mask's allowed pairs counted exactly.

Attention of a query block [B, T, N, H] against keys and values [B, S, K, H] does two matrix
products per head: the logits q·kᵀ (T·S dot products of length H: 2·T·S·H FLOPs, a multiply
and an add each) and the output p·v (another 2·T·S·H). So, for the pairs a mask allows:

    forward          = 4 · B · N · T · S · H · fraction
    backward         = 2.5 · forward
    forward_and_vjp  = 3.5 · forward

``fraction`` is the share of (query i, key j) pairs the mask allows: 1 for full attention,
exactly (T+1)/(2T) for causal with T = S (≈ ½, the convention of the FlashAttention papers),
about (w+1)/S for a causal window of w keys. The backward's 2.5 is the usual count for
FlashAttention's backward: it recomputes q·kᵀ and does four more products (dV, dP, dQ, dK),
five in all against the forward's two.

These are the FLOPs of *useful work only*: the pairs the mask rules out count for nothing,
so a kernel that computes masked-out tiles and throws them away is charged the time and
given no credit; softmax, exponentials and the head-dim padding of a kernel count for
nothing either. TFLOP/s = these FLOPs / median seconds per call.

Counting never builds the T×S matrix at large sizes:
* single structured masks (full, causal, local, strided, global, prefix-LM) have a
  closed form per query row, O(T);
* anything else (compositions, block-sparse, dense, segment masks) is counted exactly
  tile by tile: the mask's own tile states say which tiles are FULL (counted by area)
  and EMPTY (skipped), and only PARTIAL tiles are evaluated pair by pair with the
  mask's element-wise definition. Tile states are conservative (a PARTIAL tile may be
  empty, never the reverse), so the count is exact whatever the tile size.
"""

from __future__ import annotations

import numpy as np

from jaxattn.masks import (CausalMask, FullMask, GlobalMask, LocalMask, Mask, PrefixLMMask,
                           StridedMask)
from jaxattn.masks.block_metadata import tile_states
from pallas_kernels.metadata import FULL, PARTIAL

FORWARD_FLOPS_PER_PAIR_AND_DIM = 4  # 2 for q·kᵀ, 2 for p·v
BACKWARD_FACTOR = 2.5
MODE_FACTORS = {"forward": 1.0, "backward": BACKWARD_FACTOR, "forward_and_vjp": 1.0 + BACKWARD_FACTOR}

# Largest tile grid side used when counting; the tile size grows with the lengths.
_MAX_GRID = 2048
_MIN_TILE = 128


def row_counts(mask: Mask | None, q_len: int, kv_len: int) -> np.ndarray | None:
    """Allowed keys of every query row, int64 [T], for masks with a closed form; None
    for the rest (use :func:`allowed_pairs`)."""
    i = np.arange(q_len, dtype=np.int64)
    s = int(kv_len)
    if mask is None or isinstance(mask, FullMask):
        return np.full(q_len, s, np.int64)
    if isinstance(mask, CausalMask):
        return np.clip(i + mask.offset + 1, 0, s)
    if isinstance(mask, LocalMask):
        centre = i + mask.offset
        lo = np.zeros_like(i) if mask.left is None else np.maximum(0, centre - mask.left)
        hi = np.full_like(i, s - 1) if mask.right is None else np.minimum(s - 1, centre + mask.right)
        return np.maximum(0, hi - lo + 1)
    if isinstance(mask, GlobalMask):
        g = mask.num_global
        return np.where(i < g, s, min(g, s)).astype(np.int64)
    if isinstance(mask, PrefixLMMask):
        return np.minimum(s, np.maximum(mask.prefix_len, i + 1))
    if isinstance(mask, StridedMask):
        first = np.mod(i + mask.offset, mask.stride)  # smallest j >= 0 with j ≡ i + offset
        return np.where(first < s, (s - 1 - first) // mask.stride + 1, 0)
    return None


def _operand_window(op, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
    """An operand as `evaluate` sees it for rows q_idx × columns kv_idx (numpy), the
    windowed twin of jaxattn.masks.base.full_operand_view: broadcastable to
    [Bm, Hm, len(q_idx), len(kv_idx)]."""
    a = np.asarray(op.array)
    if op.kind == "block":
        bq, bk = op.layout_block
        return a[..., (q_idx // bq)[:, None], (kv_idx // bk)[None, :]]
    if op.kind == "q":
        return a[:, q_idx][:, None, :, None]
    if op.kind == "kv":
        return a[:, kv_idx][:, None, None, :]
    if op.kind == "qkv":
        rows = q_idx if a.shape[-2] > 1 else np.zeros_like(q_idx)
        cols = kv_idx if a.shape[-1] > 1 else np.zeros_like(kv_idx)
        return a[..., rows[:, None], cols[None, :]]
    raise ValueError(f"operand kind {op.kind!r} has no window view")


def evaluate_window(mask: Mask, q_idx, kv_idx) -> np.ndarray:
    """bool [Bm, Hm, len(q_idx), len(kv_idx)]: the mask's definition on these absolute
    query rows and key columns (no T×S matrix)."""
    q_idx = np.asarray(q_idx, np.int64)
    kv_idx = np.asarray(kv_idx, np.int64)
    values = tuple(_operand_window(o, q_idx, kv_idx) for o in mask.operands())
    out = np.asarray(mask.evaluate(q_idx[:, None].astype(np.int32), kv_idx[None, :].astype(np.int32), values))
    bm, hm = mask.batch_heads()
    return np.broadcast_to(out, (bm, hm, len(q_idx), len(kv_idx)))


def _count_tiled(mask: Mask, q_len: int, kv_len: int) -> float:
    side = max(q_len, kv_len)
    tile = _MIN_TILE
    while -(-side // tile) > _MAX_GRID:
        tile *= 2
    states = np.asarray(tile_states(mask, q_len, kv_len, tile, tile))  # [Bm', Hm', nQ, nK]
    bm, hm = mask.batch_heads()
    states = np.broadcast_to(states, (bm, hm) + states.shape[2:])
    n_q, n_k = states.shape[2:]
    rows = np.minimum((np.arange(n_q) + 1) * tile, q_len) - np.arange(n_q) * tile
    cols = np.minimum((np.arange(n_k) + 1) * tile, kv_len) - np.arange(n_k) * tile
    area = rows[:, None] * cols[None, :]
    total = float((area * (states == FULL)).sum())
    partial = (states == PARTIAL).any(axis=(0, 1))  # [nQ, nK]
    for qb in np.nonzero(partial.any(axis=1))[0]:
        q_idx = np.arange(qb * tile, min((qb + 1) * tile, q_len))
        kbs = np.nonzero(partial[qb])[0]
        kv_idx = np.concatenate([np.arange(kb * tile, min((kb + 1) * tile, kv_len)) for kb in kbs])
        allowed = evaluate_window(mask, q_idx, kv_idx)
        # Keep only the slices whose state at this tile is PARTIAL (FULL ones are counted).
        is_partial = np.repeat(states[:, :, qb, kbs] == PARTIAL, cols[kbs], axis=-1)  # [Bm, Hm, cols]
        total += float((allowed & is_partial[:, :, None, :]).sum())
    return total / (bm * hm)


def allowed_pairs(mask: Mask | None, q_len: int, kv_len: int) -> float:
    """Allowed (i, j) pairs of one [T, S] attention matrix (the mean over batch rows and
    heads for masks that vary across them). Exact."""
    counts = row_counts(mask, q_len, kv_len)
    if counts is not None:
        return float(counts.sum())
    return _count_tiled(mask, q_len, kv_len)


def allowed_fraction(mask: Mask | None, q_len: int, kv_len: int) -> float:
    return allowed_pairs(mask, q_len, kv_len) / float(q_len * kv_len)


def attention_flops(*, batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
                    mask: Mask | None = None, mode: str = "forward",
                    fraction: float | None = None) -> float:
    """FLOPs of useful work (the model of this module's docstring). ``mode``: forward, backward or forward_and_vjp.
    Pass ``fraction`` to reuse an allowed fraction already counted."""
    if mode not in MODE_FACTORS:
        raise ValueError(f"mode must be one of {tuple(MODE_FACTORS)}, got {mode!r}.")
    if fraction is None:
        fraction = allowed_fraction(mask, q_len, kv_len)
    forward = FORWARD_FLOPS_PER_PAIR_AND_DIM * batch * heads * q_len * kv_len * head_dim * fraction
    return forward * MODE_FACTORS[mode]
