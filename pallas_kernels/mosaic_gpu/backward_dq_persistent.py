"""The dQ kernel of the Mosaic GPU backward, persistent: one CTA per SM looping over work
items (q-block i, query head n, batch row), the twin of backward_dkdv_persistent.py (why:
its docstring and BACKWARD_NOTES.md).

* the producer (warpgroup `wgs`, 40 registers) walks this CTA's items (schedule.py's
  balanced deal of the dQ lists, as the forward's: a table, a sorted snake or a snake,
  heaviest q-blocks first) and per item copies Q_i and dO_i into buffer
  `item % resident_buffers` (2; 1 at head dim 256) once the compute warpgroups have
  released it (their dQ store of the item that last used it has read it), then every
  K_j, V_j on q-block i's lists — FULL kv-blocks first, then PARTIAL ones — into slot
  `(first + step) % stages`, once released (backward_walk.run_persistent_producer);
* the compute warpgroups each own block_q / wgs query rows of the item: they read their
  lse and D rows, run every step with backward_tiles.dq_tile (the per-block kernel's
  products in the same order), then stage dQ in the item's Q buffer, store it by TMA and
  release the buffer once the store has read it.

Given O (and the lse's cotangent, if any) instead of D, the compute warpgroups form their
rows of D = rowsum(dO ∘ O) − dlse themselves, from O read straight from global memory and
dO from the item's buffer, and write D out for the dK/dV kernel, which runs after this
one: the separate pass over O and dO (74 of the 454 µs of strided & causal's backward
kernels at 32k) is gone. Every q-block is an item, so every row of D up to the last
q-block is written (the caller pads D to the dK/dV kernel's rows).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu.backward_tiles import TileArithmetic, dq_tile
from pallas_kernels.mosaic_gpu.backward_walk import (WGMMA, WGMMA_ROW, OperandTiles, TileLists,
                                                     copy_resident_rows, run_persistent_producer,
                                                     swizzled)
from pallas_kernels.mosaic_gpu.common import num_sms
from pallas_kernels.mosaic_gpu.schedule import Schedule, balanced_deal

QDO_BUFFERS = 2   # item i + 1's Q and dO load while item i computes


def dq_schedule(meta, *, n_q_blocks: int, heads: int, batch: int, num_ctas: int) -> Schedule:
    """How at most `num_ctas` CTAs share the items (q-block i, query head, batch row): by
    the work of the lists of `meta` (their BlockMetadata) when given, as the forward."""
    num_items = n_q_blocks * heads * batch
    schedule = Schedule(n_q_blocks, heads, batch, persistent=True,
                        num_ctas=min(num_ctas, num_items), balance=True)
    return schedule if meta is None else balanced_deal(schedule, meta)


def dq_persistent_call(q, k, v, do, lse2, delta, meta_arrays, *, block_q: int, block_kv: int,
                       wgs: int, stages: int, memory_registers: int = 40, scale: float, cap,
                       mask_fn, kv_len: int, operands=(), operand_kinds=(), meta=None,
                       out=None, dlse=None, resident_buffers: int = QDO_BUFFERS):
    """Arguments and result as backward_dq.dq_call; `meta`, the BlockMetadata the lists
    come from, lets the deal balance the items' work (its static tile counts, or its
    traced ones sorted on the device). With `out` (O padded like q) and delta None, the
    kernel forms D = rowsum(dO ∘ O) − dlse itself (`dlse` float32 [B, N, Tp] or None)
    and returns (dq, D float32 [B, N, nQ · block_q]), nQ the lists' q-blocks.
    resident_buffers: Q/dO buffers (1: the next item's Q_i, dO_i wait for this item's
    store; head dim 256, where two do not fit beside two K/V stages)."""
    own_delta = out is not None
    if own_delta == (delta is not None):
        raise ValueError("dq_persistent_call takes exactly one of delta (D formed) or out (D "
                         f"formed here); got delta={delta is not None}, out={own_delta}")
    if dlse is not None and not own_delta:
        raise ValueError("dq_persistent_call: dlse is subtracted only where the kernel forms D "
                         "(out given); with delta given, subtract it from delta instead")
    b, tp, n, hp = q.shape
    kh = k.shape[2]
    groups = n // kh
    rows = block_q // wgs                      # query rows per compute warpgroup
    dtype = q.dtype
    n_q_blocks = meta_arrays[0].shape[-1]
    kv_padded = kv_len % block_kv != 0         # the last kv tile holds padded keys
    schedule = dq_schedule(meta, n_q_blocks=n_q_blocks, heads=n, batch=b, num_ctas=num_sms())
    n_schedule = len(schedule.arrays())
    compute_registers = min(256, (512 - memory_registers) // wgs) // 8 * 8

    has_dlse = own_delta and dlse is not None
    row_inputs = ((out,) + ((dlse,) if has_dlse else ())) if own_delta else (delta,)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, *refs):
        (row_refs, (fc_ref, fi_ref, pc_ref, pi_ref), schedule_refs,
         refs) = (refs[:len(row_inputs)], refs[len(row_inputs):len(row_inputs) + 4],
                  refs[len(row_inputs) + 4:len(row_inputs) + 4 + n_schedule],
                  refs[len(row_inputs) + 4 + n_schedule:])
        if own_delta:
            *operand_refs, dq_ref, delta_out_ref = refs
        else:
            *operand_refs, dq_ref = refs
        deal = schedule.bind(schedule_refs)
        arith = TileArithmetic(scale, cap, mask_fn, kv_len, kv_padded,
                               OperandTiles(operand_refs, operand_kinds, q_axis=0),
                               len(operand_kinds), dtype)
        meta_refs = (fc_ref, fi_ref, pc_ref, pi_ref)

        def body(q_smem, do_smem, k_smem, v_smem, qdo_ready, kv_ready, qdo_free, kv_free,
                 *delta_smem):
            wg = lax.axis_index("wg")
            my_items = deal.my_item_count()

            def item_lists(item):
                i, head, bi = deal.item(item)
                lists = TileLists(meta_refs, batch=bi, block=i, head0=head, groups=1)
                return i, head, bi, lists

            @pl.when(wg < wgs)
            def _compute():
                plgpu.set_max_registers(compute_registers, action="increase")

                def run_item(item, first):
                    i, head, bi, lists = item_lists(item)
                    buf = lax.rem(item, resident_buffers)
                    q_base = i * block_q + wg * rows
                    q_rows = pl.ds(q_base, rows)
                    q_tile, do_tile = q_smem.at[buf, wg], do_smem.at[buf, wg]
                    lse2_i = plgpu.load(lse_ref.at[bi, head, q_rows], (), layout=WGMMA_ROW,
                                        optimized=False)
                    if own_delta:
                        # D of these rows: O straight from global memory (issued before the
                        # wait for Q and dO, so the two latencies overlap), dO from the
                        # item's buffer.
                        o_rows = plgpu.load(row_refs[0].at[bi, q_rows, head], (), layout=WGMMA,
                                            optimized=False)
                    else:
                        delta_i = plgpu.load(row_refs[0].at[bi, head, q_rows], (),
                                             layout=WGMMA_ROW, optimized=False)
                    plgpu.barrier_wait(qdo_ready.at[buf])
                    if own_delta:
                        do_rows = plgpu.load(do_tile, (), layout=WGMMA)
                        delta_i = jnp.sum(o_rows.astype(jnp.float32) * do_rows.astype(jnp.float32),
                                          axis=1)
                        if has_dlse:
                            delta_i = delta_i - plgpu.load(row_refs[1].at[bi, head, q_rows], (),
                                                           layout=WGMMA_ROW, optimized=False)
                        # Out for the dK/dV kernel; the store below waits for this copy too.
                        delta_smem[0][wg] = delta_i
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(delta_smem[0].at[wg],
                                                delta_out_ref.at[bi, head, q_rows])

                    def step_products(s, dq_acc):
                        slot = lax.rem(first + s, stages)
                        step = lists.decode(s)
                        k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
                        plgpu.barrier_wait(kv_ready.at[slot])
                        dq_tile(arith, q_tile, do_tile, k_tile, v_tile, dq_acc, lse2=lse2_i,
                                delta=delta_i, scores_issued=lambda: plgpu.wgmma_wait(0),
                                partial=step.partial, q_start=q_base,
                                kv_start=step.block * block_kv, batch=bi, head=head)
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(kv_free.at[slot])                  # slot read

                    def accumulate(dq_acc):
                        @pl.loop(0, lists.total)
                        def _(s):
                            step_products(s, dq_acc)
                        return dq_acc[...]

                    dq = pl.run_scoped(accumulate, plgpu.ACC((rows, hp), jnp.float32))
                    q_tile[...] = (dq * scale).astype(dtype)   # Q_i's buffer stages dQ_i
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[bi, q_rows, head])
                    # The producer may refill this buffer once the store has read it.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    plgpu.barrier_arrive(qdo_free.at[buf])
                    return first + lists.total

                lax.fori_loop(0, my_items, run_item, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == wgs)
            def _producer():
                plgpu.set_max_registers(memory_registers, action="decrease")

                def copy_resident(item_data, buf):
                    i, head, bi, _ = item_data
                    copy_resident_rows((q_ref, do_ref), (q_smem, do_smem), buf,
                                       qdo_ready.at[buf], batch=bi, block=i, head=head,
                                       rows=rows, wgs=wgs)

                def locate_step(item_data, s):
                    return pl.ds(item_data[3].decode(s).block * block_kv, block_kv)

                def copy_step(item_data, kv_rows, slot):
                    _, head, bi, _ = item_data
                    head_kv = lax.div(head, jnp.int32(groups))
                    ready = kv_ready.at[slot]
                    plgpu.copy_gmem_to_smem(k_ref.at[bi, kv_rows, head_kv], k_smem.at[slot], ready)
                    plgpu.copy_gmem_to_smem(v_ref.at[bi, kv_rows, head_kv], v_smem.at[slot], ready)

                run_persistent_producer(my_items, item_lists, buffers=resident_buffers, buffer_free=qdo_free,
                                        copy_resident=copy_resident, stages=stages,
                                        slot_free=kv_free, locate_step=locate_step,
                                        copy_step=copy_step)

        qdo_smem = plgpu.SMEM((resident_buffers, wgs, rows, hp), dtype,
                              transforms=swizzled((rows, hp), dtype))
        kv_smem = plgpu.SMEM((stages, block_kv, hp), dtype, transforms=swizzled((block_kv, hp), dtype))
        pl.run_scoped(
            body, qdo_smem, qdo_smem, kv_smem, kv_smem,
            plgpu.Barrier(num_arrivals=2 * wgs, num_barriers=resident_buffers),   # Q and dO copies
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),              # K and V
            plgpu.Barrier(num_arrivals=wgs, num_barriers=resident_buffers),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            *((plgpu.SMEM((wgs, rows), jnp.float32),) if own_delta else ()),
            collective_axes="wg")

    grid, grid_names = schedule.grid()
    dq_type = jax.ShapeDtypeStruct((b, tp, n, hp), dtype)
    return plgpu.kernel(
        kernel,
        out_type=((dq_type, jax.ShapeDtypeStruct((b, n, n_q_blocks * block_q), jnp.float32))
                  if own_delta else dq_type),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        grid=grid,
        grid_names=grid_names,
        num_threads=wgs + 1,
        thread_name="wg",
        kernel_name="jaxattn_mosaic_dq_persistent",
    )(q, k, v, do, lse2, *row_inputs, *meta_arrays, *schedule.arrays(), *operands)
