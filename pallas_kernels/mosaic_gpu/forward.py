"""Block-sparse FlashAttention forward for Hopper (Pallas Mosaic GPU), FA3-style.

One CTA per (q-block of 128 rows, query head n, batch row b), three warpgroups:

* warpgroup 2, the producer, keeps few registers and only issues TMA copies: it walks
  this q-block's FULL list, then its PARTIAL list (counts and kv-block indices read from
  the block metadata in global memory), and copies each listed K and V tile into one of
  ``num_stages`` swizzled shared-memory slots as soon as both consumers released it.
  EMPTY tiles are in no list and are never loaded. Under GQA the K/V head is n // G;
  K/V are indexed, never repeated.
* warpgroups 0 and 1, the consumers, own 64 query rows each. Per listed tile
  (FlashAttention-2 Algorithm 1, lines 6-10): S = Q Kᵀ by wgmma from shared memory,
  the online softmax in float32 registers in base 2 (log2(e)·scale folded into one
  multiply), then O += P V by wgmma with P in registers. A shared "schedule" barrier
  makes the two consumers take turns on the tensor cores, so one computes its softmax
  while the other multiplies (FlashAttention-3's ping-pong).
* FULL tiles do no mask work. PARTIAL tiles evaluate ``mask_fn`` and ``kv_pos < kv_len``
  in the wgmma accumulator layout and *select* -inf for what the mask rules out, so a NaN
  in a masked score cannot reach the sums.
* Epilogue (Algorithm 1, line 12): O = acc / l staged through shared memory and stored
  by TMA; lse = ln(2)·(m + log2 l). A row with no allowed key has l = 0 and returns
  O = 0, lse = -inf (the running max starts at a finite MASK_VALUE, so no -inf - -inf).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.metadata import pad_to_multiple
from pallas_kernels.mosaic_gpu.common import (LN2, LOG2E, MASK_VALUE, OperandRef, TileLists,
                                              pad_btnh, padded_head_dim)
from pallas_kernels.mosaic_gpu.config import CONSUMER_WARPGROUPS, ROWS_PER_WARPGROUP

_WGMMA = plgpu.Layout.WGMMA
_WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)


def _smem_tile(shape, dtype):
    """Shared memory laid out for TMA and wgmma: (8, 64)-element tiles, 128-byte swizzle."""
    swizzle = 128
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle)))


def _kernel(lists: TileLists, q_ref, k_ref, v_ref, operand_refs, o_ref, lse_ref, scratch, *,
            num_q_blocks, groups, block_kv, stages, scale, kv_len, mask_fn, dtype):
    (q_smem, k_smem, v_smem, lse_smem), (k_ready, v_ready, q_ready), consumed, schedule = scratch
    k_consumed, v_consumed = consumed
    rows = ROWS_PER_WARPGROUP
    # Heaviest q-blocks (under causal-like masks, the last ones) are scheduled first.
    qi = num_q_blocks - 1 - lax.axis_index("q")
    head = lax.axis_index("heads")
    batch = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    walk = lists.walker(batch, head, qi)
    num_full, total = walk.num_full, walk.total

    def schedule_turn():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < CONSUMER_WARPGROUPS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_start = qi * (CONSUMER_WARPGROUPS * rows) + wg * rows
        q_tile = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, rows), head], q_tile,
                                q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])

        m_i = plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32), _WGMMA_ROW)
        l_i = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), _WGMMA_ROW)
        acc = plgpu.layout_cast(jnp.zeros((rows, q_smem.shape[-1]), jnp.float32), _WGMMA)

        @pl.when(total > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[0])

        # Consumer 1 starts one turn behind, so the two alternate on the tensor cores.
        pl.when(wg == 1)(schedule_turn)

        def visit(step, carry, partial):
            acc, m_i, l_i = carry
            slot = lax.rem(step, stages)

            def qk_product(acc_ref):                       # S = Q Kᵀ (line 8)
                plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].T)
                schedule_turn()
                return acc_ref[...]

            s = pl.run_scoped(qk_product, plgpu.ACC((rows, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            s = s * (scale * LOG2E)                        # base-2 logits
            if partial:   # PARTIAL tile: the mask and the kv padding, element-wise
                kv_start = walk.partial_block(step) * block_kv
                q_pos = q_start + plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 0,
                                                         layout=_WGMMA)
                kv_pos = kv_start + plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 1,
                                                           layout=_WGMMA)
                keep = kv_pos < kv_len
                if mask_fn is not None:
                    cta_start = qi * (CONSUMER_WARPGROUPS * rows)
                    tiles = tuple(o.tile(batch, head, cta_start, kv_start) for o in operand_refs)
                    keep = keep & mask_fn(q_pos, kv_pos, tiles)
                s = jnp.where(keep, s, -jnp.inf)
            # Online softmax (line 9); m stays finite, masked scores give p = exp2(-inf) = 0.
            m_next = jnp.maximum(m_i, s.max(axis=1))
            correction = jnp.exp2(m_i - m_next)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
            l_i = l_i * correction + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
            p = p.astype(dtype)
            # Keep the softmax before the hand-over of the tensor cores (the compiler
            # would otherwise sink it past the barriers).
            acc, l_i, m_next, p = lax.optimization_barrier((acc, l_i, m_next, p))
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(schedule)

            def pv_product(acc_ref):                       # O += P V (line 10)
                plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                nxt = step + 1

                @pl.when(nxt < total)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(nxt, stages)])

            acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_next, l_i

        # FULL tiles (no mask work), then PARTIAL ones; EMPTY tiles are never visited.
        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, num_full, functools.partial(visit, partial=False), carry)
        acc, m_i, l_i = lax.fori_loop(num_full, total, functools.partial(visit, partial=True),
                                      carry)
        pl.when(wg == 0)(schedule_turn)

        # Epilogue (line 12): O = acc / l; empty rows (l = 0) give O = 0 and lse = -inf.
        nonempty = l_i > 0.0
        inv_l = 1.0 / jnp.where(nonempty, l_i, 1.0)
        acc = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
        q_tile[...] = acc.astype(dtype)       # this warpgroup's Q is no longer read
        lse_smem[wg] = jnp.where(nonempty, (m_i + jnp.log2(jnp.where(nonempty, l_i, 1.0))) * LN2,
                                 -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_ref.at[batch, pl.ds(q_start, rows), head])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(q_start, rows)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMER_WARPGROUPS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.int32(groups))

        def issue(step, slot):
            kv = pl.ds(walk.kv_block(step) * block_kv, block_kv)
            plgpu.copy_gmem_to_smem(k_ref.at[batch, kv, kv_head], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[batch, kv, kv_head], v_smem.at[slot], v_ready.at[slot])

        # Fill every slot, then refill a slot once both consumers released it.
        for step in range(stages):
            pl.when(step < total)(functools.partial(issue, step, step))

        @pl.loop(stages, jnp.maximum(total, stages))
        def _(step):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])
            issue(step, slot)


def forward(static, q, k, v, bias, metas, operands):
    """q [B, T, N, H], k/v [B, S, K, H] (bf16/f16) → (out [B, T, N, H], lse [B, N, T] f32).
    `bias` must be None (supports() declines a bias)."""
    if bias is not None:
        raise NotImplementedError("the Mosaic GPU forward takes no bias yet")
    cfg = static.config
    meta = metas["forward"]
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = cfg.block_q, cfg.block_kv
    assert (meta.block_q, meta.block_kv) == (bq, bk), "metadata built for other tiles"
    hp = padded_head_dim(h)
    tp, sp = pad_to_multiple(t, bq), pad_to_multiple(s, bk)
    qp, kp, vp = pad_btnh(q, tp, hp), pad_btnh(k, sp, hp), pad_btnh(v, sp, hp)
    lists = TileLists.from_metadata(meta)
    operand_arrays = [jnp.asarray(a, jnp.int32) for a in operands]
    operand_kinds = tuple(kind for kind, _ in static.operand_kinds)
    operand_blocks = tuple(lb for _, lb in static.operand_kinds)
    stages = cfg.num_stages
    rows = ROWS_PER_WARPGROUP
    nq = tp // bq

    def entry(*refs):
        n_lists = len(lists.arrays())
        list_refs, (q_ref, k_ref, v_ref) = refs[:n_lists], refs[n_lists:n_lists + 3]
        rest = refs[n_lists + 3:]
        operand_refs = tuple(OperandRef(r, kind, lb) for r, kind, lb in
                             zip(rest[:len(operand_arrays)], operand_kinds, operand_blocks))
        o_ref, lse_ref = rest[len(operand_arrays):]
        bound = lists.bind(list_refs)
        scratch_types = (
            (_smem_tile((CONSUMER_WARPGROUPS, rows, hp), q.dtype),
             _smem_tile((stages, bk, hp), k.dtype),
             _smem_tile((stages, bk, hp), v.dtype),
             plgpu.SMEM((CONSUMER_WARPGROUPS, rows), jnp.float32)),
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=CONSUMER_WARPGROUPS)),
            (plgpu.Barrier(num_arrivals=CONSUMER_WARPGROUPS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=CONSUMER_WARPGROUPS),
        )
        pl.run_scoped(
            lambda *scratch: _kernel(
                bound, q_ref, k_ref, v_ref, operand_refs, o_ref, lse_ref, scratch,
                num_q_blocks=nq, groups=n // kh, block_kv=bk, stages=stages,
                scale=static.scale, kv_len=s, mask_fn=static.mask_fn,
                dtype=q.dtype),
            *scratch_types, collective_axes="wg")

    out, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((b, tp, n, hp), q.dtype),
                  jax.ShapeDtypeStruct((b, n, tp), jnp.float32)),
        grid=(nq, n, b),
        grid_names=("q", "heads", "batch"),
        num_threads=CONSUMER_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="jaxattn_mosaic_forward",
    )(*lists.arrays(), qp, kp, vp, *operand_arrays)
    return out[:, :t, :, :h], lse[:, :, :t]
