"""Block-sparse FlashAttention forward for Hopper (Pallas Mosaic GPU), FA3-style.

A work item is (q-block of 128 rows, query head n, batch row b); one CTA runs one item,
or, persistent, a share of them (which share: schedule.py). Three warpgroups:

* warpgroup 2, the producer, keeps few registers and only issues TMA copies: it walks
  this q-block's FULL list, then its PARTIAL list (counts and kv-block indices read from
  the block metadata in global memory), and copies each listed K and V tile into one of
  ``num_stages`` swizzled shared-memory slots as soon as both consumers released it.
  EMPTY tiles are in no list and are never loaded. Under GQA the K/V head is n // G;
  K/V are indexed, never repeated.
* warpgroups 0 and 1, the consumers, own 64 query rows each. Per listed tile
  (FlashAttention-2 Algorithm 1, lines 6-10): S = Q Kᵀ by wgmma from shared memory,
  the online softmax in float32 registers in base 2 (log2(e)·scale folded into the
  FMA ahead of each exp2), then O += P V by wgmma with P in registers. The two consumers
  take turns on the tensor cores, so one computes its softmax while the other
  multiplies (FlashAttention-3's ping-pong; consumer_turns.py: a shared mbarrier, or
  hardware named barriers with ``named_barriers``).
* With a logits soft cap, every tile's scores become cap·tanh(scale·q·k / cap) first.
* FULL tiles do no mask work. PARTIAL tiles evaluate ``mask_fn`` and ``kv_pos < kv_len``
  in the wgmma accumulator layout and *select* -inf for what the mask rules out, so a NaN
  in a masked score cannot reach the sums. Padded keys are zeros (the wrapper pads K/V),
  so P·V never meets a NaN there either; a NaN in the V row of a real but masked key of
  a PARTIAL tile would (0·NaN), which is why calls whose masks may leave such keys
  check their inputs first (nonfinite_fallback.py).
* Mask operands: a "block" layout's scalar is read with the tile's list entry, one
  step ahead; per-query vectors ("q", e.g. segment ids) once per work item, one value
  per accumulator row; per-key vectors ("kv") when a PARTIAL tile is visited, at the
  kv-block its K/V copy started at, one value per column. Both are broadcast over the
  tile only there.
* Bias and dense mask operands (tile_inputs.py): a [.., T, S] bias tile and, on PARTIAL
  steps, a dense ("qkv") mask tile are copied by the producer beside K into slots of
  their own; [.., 1, S] / [.., T, 1] biases are read as per-key / per-query vectors.
  Every tile's scores become scale·q·k + bias ahead of the soft cap and the mask's
  select, and the exp2 fold then runs with scale 1.
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

from pallas_kernels.common import pad_to_multiple, prepare_operands
from pallas_kernels.mosaic_gpu import named_barrier
from pallas_kernels.mosaic_gpu.consumer_turns import MbarrierTurns, NamedBarrierTurns
from pallas_kernels.mosaic_gpu.common import (LN2, LOG2E, MASK_VALUE, OperandRef, TileLists,
                                              num_sms, pad_btnh, padded_head_dim)
from pallas_kernels.mosaic_gpu.config import CONSUMER_WARPGROUPS, ROWS_PER_WARPGROUP, SMEM_BYTES
from pallas_kernels.mosaic_gpu.schedule import Schedule, balanced_deal
from pallas_kernels.mosaic_gpu.tile_inputs import (plan_tile_inputs, prepare_forward_bias,
                                                   swizzled_smem)

_WGMMA = plgpu.Layout.WGMMA
_WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)   # one value per accumulator row
_WGMMA_COL = plgpu.Layout.WGMMA.reduce(0)   # one value per accumulator column


def _kernel(lists: TileLists, q_ref, k_ref, v_ref, operand_refs, inputs, o_ref, lse_ref, scratch,
            *, schedule_: Schedule, groups, block_kv, stages, scale, cap, kv_len, mask_fn, dtype,
            named_barriers):
    """`inputs`: the bias and dense mask tiles (tile_inputs.BoundTileInputs); with a
    bias, `scale` is 1 (the bias add applies the call's scale)."""
    (q_smem, k_smem, v_smem, lse_smem), (k_ready, v_ready, q_ready), consumed, schedule = scratch[:4]
    k_consumed, v_consumed = consumed
    rows = ROWS_PER_WARPGROUP
    wg = lax.axis_index("wg")
    num_items = schedule_.my_item_count()
    # Raw q·k → base-2 logits: times logit_unit, after the soft cap's tanh when capped
    # (logits = cap·tanh(scale·q·k / cap)).
    logit_unit = (scale if cap is None else cap) * LOG2E
    # K/V slots are used round-robin over every step of every item of this CTA: the
    # global step `first + step` of an item picks slot (first + step) % stages.

    if named_barriers:   # no `schedule` mbarrier then (entry below)
        turns = NamedBarrierTurns(wg, named_barrier.first_free_id(CONSUMER_WARPGROUPS + 1),
                                  persistent=schedule_.persistent)
    else:
        turns = MbarrierTurns(wg, schedule)

    @pl.when(wg < CONSUMER_WARPGROUPS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")

        q_buffers = q_smem.shape[0]

        def load_q(item, buf):
            qi, head, batch = schedule_.item(item)
            q_start = qi * (CONSUMER_WARPGROUPS * rows) + wg * rows
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, rows), head],
                                    q_smem.at[buf, wg], q_ready.at[buf * CONSUMER_WARPGROUPS + wg])

        if q_buffers == 2:   # double-buffered Q: item i + 1's Q loads during item i
            load_q(0, 0)

        def run_item(item, firsts):
            # K/V slots turn over every step, dense mask slots every PARTIAL step.
            first, first_partial = firsts
            qi, head, batch = schedule_.item(item)
            walk = lists.walker(batch, head, qi)
            num_full, total = walk.num_full, walk.total
            cta_start = qi * (CONSUMER_WARPGROUPS * rows)
            q_start = cta_start + wg * rows
            buf = lax.rem(item, q_buffers)
            q_tile = q_smem.at[buf, wg]
            if q_buffers == 1:
                # The previous item's output left from q_tile (and lse_smem) by TMA: wait
                # until that store has read them, then load this item's Q over it.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                load_q(item, 0)
            else:
                # Item i + 1's Q goes into the other buffer now, a whole item ahead of its
                # use (loaded after item i's tiles instead, the first Q load of short
                # items waited: S1k 566 against 582 TFLOP/s back to back, window 256 257
                # against 270, H200): that buffer's last output (item i - 1) and lse_smem
                # must first have been read by their TMA stores (issued at the end of
                # item i - 1).
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

                @pl.when(item + 1 < num_items)
                def _():
                    load_q(item + 1, 1 - buf)

            def partial_tile_inputs(step):
                """kv start and "block" operand values of PARTIAL step `step` (global loads)."""
                kv_start = walk.partial_block(step) * block_kv
                return kv_start, tuple(o.tile(batch, head, cta_start, kv_start)
                                       for o in operand_refs if o.kind == "block")

            # Per-query operands (segment ids...) of this warpgroup's rows: read once per
            # item, one value per accumulator row; broadcast only in PARTIAL tiles.
            q_operands = tuple(o.vector(batch, q_start, rows, _WGMMA_ROW)
                               for o in operand_refs if o.kind == "q")
            row_bias = inputs.row_bias(batch, head, q_start)

            def operand_tiles(block_values, kv_operands, dense_values):
                """Every operand's values for a PARTIAL tile, in operand order, as
                [rows, block_kv] arrays in the wgmma layout."""
                shape = (rows, block_kv)
                by_kind = {"block": iter(block_values), "q": iter(q_operands),
                           "kv": iter(kv_operands), "qkv": iter(dense_values)}
                tiles = []
                for o in operand_refs:
                    value = next(by_kind[o.kind])
                    if o.kind in ("q", "kv"):   # a row ("q") or column ("kv") vector
                        value = lax.broadcast_in_dim(value, shape, [0 if o.kind == "q" else 1])
                    tiles.append(value)
                return tuple(tiles)

            m_i = plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32), _WGMMA_ROW)
            l_i = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), _WGMMA_ROW)
            acc = plgpu.layout_cast(jnp.zeros((rows, q_smem.shape[-1]), jnp.float32), _WGMMA)
            plgpu.barrier_wait(q_ready.at[buf * CONSUMER_WARPGROUPS + wg])

            @pl.when(total > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[lax.rem(first, stages)])

            # Consumer 1 starts one turn behind, so the two alternate on the tensor cores.
            turns.start_item()

            def visit(step, carry, partial):
                acc, m_i, l_i, tile_inputs = carry
                slot = lax.rem(first + step, stages)
                if partial:
                    # The next PARTIAL tile's list entry and "block" values are loaded one
                    # step ahead, so their global-memory latency hides behind this step;
                    # this tile's per-key operands are loaded now, ahead of S = Q Kᵀ.
                    next_inputs = partial_tile_inputs(jnp.minimum(step + 1, total - 1))
                    kv_operands = tuple(o.vector(batch, tile_inputs[0], block_kv, _WGMMA_COL)
                                        for o in operand_refs if o.kind == "kv")
                col_bias = None
                if inputs.reads_key_vector:   # a per-key bias, loaded ahead of S = Q Kᵀ
                    kv_start = tile_inputs[0] if partial else walk.full_block(step) * block_kv
                    col_bias = inputs.col_bias(batch, head, kv_start, block_kv)

                def qk_product(acc_ref):                       # S = Q Kᵀ (line 8)
                    plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].T)
                    turns.after_qk()
                    return acc_ref[...]

                s = pl.run_scoped(qk_product, plgpu.ACC((rows, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_consumed.at[slot])
                s = inputs.add_bias(s, step_count=first + step, wg=wg, row_values=row_bias,
                                    col_values=col_bias)
                if cap is not None:   # soft cap, on every tile, ahead of the mask
                    s = jnp.tanh(s * (scale / cap))
                if not logit_unit > 0:
                    # A negative scale cannot be folded into the exp2 FMA below; scale
                    # first so that -inf stays the masked value.
                    s = s * logit_unit
                if partial:   # PARTIAL tile: the mask and the kv padding, element-wise
                    kv_start, block_values = tile_inputs
                    q_pos = q_start + plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 0,
                                                             layout=_WGMMA)
                    kv_pos = kv_start + plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 1,
                                                               layout=_WGMMA)
                    keep = kv_pos < kv_len
                    if mask_fn is not None:
                        dense = inputs.dense_tiles(first_partial + step - num_full, wg)
                        keep = keep & mask_fn(q_pos, kv_pos,
                                              operand_tiles(block_values, kv_operands, dense))
                    s = jnp.where(keep, s, -jnp.inf)
                    tile_inputs = next_inputs
                # Online softmax (line 9); m stays finite, masked scores give p = 0.
                # With m kept in base-2 units, p = exp2(s·c - m) is one FMA per score ahead
                # of the exp2 (c = scale·log2(e), or cap·log2(e) after the tanh; c > 0,
                # so max(s)·c = max(s·c)).
                if logit_unit > 0:
                    m_next = jnp.maximum(m_i, s.max(axis=1) * logit_unit)
                    p = jnp.exp2(s * logit_unit - lax.broadcast_in_dim(m_next, s.shape, [0]))
                else:
                    m_next = jnp.maximum(m_i, s.max(axis=1))
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
                correction = jnp.exp2(m_i - m_next)
                l_i = l_i * correction + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
                p = p.astype(dtype)
                # Keep the softmax before the hand-over of the tensor cores (the compiler
                # would otherwise sink it past the barriers).
                acc, l_i, m_next, p = lax.optimization_barrier((acc, l_i, m_next, p))
                turns.release()
                plgpu.barrier_wait(v_ready.at[slot])
                turns.acquire()

                def pv_product(acc_ref):                       # O += P V (line 10)
                    plgpu.wgmma(acc_ref, p, v_smem.at[slot])

                    @pl.when(step + 1 < total)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(first + step + 1, stages)])

                acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_next, l_i, tile_inputs

            # FULL tiles (no mask work), then PARTIAL ones; EMPTY tiles are never visited.
            acc, m_i, l_i, _ = lax.fori_loop(0, num_full, functools.partial(visit, partial=False),
                                             (acc, m_i, l_i, ()))
            acc, m_i, l_i, _ = lax.fori_loop(num_full, total, functools.partial(visit, partial=True),
                                             (acc, m_i, l_i, partial_tile_inputs(num_full)))
            turns.end_item()   # consumer 0's extra turn: consumer 1's last P V may go
            # Epilogue (line 12): O = acc / l; empty rows (l = 0) give O = 0, lse = -inf.
            nonempty = l_i > 0.0
            l_safe = jnp.where(nonempty, l_i, 1.0)
            acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
            q_tile[...] = acc.astype(dtype)       # this warpgroup's Q is no longer read
            lse_smem[wg] = jnp.where(nonempty, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_ref.at[batch, pl.ds(q_start, rows), head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg],
                                    lse_ref.at[batch, head, pl.ds(q_start, rows)])
            return first + total, first_partial + total - num_full

        lax.fori_loop(0, num_items, run_item, (jnp.int32(0), jnp.int32(0)))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMER_WARPGROUPS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def run_item(item, firsts):
            first, first_partial = firsts
            qi, head, batch = schedule_.item(item)
            walk = lists.walker(batch, head, qi)
            kv_head = lax.div(head, jnp.int32(groups))

            def copy(src_ref, dst_smem, ready, kv_block, slot):
                kv = pl.ds(kv_block * block_kv, block_kv)
                plgpu.copy_gmem_to_smem(src_ref.at[batch, kv, kv_head], dst_smem.at[slot],
                                        ready.at[slot])

            # Refill a slot's K (V) as soon as both consumers are done with the K (V)
            # tile in it; the first `stages` steps of the CTA find their slots free. The
            # list entry is read before waiting, so its latency overlaps the wait.
            @pl.loop(0, walk.total)
            def _(step):
                at = first + step
                slot = lax.rem(at, stages)
                kv_block = walk.kv_block(step)

                @pl.when(at >= stages)
                def _():
                    plgpu.barrier_wait(k_consumed.at[slot])

                copy(k_ref, k_smem, k_ready, kv_block, slot)
                # The bias tile beside K; a dense mask tile too when the step is PARTIAL.
                inputs.copy_step(at, first_partial + step - walk.num_full, step >= walk.num_full,
                                 batch, head, qi * (CONSUMER_WARPGROUPS * rows), kv_block * block_kv)

                @pl.when(at >= stages)
                def _():
                    plgpu.barrier_wait(v_consumed.at[slot])

                copy(v_ref, v_smem, v_ready, kv_block, slot)

            return first + walk.total, first_partial + walk.total - walk.num_full

        lax.fori_loop(0, num_items, run_item, (jnp.int32(0), jnp.int32(0)))


def forward(static, q, k, v, bias, metas, operands):
    """q [B, T, N, H], k/v [B, S, K, H] (bf16/f16), bias None or [Bb, Hb, T|1, S|1]
    → (out [B, T, N, H], lse [B, N, T] f32). How the bias and dense mask operands are
    read: tile_inputs.py."""
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
    # Unaligned block layouts come back as dense "qkv" operands, as the Triton kernels read them.
    prepared = prepare_operands(operands, static.operand_kinds, t, s, tp, sp, bq, bk)
    operand_kinds = tuple(kind for kind, _, _ in prepared)
    operand_blocks = tuple(lb for _, lb, _ in prepared)
    operand_arrays = tuple(arr for _, _, arr in prepared)
    bias_route, bias_array = prepare_forward_bias(bias, q_pad=tp, kv_pad=sp)
    extra_arrays = () if bias_array is None else (bias_array,)
    stages = cfg.num_stages
    rows = ROWS_PER_WARPGROUP
    nq = tp // bq
    schedule = balanced_deal(
        Schedule(nq, n, b, cfg.persistent, min(num_sms(), nq * n * b), balance=not meta.even_q_work),
        meta)
    n_schedule = len(schedule.arrays())
    plan_inputs = functools.partial(
        plan_tile_inputs, bias_route=bias_route,
        bias_dtype=None if bias_array is None else bias_array.dtype, bias_scale=static.scale,
        dense_positions=tuple(i for i, kind in enumerate(operand_kinds) if kind == "qkv"),
        block_kv=bk, stages=stages)
    # A persistent CTA double-buffers Q when shared memory allows it beside every slot
    # of the bias and dense mask tiles (not at head dim 256); those slots come first.
    q_bytes = functools.partial(cfg.smem_bytes, hp, q.dtype.itemsize)
    q_buffers = 2 if cfg.persistent and (q_bytes(2) + plan_inputs(budget=SMEM_BYTES).smem_bytes()
                                         <= SMEM_BYTES) else 1
    tile_inputs = plan_inputs(budget=SMEM_BYTES - q_bytes(q_buffers))

    def entry(*refs):
        n_lists = len(lists.arrays())
        list_refs, refs = refs[:n_lists], refs[n_lists:]
        schedule_refs, (q_ref, k_ref, v_ref), rest = refs[:n_schedule], refs[n_schedule:n_schedule + 3], \
            refs[n_schedule + 3:]
        operand_refs = tuple(OperandRef(r, kind, lb) for r, kind, lb in
                             zip(rest[:len(operand_arrays)], operand_kinds, operand_blocks))
        rest = rest[len(operand_arrays):]
        bias_ref = rest[0] if extra_arrays else None
        o_ref, lse_ref = rest[len(extra_arrays):]
        bound = lists.bind(list_refs)
        scratch_types = (
            (swizzled_smem((q_buffers, CONSUMER_WARPGROUPS, rows, hp), q.dtype),
             swizzled_smem((stages, bk, hp), k.dtype),
             swizzled_smem((stages, bk, hp), v.dtype),
             plgpu.SMEM((CONSUMER_WARPGROUPS, rows), jnp.float32)),
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=q_buffers * CONSUMER_WARPGROUPS)),
            (plgpu.Barrier(num_arrivals=CONSUMER_WARPGROUPS, num_barriers=stages),) * 2,
            () if cfg.named_barriers else plgpu.Barrier(num_arrivals=CONSUMER_WARPGROUPS),
            tile_inputs.scratch_types(),
        )
        dense_refs = tuple(operand_refs[i].ref for i in tile_inputs.dense_positions)
        pl.run_scoped(
            lambda *scratch: _kernel(
                bound, q_ref, k_ref, v_ref, operand_refs,
                tile_inputs.bind(bias_ref, dense_refs, scratch[4]), o_ref, lse_ref, scratch,
                schedule_=schedule.bind(schedule_refs), groups=n // kh, block_kv=bk, stages=stages,
                scale=1.0 if bias_route else static.scale, cap=static.logits_soft_cap, kv_len=s,
                mask_fn=static.mask_fn, dtype=q.dtype, named_barriers=cfg.named_barriers),
            *scratch_types, collective_axes="wg")

    grid, grid_names = schedule.grid()
    out, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((b, tp, n, hp), q.dtype),
                  jax.ShapeDtypeStruct((b, n, tp), jnp.float32)),
        grid=grid,
        grid_names=grid_names,
        num_threads=CONSUMER_WARPGROUPS + 1,
        thread_name="wg",
        # No cross-warp reductions (row max/sum stay within a warp): no reduction scratch,
        # which leaves room for a third K/V stage at head dim 128.
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        kernel_name="jaxattn_mosaic_forward",
    )(*lists.arrays(), *schedule.arrays(), qp, kp, vp, *operand_arrays, *extra_arrays)
    return out[:, :t, :, :h], lse[:, :, :t]
