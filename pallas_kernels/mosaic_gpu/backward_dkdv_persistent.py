"""The dK/dV kernel of the Mosaic GPU backward, persistent: one CTA per SM looping over
work items (kv-block j, KV head, batch row).

The per-item kernel (backward_dkdv.py) runs one CTA per item. On short tile lists —
causal windows, BigBird, the residue classes of a strided plan, where an item is one to
a few tiles — each CTA's chain (load K_j, V_j → products → stage and store dK, dV) is
exposed, one CTA per SM: on the H200 that kernel moved 805 MB at 2.9 TB/s for strided &
causal, where the persistent forward runs at the memory bound (BACKWARD_NOTES.md). Here
a CTA keeps two K/V buffers (`resident_buffers`), so the next item's K_j, V_j and its
first Q/dO tiles are loaded while the current item computes and stores, and no launch
sits between items.

Three warpgroups, as in forward.py:
* the producer (warpgroup `wgs`, 40 registers) walks this CTA's items (dealt by the
  transposed lists' work, schedule.dealt_by_counts: longest first to the least loaded
  CTA when the counts are static, else a snake over the items sorted on the device;
  either way heaviest kv-blocks first, equal ones in order) and per item copies K_j,
  V_j into buffer `item % resident_buffers` once the compute warpgroups have released
  it (their dK, dV stores of the item that last used it have read it), then every step
  of the item's TRANSPOSED lists (GQA: once per query head of the group): Q_i, dO_i, lse_i, D_i into
  slot `(first + step) % stages`, once released (backward_walk.run_persistent_producer,
  the loop both persistent kernels share);
* the compute warpgroups each own block_kv / wgs keys of the item (split_columns, below:
  all of them, half the columns each): they zero dK and dV,
  run every step with backward_tiles.dkdv_tile (the per-block kernel's products in
  the same order; dkdv_tile_shared with share_products), then stage dK, dV in the
  item's K/V buffer and store them by TMA, and release the buffer once the stores have
  read it.
Slots turn over every step of every item of the CTA (`first` counts the CTA's steps so
far), buffers every item. EMPTY tiles are in no list and are never loaded.

At head dim 256 (`split_columns`, one buffer) the two compute warpgroups own the same
64 keys and each accumulates one 128-column half of dK and dV (two full-width
accumulators would need 256 registers a thread): every tile is copied into shared
memory as its two column halves, both warpgroups form the full-depth Sᵀ and dPᵀ from
both halves, each multiplies its own half of dO and Q, and the two meet at a named
barrier before staging their halves in the K/V buffer (BACKWARD_NOTES.md). With
`share_products` (the default there, without a soft cap) warpgroup 0 forms Sᵀ and
warpgroup 1 dPᵀ only, and they hand Pᵀ and dSᵀ to each other through shared memory
(backward_tiles.dkdv_tile_shared).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu import named_barrier
from pallas_kernels.mosaic_gpu.backward_tiles import (Exchange, TileArithmetic, dkdv_tile,
                                                      dkdv_tile_shared)
from pallas_kernels.mosaic_gpu.backward_walk import (WGMMA_COL, OperandTiles, TileLists,
                                                     copy_resident_rows, run_persistent_producer,
                                                     swizzled)
from pallas_kernels.mosaic_gpu.common import num_sms
from pallas_kernels.metadata import decode_tile_counts
from pallas_kernels.mosaic_gpu.schedule import Schedule, dealt_by_counts

KV_BUFFERS = 2   # item i + 1's K/V load while item i computes


def dkdv_schedule(meta_arrays, meta, *, kv_heads: int, groups: int, batch: int,
                  num_ctas: int) -> Schedule:
    """How at most `num_ctas` CTAs share the items (kv-block j, KV head, batch row), by the
    work of the transposed lists `meta_arrays` (their BlockMetadata `meta`, when given,
    has it as static counts). Under a causal mask the first kv-blocks, which every later
    q-block visits, carry the most; under BigBird the global keys' kv-blocks, ~5× the
    rest. Query heads of a KV head share its kv-block's item: the group's summed counts."""
    n_blocks = meta_arrays[0].shape[-1]
    num_items = n_blocks * kv_heads * batch
    full_t, partial_t = meta_arrays[0], meta_arrays[2]   # [Bm, Hm, nK]
    static = None
    if meta is not None and meta.t_tile_counts is not None:
        static = decode_tile_counts(meta.t_tile_counts, tuple(meta.t_full_count.shape))
    if full_t.shape[1] > 1:
        full_t = full_t.reshape(full_t.shape[0], kv_heads, groups, -1).sum(axis=2)
        partial_t = partial_t.reshape(partial_t.shape[0], kv_heads, groups, -1).sum(axis=2)
        if static is not None:
            static = static.reshape(static.shape[0], kv_heads, groups, *static.shape[2:]).sum(axis=2)
    return dealt_by_counts(
        Schedule(n_blocks, kv_heads, batch, persistent=True, num_ctas=min(num_ctas, num_items)),
        static, full_t, partial_t)


def dkdv_persistent_call(q, k, v, do, lse2, delta, meta_arrays, *, block_q: int, block_kv: int,
                         wgs: int, stages: int, memory_registers: int = 40, scale: float, cap,
                         mask_fn, kv_len: int, operands=(), operand_kinds=(), meta=None,
                         q_len: int | None = None, resident_buffers: int = KV_BUFFERS,
                         split_columns: bool = False, share_products: bool = False):
    """Arguments and result as backward_dkdv.dkdv_call (without rank_arrays); `meta`, the
    BlockMetadata the lists come from, gives the deal its static tile counts.
    resident_buffers: K/V buffers (1: the next item's K_j, V_j wait for this item's stores).
    split_columns (head dim 256, two warpgroups): both warpgroups own all block_kv keys and
    each accumulates one half of dK's and dV's columns; every tile sits in shared memory
    as its two column halves (Sᵀ and dPᵀ are computed by both warpgroups).
    share_products (with split_columns, no soft cap): each product formed once, warpgroup
    0 Sᵀ and Pᵀ, warpgroup 1 dPᵀ and dSᵀ, handed over through shared memory
    (backward_tiles.dkdv_tile_shared); K/V and Q/dO then sit stacked, [.., 2, halves, ..],
    so a warpgroup names its product's operands by its index."""
    b, tp, n, hp = q.shape
    sp, kh = k.shape[1], k.shape[2]
    groups = n // kh
    if split_columns and wgs != 2:
        raise ValueError(f"split_columns needs two compute warpgroups (one per column half), got {wgs}")
    if share_products and (not split_columns or cap is not None):
        raise ValueError("share_products needs split_columns=True and no soft cap (dSᵀ would need "
                         f"the cap's tanh too), got split_columns={split_columns}, cap={cap}")
    halves = 2 if split_columns else 1         # column parts of every tile in shared memory
    width = hp // halves
    rows = block_kv if split_columns else block_kv // wgs   # key rows per compute warpgroup
    dtype = q.dtype
    n_blocks = meta_arrays[0].shape[-1]
    kv_padded = n_blocks * block_kv != kv_len   # the last tile holds padded keys
    schedule = dkdv_schedule(meta_arrays, meta, kv_heads=kh, groups=groups, batch=b,
                             num_ctas=num_sms())
    n_schedule = len(schedule.arrays())
    compute_registers = min(256, (512 - memory_registers) // wgs) // 8 * 8
    compute_barrier = named_barrier.first_free_id(wgs + 1)   # the compute warpgroups' own
    p_ready, ds_ready = compute_barrier + 1, compute_barrier + 2   # share_products' hand-overs
    resident_copies = 2 * (halves if split_columns else wgs)  # K and V: per half or per share
    # The column halves of a [.., Hp] array in global memory: [.., 2, Hp / 2] (free).
    columns = (lambda x: x.reshape(*x.shape[:-1], halves, width)) if split_columns else (lambda x: x)

    def part(ref, *index, h):
        """Column part h of the [rows, ·] block of `ref` at `index` in global memory."""
        return ref.at[(*index, h)] if split_columns else ref.at[index]

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tfc_ref, tfi_ref, tpc_ref,
               tpi_ref, *refs):
        schedule_refs, (*operand_refs, dk_ref, dv_ref) = refs[:n_schedule], refs[n_schedule:]
        deal = schedule.bind(schedule_refs)
        arith = TileArithmetic(scale, cap, mask_fn, kv_len, kv_padded,
                               OperandTiles(operand_refs, operand_kinds, q_axis=1),
                               len(operand_kinds), dtype, q_len)
        meta_refs = (tfc_ref, tfi_ref, tpc_ref, tpi_ref)

        def body(*scratch):
            if share_products:
                (kv_smem, qdo_smem, lse_smem, delta_smem, kv_ready, step_ready, kv_free, step_free,
                 p_smem, ds_smem) = scratch
                exchange = Exchange(p_smem, ds_smem, p_ready, ds_ready)

                def K(buf, h): return kv_smem.at[buf, 0, h]
                def V(buf, h): return kv_smem.at[buf, 1, h]
                def Q(slot, h): return qdo_smem.at[slot, 0, h]
                def DO(slot, h): return qdo_smem.at[slot, 1, h]
            else:
                (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_ready, step_ready,
                 kv_free, step_free) = scratch

                def K(buf, h): return k_smem.at[buf, h]
                def V(buf, h): return v_smem.at[buf, h]
                def Q(slot, h): return q_smem.at[slot, h]
                def DO(slot, h): return do_smem.at[slot, h]
            wg = lax.axis_index("wg")
            my_items = deal.my_item_count()

            def item_lists(item):
                j, head_kv, bi = deal.item(item)
                lists = TileLists(meta_refs, batch=bi, block=j, head0=head_kv * groups,
                                  groups=groups)
                return j, head_kv, bi, lists

            @pl.when(wg < wgs)
            def _compute():
                plgpu.set_max_registers(compute_registers, action="increase")

                def run_item(item, first):
                    j, head_kv, bi, lists = item_lists(item)
                    buf = lax.rem(item, resident_buffers)
                    # What this warpgroup accumulates and stores: its rows of K_j, V_j, or
                    # (split) its column half of all of them, at the same place.
                    kv_base = j * block_kv + (0 if split_columns else wg * rows)
                    k_own, v_own = K(buf, wg), V(buf, wg)
                    plgpu.barrier_wait(kv_ready.at[buf])

                    def step_products(s, dk_acc, dv_acc):
                        slot = lax.rem(first + s, stages)
                        step = lists.decode(s)
                        plgpu.barrier_wait(step_ready.at[slot])
                        rows_of_step = dict(
                            lse_row=lambda: plgpu.load(lse_smem.at[slot], (), layout=WGMMA_COL),
                            delta_row=lambda: plgpu.load(delta_smem.at[slot], (), layout=WGMMA_COL),
                            partial=step.partial, q_start=step.block * block_q, kv_start=kv_base,
                            batch=bi, head=head_kv * groups + step.head)
                        if share_products:
                            # warpgroup 0: Sᵀ = K Qᵀ, warpgroup 1: dPᵀ = V dOᵀ (stacked K/V, Q/dO)
                            x_parts = tuple((kv_smem.at[buf, wg, h], qdo_smem.at[slot, wg, h])
                                            for h in range(halves))
                            dkdv_tile_shared(arith, x_parts, dk_acc, dv_acc, role=wg,
                                             q_cols=Q(slot, wg), do_cols=DO(slot, wg),
                                             exchange=exchange, **rows_of_step)
                        elif split_columns:   # both products from both halves, in both
                            parts = [tuple(ref(at, h) for h in range(halves))
                                     for ref, at in ((K, buf), (V, buf), (Q, slot), (DO, slot))]
                            dkdv_tile(arith, *parts, dk_acc, dv_acc, q_cols=Q(slot, wg),
                                      do_cols=DO(slot, wg), **rows_of_step)
                        else:                 # this warpgroup's rows, the whole head dim
                            dkdv_tile(arith, (k_own,), (v_own,), (Q(slot, 0),), (DO(slot, 0),),
                                      dk_acc, dv_acc, q_cols=Q(slot, 0), do_cols=DO(slot, 0),
                                      **rows_of_step)
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(step_free.at[slot])                # slot read

                    def accumulate(dk_acc, dv_acc):
                        @pl.loop(0, lists.total)
                        def _(s):
                            step_products(s, dk_acc, dv_acc)
                        return dk_acc[...], dv_acc[...]

                    acc = plgpu.ACC((rows, width), jnp.float32)
                    dk, dv = pl.run_scoped(accumulate, acc, acc)
                    if split_columns:
                        # Both warpgroups read both halves of K_j and V_j: neither may
                        # overwrite its half until the other's last products are done.
                        named_barrier.bar_sync(compute_barrier, 128 * wgs)
                    # K_j and V_j are no longer read: their buffer stages the results.
                    k_own[...] = (dk * scale).astype(dtype)
                    v_own[...] = dv.astype(dtype)
                    plgpu.commit_smem()
                    kv_rows = pl.ds(kv_base, rows)
                    plgpu.copy_smem_to_gmem(k_own, part(dk_ref, bi, kv_rows, head_kv, h=wg),
                                            commit_group=False)
                    plgpu.copy_smem_to_gmem(v_own, part(dv_ref, bi, kv_rows, head_kv, h=wg),
                                            commit_group=False)
                    plgpu.commit_smem_to_gmem_group()
                    # The producer may refill this buffer once the stores have read it.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    plgpu.barrier_arrive(kv_free.at[buf])
                    return first + lists.total

                lax.fori_loop(0, my_items, run_item, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == wgs)
            def _producer():
                plgpu.set_max_registers(memory_registers, action="decrease")

                def copy_resident(item_data, buf):
                    j, head_kv, bi, _ = item_data
                    if not split_columns:
                        copy_resident_rows((k_ref, v_ref), (k_smem, v_smem), buf, kv_ready.at[buf],
                                           batch=bi, block=j, head=head_kv, rows=rows, wgs=wgs)
                        return
                    kv_rows = pl.ds(j * block_kv, block_kv)
                    for h in range(halves):
                        for source, buffer in ((k_ref, K), (v_ref, V)):
                            plgpu.copy_gmem_to_smem(part(source, bi, kv_rows, head_kv, h=h),
                                                    buffer(buf, h), kv_ready.at[buf])

                def locate_step(item_data, s):
                    _, head_kv, _, lists = item_data
                    step = lists.decode(s)
                    return head_kv * groups + step.head, pl.ds(step.block * block_q, block_q)

                def copy_step(item_data, where, slot):
                    bi = item_data[2]
                    head, q_rows = where
                    ready = step_ready.at[slot]
                    for h in range(halves):
                        plgpu.copy_gmem_to_smem(part(q_ref, bi, q_rows, head, h=h), Q(slot, h),
                                                ready)
                        plgpu.copy_gmem_to_smem(part(do_ref, bi, q_rows, head, h=h), DO(slot, h),
                                                ready)
                    plgpu.copy_gmem_to_smem(lse_ref.at[bi, head, q_rows], lse_smem.at[slot], ready)
                    plgpu.copy_gmem_to_smem(delta_ref.at[bi, head, q_rows], delta_smem.at[slot],
                                            ready)

                run_persistent_producer(my_items, item_lists, buffers=resident_buffers,
                                        buffer_free=kv_free, copy_resident=copy_resident,
                                        stages=stages, slot_free=step_free,
                                        locate_step=locate_step, copy_step=copy_step)

        row_smem = plgpu.SMEM((stages, block_q), jnp.float32)
        barriers = (plgpu.Barrier(num_arrivals=resident_copies, num_barriers=resident_buffers),
                    plgpu.Barrier(num_arrivals=2 * halves + 2, num_barriers=stages),  # Q, dO, lse, D
                    plgpu.Barrier(num_arrivals=wgs, num_barriers=resident_buffers),
                    plgpu.Barrier(num_arrivals=wgs, num_barriers=stages))
        if share_products:
            # K and V stacked [buffers, 2, halves, rows, width], Q and dO [stages, 2, ...]; Pᵀ
            # and dSᵀ hand-over buffers
            pair = lambda lead, r: plgpu.SMEM((lead, 2, halves, r, width), dtype,  # noqa: E731
                                              transforms=swizzled((r, width), dtype))
            handover = plgpu.SMEM((rows, block_q), dtype, transforms=swizzled((rows, block_q), dtype))
            pl.run_scoped(body, pair(resident_buffers, rows), pair(stages, block_q), row_smem,
                          row_smem, *barriers, handover, handover, collective_axes="wg")
        else:
            # [buffers, wgs, rows, width]: per warpgroup its rows, or (split) per half its columns
            kv_smem = plgpu.SMEM((resident_buffers, wgs, rows, width), dtype,
                                 transforms=swizzled((rows, width), dtype))
            qdo_smem = plgpu.SMEM((stages, halves, block_q, width), dtype,
                                  transforms=swizzled((block_q, width), dtype))
            pl.run_scoped(body, kv_smem, kv_smem, qdo_smem, qdo_smem, row_smem, row_smem,
                          *barriers, collective_axes="wg")

    out = jax.ShapeDtypeStruct((b, sp, kh, halves, width) if split_columns else (b, sp, kh, hp),
                               dtype)
    grid, grid_names = schedule.grid()
    dk, dv = plgpu.kernel(
        kernel,
        out_type=(out, out),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        grid=grid,
        grid_names=grid_names,
        num_threads=wgs + 1,
        thread_name="wg",
        kernel_name="jaxattn_mosaic_dkdv_persistent",
    )(columns(q), columns(k), columns(v), columns(do), lse2, delta, *meta_arrays,
      *schedule.arrays(), *operands)
    return dk.reshape(b, sp, kh, hp), dv.reshape(b, sp, kh, hp)
