"""The dK/dV kernel of the Mosaic GPU backward (Hopper: TMA, wgmma, warp specialisation).

One program per (kv-block j, kv head, batch row). Its `wgs` compute warpgroups each own
`block_kv / wgs` rows of K_j and V_j (loaded once into shared memory) and two float32
accumulators dK, dV in registers; a memory warpgroup streams the tiles (Q_i, dO_i,
lse_i, D_i) of every query block i on kv-block j's TRANSPOSED lists — FULL q-blocks
first, then PARTIAL ones — once per query head of the group (GQA: the group's dK/dV
sum in registers, no atomics, so the result is deterministic).

Per tile: backward_tiles.dkdv_tile (rows = keys, columns = queries, so that Pᵀ and dSᵀ
are already the register operands of the next wgmma); dK is scaled once at the end.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu.backward_fused import OrderedSums
from pallas_kernels.mosaic_gpu.backward_tiles import TileArithmetic, dkdv_tile
from pallas_kernels.mosaic_gpu.backward_walk import (WGMMA_COL, OperandTiles, TileLists, swizzled,
                                                     tile_list_pipeline)


def dkdv_call(q, k, v, do, lse2, delta, meta_arrays, *, block_q: int, block_kv: int,
              wgs: int, stages: int, memory_registers: int = 40, scale: float, cap, mask_fn,
              kv_len: int, operands=(), operand_kinds=(), rank_arrays=None,
              q_len: int | None = None):
    """q, do [B, Tp, N, Hp]; k, v [B, Sp, K, Hp] (padded to whole tiles, Hp % 64 == 0);
    lse2 = lse·log2e and delta [B, N, Tp] float32; q_len: the true T where a mask's PARTIAL
    tiles must rule out the padding rows past it (else None); meta_arrays = the transposed lists
    (t_full_count, t_full_index, t_partial_count, t_partial_index) at tiles
    (block_q, block_kv). Returns dK, dV [B, Sp, K, Hp] in k's dtype.

    With rank_arrays (backward_fused.contributor_ranks) the kernel is the fused backward:
    each tile also computes its dQ partial sum dS K and adds it, in the fixed order that
    backward_fused.py describes, into a float32 [B, N, Tp, Hp] output returned first
    (dQ before its scale; rows of q-blocks no kv-block visits are left unwritten)."""
    b, tp, n, hp = q.shape
    sp, kh = k.shape[1], k.shape[2]
    groups = n // kh
    rows = block_kv // wgs                     # key rows per compute warpgroup
    dtype = q.dtype
    n_blocks = meta_arrays[0].shape[-1]
    kv_padded = n_blocks * block_kv != kv_len   # the last tile holds padded keys
    fused = rank_arrays is not None
    rank_arrays = tuple(rank_arrays or ())
    sums = OrderedSums(batch=b, heads=n, q_blocks=tp // block_q, block_q=block_q, head_dim=hp,
                       rows=rows, wgs=wgs, dtype=dtype) if fused else None

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tfc_ref, tfi_ref, tpc_ref,
               tpi_ref, *refs):
        rank_refs, refs = refs[:len(rank_arrays)], refs[len(rank_arrays):]
        if fused:
            sum_scratch, refs = refs[-2:], refs[:-2]
            *operand_refs, dq_ref, dk_ref, dv_ref, k_smems, v_smems, kv_barriers = refs
        else:
            *operand_refs, dk_ref, dv_ref, k_smems, v_smems, kv_barriers = refs
        arith = TileArithmetic(scale, cap, mask_fn, kv_len, kv_padded,
                               OperandTiles(operand_refs, operand_kinds, q_axis=1),
                               len(operand_kinds), dtype, q_len)
        j = lax.axis_index("kv_blocks")
        head_kv = lax.axis_index("kv_heads")
        bi = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        lists = TileLists((tfc_ref, tfi_ref, tpc_ref, tpi_ref), batch=bi, block=j,
                          head0=head_kv * groups, groups=groups,
                          rank_refs=tuple(rank_refs) if fused else None)
        kv_base = j * block_kv + wg * rows
        kv_rows = pl.ds(kv_base, rows)
        k_smem, v_smem, barrier = k_smems.at[wg], v_smems.at[wg], kv_barriers.at[wg]
        adds = sums.bind(dq_ref, *sum_scratch, wg=wg) if fused else None

        def compute_thread(pipeline):
            plgpu.copy_gmem_to_smem(k_ref.at[bi, kv_rows, head_kv], k_smem, barrier)
            plgpu.copy_gmem_to_smem(v_ref.at[bi, kv_rows, head_kv], v_smem, barrier)
            plgpu.barrier_wait(barrier)

            def accumulate(dk_acc, dv_acc):
                if fused:
                    *_, pending = pipeline((dk_acc, dv_acc, adds.nothing_pending()))
                    adds.let_next_in(pending)
                else:
                    pipeline((dk_acc, dv_acc))
                return dk_acc[...], dv_acc[...]

            acc = plgpu.ACC((rows, hp), jnp.float32)
            dk, dv = pl.run_scoped(accumulate, acc, acc)
            # K_j and V_j are no longer read: their buffers stage the results.
            k_smem[...] = (dk * scale).astype(k_smem.dtype)
            v_smem[...] = dv.astype(v_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, kv_rows, head_kv], commit_group=False)
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, kv_rows, head_kv], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        def tile(index, q_smem, do_smem, lse_smem, delta_smem, q_done, do_done, lse_done,
                 delta_done, carry):
            (s,) = index
            step = lists.decode(s)
            dk_acc, dv_acc, *pending = carry

            def load_row(ref, done):
                value = plgpu.load(ref, (), layout=WGMMA_COL)
                plgpu.barrier_arrive(done)
                return value

            ds_t = dkdv_tile(arith, (k_smem,), (v_smem,), (q_smem,), (do_smem,), dk_acc, dv_acc,
                             q_cols=q_smem, do_cols=do_smem,
                             lse_row=lambda: load_row(lse_smem, lse_done),
                             delta_row=lambda: load_row(delta_smem, delta_done),
                             partial=step.partial, q_start=step.block * block_q,
                             kv_start=kv_base, batch=bi, head=head_kv * groups + step.head)
            if not fused:
                plgpu.wgmma_wait(1)                                      # dV's wgmma done
                plgpu.barrier_arrive(do_done)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(q_done)
                return dk_acc, dv_acc
            partial = adds.partial_sum(ds_t, k_smem)                     # dS K_j, all done
            plgpu.barrier_arrive(do_done)
            plgpu.barrier_arrive(q_done)
            counter = adds.add(partial, pending[0], batch=bi, head=head_kv * groups + step.head,
                               q_block=step.block, rank=step.rank)
            return dk_acc, dv_acc, counter

        def q_index(s):
            step = lists.decode(s)
            return step.block, head_kv * groups + step.head, 0

        def row_index(s):
            step = lists.decode(s)
            return head_kv * groups + step.head, step.block

        qspec = plgpu.BlockSpec((block_q, None, hp), q_index,
                                transforms=swizzled((block_q, hp), dtype))
        rowspec = plgpu.BlockSpec((None, block_q), row_index)
        pipeline = tile_list_pipeline(tile, lists, stages=stages, wgs=wgs, compute_thread=compute_thread,
                                      memory_registers=memory_registers,
                                      in_specs=[qspec, qspec, rowspec, rowspec])
        pipeline(q_ref.at[bi], do_ref.at[bi], lse_ref.at[bi], delta_ref.at[bi])

    kv_smem = plgpu.SMEM((wgs, rows, hp), dtype, transforms=swizzled((rows, hp), dtype))
    out = jax.ShapeDtypeStruct((b, sp, kh, hp), dtype)
    # Mosaic GPU launches the LAST grid axis fastest; kv-blocks run slowest either way
    # (the fused kernel's order of adds needs it: backward_fused.py).
    grid = dict(grid=(n_blocks, b, kh), grid_names=("kv_blocks", "batch", "kv_heads")) if fused else \
        dict(grid=(n_blocks, kh, b), grid_names=("kv_blocks", "kv_heads", "batch"))
    return plgpu.kernel(
        kernel,
        out_type=(sums.out_type(), out, out) if fused else (out, out),
        scratch_types=[kv_smem, kv_smem, plgpu.Barrier(num_barriers=wgs, num_arrivals=2),
                       *(sums.scratch_types() if fused else ())],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        num_threads=wgs + 1,
        thread_name="wg",
        **grid,
    )(q, k, v, do, lse2, delta, *meta_arrays, *rank_arrays, *operands)
