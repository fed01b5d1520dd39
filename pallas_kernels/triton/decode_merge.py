"""The merge of flash-decoding's splits (Pallas, Triton lowering; interpret mode on CPU).

When the decode kernel (pallas_kernels/triton/decode.py) splits one sequence's cache over
S programs, split s leaves a partial output O_s, normalised by its own softmax sum, and
that sum's natural log lse_s (-inf for a split none of whose keys a row may see). The
softmax over all the splits' keys is their log-sum-exp combination:

    lse = log Σ_s exp(lse_s),        O = Σ_s exp(lse_s - lse) · O_s

One program per (batch row b, KV head h, block of rows, block of columns) walks its S
splits once, in order, with the online rescaling the attention kernels apply over key tiles (running max m, sum l,
accumulator acc, in the partials' float32, float64 for float64 inputs):

    m' = max(m, lse_s);   c = exp(m - m');   w = exp(lse_s - m')
    acc <- c · acc + w · O_s;   l <- c · l + w;   m <- m'

and ends with O = acc / l, lse = m + log l. Each loop step takes U consecutive splits
(U <= 32, fewer for large tiles), their U loads issued together so that their latencies
overlap, one rescale of acc by the step's new max, then U weighted adds; splits past S
in the last step are masked to weight 0. So only U split tiles are live at a time,
whatever S is (132 splits or more on a large GPU, rarely a power of two). When B·K is
small the [rows, H] tile is cut into blocks of rows and columns, one program each (the
programs of a row block read the same lse_s), so more programs share the reads. m starts at
the finite MASK_VALUE, so an empty split (lse_s = -inf) gets weight exp(-inf) = 0 and
-inf - (-inf) = NaN is never formed; a row no split saw keeps l = 0 and returns O = 0
with lse = -inf.

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
    packed rows' and hp), splits per loop step U, warps.

    One program per (b, h) leaves most of the GPU idle when B·K is small, and walks S
    splits in S / U dependent steps: at MQA decoding of one sequence (B·K = 1, 32 packed
    rows, 132 splits) 4 programs of [32, 32] tiles took 17 steps each and the step went
    from 27 to 51 µs on an H200 (BENCHMARKS.md, 2026-11-30). So the tile is cut (columns
    down to 32, rows down to 8, then columns down to 16) until about 128 programs run,
    and small tiles take up to 32 splits per step (U tiles of rows × columns float32,
    about 8k values together)."""
    rows: int
    columns: int
    per_step: int
    num_warps: int


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
    return MergeLaunch(rows=rb, columns=cb, per_step=min(splits, 32, max(1, 8192 // size)),
                       num_warps=min(16, max(4, size // 1024)))


def real_entries(rp: int, hp: int, rows: int, h: int, row0=0, col0=0):
    """Masks of a [rp, hp] tile's real entries, the tile's first row and column being row0
    and col0: (bool [rp, hp] for rows < `rows` and columns < h, bool [rp] for rows < `rows`)."""
    row = row0 + jax.lax.broadcasted_iota(jnp.int32, (rp, 1), 0)
    col = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, hp), 1)
    row_ok = row0 + jax.lax.iota(jnp.int32, rp) < rows
    return (row < rows) & (col < h), row_ok


def _merge_kernel(out_s_ref, lse_s_ref, o_ref, lse_ref, *, splits, per_step, rows, h):
    block_rows, columns = o_ref.shape
    entries, row_ok = real_entries(block_rows, columns, rows, h, row0=pl.program_id(2) * block_rows,
                                   col0=pl.program_id(3) * columns)
    acc_dtype = out_s_ref.dtype

    def merge_step(step, carry):
        m_i, l_i, acc = carry
        lses, outs = [], []
        for u in range(per_step):   # independent loads: in flight together
            s = step * per_step + u
            exists = s < splits      # the last step may run past S: weight 0
            s = jnp.minimum(s, splits - 1)
            lses.append(plgpu.load(lse_s_ref.at[s, :], mask=row_ok & exists, other=-jnp.inf))
            outs.append(plgpu.load(out_s_ref.at[s, :, :], mask=entries & exists, other=0.0))
        m_next = functools.reduce(jnp.maximum, lses, m_i)   # finite: m starts at MASK_VALUE
        correction = jnp.exp(m_i - m_next)
        l_i, acc = correction * l_i, correction[:, None] * acc
        for lse_s, o_s in zip(lses, outs):
            weight = jnp.exp(lse_s - m_next)                # 0 for an empty split
            l_i, acc = l_i + weight, acc + weight[:, None] * o_s
        return m_next, l_i, acc

    carry = (jnp.full((block_rows,), MASK_VALUE, acc_dtype), jnp.zeros((block_rows,), acc_dtype),
             jnp.zeros((block_rows, columns), acc_dtype))
    m_i, l_i, acc = jax.lax.fori_loop(0, -(-splits // per_step), merge_step, carry)

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
    kernel = functools.partial(_merge_kernel, splits=splits, per_step=launch.per_step, rows=rows, h=h)
    return pl.pallas_call(
        kernel,
        # every block starts inside the real rows and the H real columns
        grid=(b, kh, pl.cdiv(rows, rb), pl.cdiv(h, cb)),
        in_specs=[pl.BlockSpec((None, None, splits, rb, cb), lambda i, j, r, c: (i, j, 0, r, c)),
                  pl.BlockSpec((None, None, splits, rb), lambda i, j, r, c: (i, j, 0, r))],
        out_specs=[pl.BlockSpec((None, None, rb, cb), lambda i, j, r, c: (i, j, r, c)),
                   pl.BlockSpec((None, None, rb), lambda i, j, r, c: (i, j, r))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, rows, h), out_dtype),
                   jax.ShapeDtypeStruct((b, kh, rows), lse_s.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=1),
        interpret=interpret,
        name="jaxattn_decode_merge",
    )(out_s, lse_s)


__all__ = ["merge_splits", "merge_launch", "MergeLaunch", "real_entries"]
