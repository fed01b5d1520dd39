"""The decode entry of a kernel backend, and what it is told about one call.

    backend.decode(static: DecodeStatic, q, k_cache, v_cache, lengths, page_table=None,
                   operands=(), score_operands=())
        -> (out [B, Tq, N, H] in q's dtype, lse [B, N, Tq] float32, float64 for float64 inputs)

q [B, Tq, N, H]; k/v_cache [B, S_max, K, H] or, with page_table int32 [B, max_pages],
[num_pages, page_size, K, H]; lengths int32 [B] (traced); operands: the mask's arrays at
the query rows, each [B|1, N|1, Tq|1, capacity|1], read tile by tile and passed to
mask_fn; score_operands: the arrays static.score_mod reads (only passed when there is
one). lse is the natural log, -inf for a row with no key. Inputs arrive validated
(jaxattn.decode); a valid request the backend cannot serve raises NotImplementedError.

Decode attention (KV-cache decoding): the query holds the Tq newest tokens of each
sequence, at absolute positions lengths[b] - Tq ... lengths[b] - 1; key j of row b may be
attended when j < lengths[b], j <= the query's position (causal among the new tokens),
and the mask allows the pair. A kernel never sees a Mask object, only:

* ``mask_fn(q_pos, kv_pos, operand_tiles) -> bool``: the mask at absolute positions
  (q_pos int32 [rows, 1], kv_pos int32 [1, block_kv]), evaluated in the tiles that need
  it, with one tile per mask operand (see the backend's decode entry); None: no mask
  beyond causality and lengths;
* ``score_mod(score, batch, head, q_pos, kv_pos, *operand_views) -> score`` or None:
  a score function as in FlashStatic (pallas_kernels/flash_vjp.py), applied to the
  scaled, soft-capped logits of every visited tile before causality, lengths and the
  mask select them, so it never revives a masked score; q_pos and kv_pos are absolute
  positions and head the query head (0..N-1) of each packed query row. Forward only:
  decoding has no backward;
* :class:`KeyBounds`: affine bounds on the keys a query at position p may see, so that a
  kernel loops only over the cache tiles inside them (a sliding window of w keys over a
  long cache reads ~w keys, never the whole cache).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class KeyBounds:
    """Keys a query at position p may attend lie in [lo(p), hi(p)] (inclusive) with

        lo(p) = max(0, p + c for c in lower_offsets)
        hi(p) = min(p, p + c for c in upper_offsets)        (p: causal decoding)

    Both are non-decreasing in p. ``exact``: every key in the interval is allowed (the
    mask is an AND of causal and local masks), so tiles wholly inside the intervals of
    all query rows need no mask work; otherwise the interval is only a superset and the
    mask is evaluated in every tile.
    """

    lower_offsets: tuple[int, ...] = ()
    upper_offsets: tuple[int, ...] = ()
    exact: bool = True

    def lower(self, p):
        lo = p * 0   # 0, in p's type (a Python int or a traced int32)
        for c in self.lower_offsets:
            lo = _maximum(lo, p + c)
        return lo

    def upper(self, p):
        hi = p
        for c in self.upper_offsets:
            hi = _minimum(hi, p + c)
        return hi

    def span(self, q_len: int) -> int | None:
        """Most keys the q_len rows of one sequence can see together (None: unbounded)."""
        if not self.lower_offsets:
            return None
        return q_len - max(self.lower_offsets)


def _maximum(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else _jnp().maximum(a, b)


def _minimum(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else _jnp().minimum(a, b)


def _jnp():
    import jax.numpy as jnp
    return jnp


@dataclasses.dataclass(frozen=True)
class DecodeStatic:
    """Everything static about one decode call (part of the jit key).

    scale: multiplies q·k. logits_soft_cap: c for c·tanh(logits / c), or None.
    mask_fn: see the module docstring. bounds: KeyBounds of the mask AND causality.
    score_mod: see the module docstring (None: none); score_operand_shapes: the shapes
    of its operands, which reach the kernel flattened.
    num_splits: programs that share one sequence's keys (None: chosen from the shapes).
    config: backend config, or None for the backend's default. interpret: Pallas
    interpret mode (CPU).
    """

    scale: float
    logits_soft_cap: float | None
    mask_fn: Callable | None
    bounds: KeyBounds
    num_splits: int | None
    config: Any
    interpret: bool
    score_mod: Callable | None = None
    score_operand_shapes: tuple = ()
