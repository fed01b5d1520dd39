"""The merge of flash-decoding's splits (Pallas, Triton lowering; interpret mode on CPU).

When the decode kernel (pallas_kernels/triton/decode.py) splits one sequence's cache over
S programs, split s leaves a partial output O_s, normalised by its own softmax sum, and
that sum's natural log lse_s (-inf for a split none of whose keys a row may see). The
softmax over all the splits' keys is their log-sum-exp combination:

    lse = log Σ_s exp(lse_s),        O = Σ_s exp(lse_s - lse) · O_s

One program per (batch row b, KV head h, block of rows, block of columns) reads its S
splits in steps of U (a power of two), with the online rescaling the attention kernels
apply over key tiles (running max m, sum l, accumulator acc, in the partials' float32,
float64 for float64 inputs):

    m' = max(m, max_u lse_u);   c = exp(m - m');   w_u = exp(lse_u - m')
    acc <- c · acc + Σ_u w_u · O_u;   l <- c · l + Σ_u w_u;   m <- m'

and ends with O = acc / l, lse = m + log l. A step is one [U, rows, columns] load of the
partial outputs and one [U, rows] load of their lse, reduced over the split axis on
chip: the whole step is one round trip to memory, and with U up to 128 (tiles of up to
16k values) one step covers every split of the usual launches (66 splits of 16-slot
paged caches at B·K = 8, 132 at MQA over one sequence: two). The kernel's time is then
its launch and that one round trip, not S dependent loads. The split axis of the blocks
is padded to whole steps; the entries past S are masked (weight 0, never read). When
B·K is small the [rows, H] tile is cut into blocks of rows and columns, one program
each (the programs of a row block read the same lse_s), so more programs share the
reads. m starts at the finite MASK_VALUE, so an empty split (lse_s = -inf) gets weight
exp(-inf) = 0 and -inf - (-inf) = NaN is never formed; a row no split saw keeps l = 0
and returns O = 0 with lse = -inf.

Layout shared with the decode kernel: a program's query rows are the packed rows
(row r = t·G + g) of one KV head; arrays hold only the `rows` real rows and H real
columns, while the kernels' tiles are [rp, hp] (powers of two, as Triton needs). Loads
and stores are masked to the real entries (`real_entries`), so the padding lives only
in registers and is never read from or written to memory.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import MASK_VALUE


@dataclasses.dataclass(frozen=True)
class MergeLaunch:
    """How the merge runs: a program's tile of rows × columns (powers of two, at most the
    packed rows' and hp), splits per step U (a power of two), warps.

    One program per (b, h) leaves most of the GPU idle when B·K is small: at MQA decoding
    of one sequence (B·K = 1, 32 packed rows, 132 splits) 4 programs of [32, 32] tiles
    walking the splits 32 at a time took the step from 27 to 51 µs on an H200
    (BENCHMARKS.md, 2026-11-30). So the tile is cut (columns down to 32, rows down to 8,
    then columns down to 16) until about 128 programs run, and a step loads U splits of
    the tile at once, U·rows·columns <= 16k values (64 per thread at 8 warps)."""
    rows: int
    columns: int
    per_step: int
    num_warps: int

    def steps(self, splits: int) -> int:
        return -(-splits // self.per_step)


# Values one merge step loads at once (U splits of a rows × columns tile).
STEP_VALUES = 16384


def merge_launch(batch: int, kv_heads: int, splits: int, rows: int, h: int, hp: int) -> MergeLaunch:
    wanted = max(1, 128 // (batch * kv_heads))     # tiles per (b, h)
    rb, cb = pl.next_power_of_2(rows), hp
    while pl.cdiv(rows, rb) * pl.cdiv(h, cb) < wanted:
        if cb > 32:
            cb //= 2
        elif rb > 8:
            rb //= 2
        elif cb > 16:
            cb //= 2
        else:
            break
    size = rb * cb
    fit = 1 << (max(1, STEP_VALUES // size).bit_length() - 1)   # largest power of two that fits
    per_step = min(pl.next_power_of_2(splits), fit)
    return MergeLaunch(rows=rb, columns=cb, per_step=per_step,
                       num_warps=min(16, max(4, per_step * size // 2048)))


def real_entries(rp: int, hp: int, rows: int, h: int, row0=0, col0=0):
    """Masks of a [rp, hp] tile's real entries, the tile's first row and column being row0
    and col0: (bool [rp, hp] for rows < `rows` and columns < h, bool [rp] for rows < `rows`)."""
    row = row0 + jax.lax.broadcasted_iota(jnp.int32, (rp, 1), 0)
    col = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, hp), 1)
    row_ok = row0 + jax.lax.iota(jnp.int32, rp) < rows
    return (row < rows) & (col < h), row_ok


def _merge_kernel(out_s_ref, lse_s_ref, o_ref, lse_ref, *, splits, per_step, steps, rows, h):
    block_rows, columns = o_ref.shape
    entries, row_ok = real_entries(block_rows, columns, rows, h, row0=pl.program_id(2) * block_rows,
                                   col0=pl.program_id(3) * columns)
    acc_dtype = out_s_ref.dtype

    def merge_step(step, carry):
        m_i, l_i, acc = carry
        first = step * per_step
        # Splits [first, first + U) of this tile, one load each for lse and O; entries
        # past S (the block's padding) are masked: lse -inf, weight 0.
        exists = first + jax.lax.broadcasted_iota(jnp.int32, (per_step, 1), 0) < splits
        lse_u = plgpu.load(lse_s_ref.at[pl.ds(first, per_step), :],
                           mask=exists & row_ok[None, :], other=-jnp.inf)      # [U, rows]
        o_u = plgpu.load(out_s_ref.at[pl.ds(first, per_step), :, :],
                         mask=exists[:, :, None] & entries[None], other=0.0)   # [U, rows, cols]
        m_next = jnp.maximum(m_i, lse_u.max(axis=0))   # finite: m starts at MASK_VALUE
        correction = jnp.exp(m_i - m_next)
        weight = jnp.exp(lse_u - m_next[None, :])      # 0 for an empty split
        l_i = correction * l_i + weight.sum(axis=0)
        acc = correction[:, None] * acc + (weight[:, :, None] * o_u).sum(axis=0)
        return m_next, l_i, acc

    carry = (jnp.full((block_rows,), MASK_VALUE, acc_dtype), jnp.zeros((block_rows,), acc_dtype),
             jnp.zeros((block_rows, columns), acc_dtype))
    m_i, l_i, acc = jax.lax.fori_loop(0, steps, merge_step, carry)

    # A row no split saw (l = 0) returns 0 with lse = -inf.
    nonempty = l_i > 0
    l_safe = jnp.where(nonempty, l_i, 1.0)
    plgpu.store(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype), mask=entries)
    lse = jnp.where(nonempty, m_i + jnp.log(l_safe), -jnp.inf)
    # Every column block computed the same lse from the same inputs: each stores it.
    plgpu.store(lse_ref, lse.astype(lse_ref.dtype), mask=row_ok)


def merge_splits(out_s, lse_s, *, hp: int, out_dtype, interpret: bool):
    """Exact log-sum-exp merge over the split axis (2), one kernel.

    out_s [B, K, S, rows, H] float: each split's output normalised by its own sum;
    lse_s [B, K, S, rows] (same dtype): each split's natural-log sum, -inf where the split
    saw no key. hp >= H: the power of two the kernel's columns are tiled from.
    Returns (out [B, K, rows, H] in out_dtype, lse [B, K, rows] in lse_s's dtype)."""
    b, kh, splits, rows, h = out_s.shape
    launch = merge_launch(b, kh, splits, rows, h, hp)
    rb, cb = launch.rows, launch.columns
    steps = launch.steps(splits)
    padded = steps * launch.per_step
    kernel = functools.partial(_merge_kernel, splits=splits, per_step=launch.per_step, steps=steps,
                               rows=rows, h=h)
    return pl.pallas_call(
        kernel,
        # every block starts inside the real rows and the H real columns; its split axis
        # is padded to whole steps (masked past S)
        grid=(b, kh, pl.cdiv(rows, rb), pl.cdiv(h, cb)),
        in_specs=[pl.BlockSpec((None, None, padded, rb, cb), lambda i, j, r, c: (i, j, 0, r, c)),
                  pl.BlockSpec((None, None, padded, rb), lambda i, j, r, c: (i, j, 0, r))],
        out_specs=[pl.BlockSpec((None, None, rb, cb), lambda i, j, r, c: (i, j, r, c)),
                   pl.BlockSpec((None, None, rb), lambda i, j, r, c: (i, j, r))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, rows, h), out_dtype),
                   jax.ShapeDtypeStruct((b, kh, rows), lse_s.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=1),
        interpret=interpret,
        name="jaxattn_decode_merge",
    )(out_s, lse_s)


__all__ = ["merge_splits", "merge_launch", "MergeLaunch", "real_entries"]
