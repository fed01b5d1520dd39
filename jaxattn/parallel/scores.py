"""A score function (`jaxattn.ScoreMod`) inside one ring step, at GLOBAL positions.

Each step of the ring is one ``dot_product_attention`` call over local rows and columns:
the call's positions are 0..lq-1 and 0..lk-1, in the call's own coordinates. A score
function must see what it would see in attention over the whole sequence: the global
query and key positions and the global batch row (the query head is never sharded). The
map has two stages:

* call → shard: the call's rows are the concatenation of static (start, length) slices
  of the device's shard (`Call.q_slices`, `Call.kv_slices`): static, part of the call's
  structure, so devices that share a ``lax.switch`` branch share it too;
* shard → global: a shard in zigzag order holds chunk d at slots [0, c) and chunk
  2P-1-d at slots [c, 2c), so global = x + offset, one offset per half. The offsets
  depend on the device index (and, for K/V, on the step), so they are traced data: they
  travel to fn as one more int32 operand, [q half 0, q half 1, kv half 0, kv half 1,
  first batch row], and cost one scalar load each inside a kernel.

So fn runs unchanged inside the kernels, and its operands' gradients come back from each
step's block backward, to be summed over the steps (and, by shard_map, over devices).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxattn.score_mod import ScoreMod

__all__ = ["StepScore", "step_offsets", "step_score_mod"]


def _to_shard(pos, slices):
    """Call positions -> shard positions through static (start, length) slices."""
    out = pos + slices[0][0]
    seen = slices[0][1]
    for start, length in slices[1:]:
        out = jnp.where(pos >= seen, pos + (start - seen), out)
        seen += length
    return out


@dataclasses.dataclass(frozen=True)
class StepScore:
    """fn of one ring step's call: its last operand is the step's int32 [5] offsets (see
    the module docstring), the others are fn's own."""
    fn: Any
    q_slices: tuple
    kv_slices: tuple
    chunk_q: int
    chunk_kv: int

    def __call__(self, score, batch, head, q_pos, kv_pos, *operands):
        *operands, offsets = operands
        q_shard = _to_shard(q_pos, self.q_slices)
        kv_shard = _to_shard(kv_pos, self.kv_slices)
        q_global = q_shard + jnp.where(q_shard >= self.chunk_q, offsets[1], offsets[0])
        kv_global = kv_shard + jnp.where(kv_shard >= self.chunk_kv, offsets[3], offsets[2])
        return self.fn(score, batch + offsets[4], head, q_global, kv_global, *operands)


def step_offsets(cfg, device, src, batch_rows: int):
    """int32 [5] offsets of this device's query shard and of the K/V shard of device `src`
    (both traced), and of this device's first batch row (batch_rows per device)."""
    p, cq, ck = cfg.num_shards, cfg.chunk_q, cfg.chunk_kv
    first_row = (jax.lax.axis_index(cfg.batch_axis_name) * batch_rows
                 if cfg.batch_axis_name is not None else jnp.int32(0))
    return jnp.stack([device * cq, (2 * p - 2 - device) * cq,
                      src * ck, (2 * p - 2 - src) * ck, first_row]).astype(jnp.int32)


def step_score_mod(cfg, q_slices, kv_slices, score):
    """The ScoreMod of one call, or None. score: None, or (fn's operands, offsets)."""
    if cfg.score_fn is None:
        return None
    operands, offsets = score
    fn = StepScore(cfg.score_fn, tuple(q_slices), tuple(kv_slices), cfg.chunk_q, cfg.chunk_kv)
    return ScoreMod(fn, *operands, offsets)
