"""The dQ kernel of the Mosaic GPU backward (Hopper: TMA, wgmma, warp specialisation).

One program per (q-block i, query head n, batch row), heaviest q-blocks first (the last
q-blocks of a causal mask have the longest lists). Its `wgs` compute warpgroups each
own `block_q / wgs` rows of Q_i and dO_i (loaded once into shared memory), their lse and
D, and a float32 accumulator dQ in registers; a memory warpgroup streams K_j, V_j of
every kv-block j on q-block i's lists — FULL kv-blocks first, then PARTIAL ones; EMPTY
tiles are never loaded. Per tile: backward_tiles.dq_tile (dQ += dS K with dS from
registers); dQ is scaled once at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu.backward_tiles import TileArithmetic, dq_tile
from pallas_kernels.mosaic_gpu.backward_walk import (WGMMA_ROW, OperandTiles, TileLists, swizzled,
                                                     tile_list_pipeline)


def dq_call(q, k, v, do, lse2, delta, meta_arrays, *, block_q: int, block_kv: int, wgs: int,
            stages: int, memory_registers: int = 40, scale: float, cap, mask_fn, kv_len: int,
            operands=(), operand_kinds=()):
    """Shapes as in backward_dkdv.dkdv_call; meta_arrays = the forward lists
    (full_count, full_index, partial_count, partial_index) at tiles (block_q, block_kv).
    Returns dQ [B, Tp, N, Hp] in q's dtype."""
    b, tp, n, hp = q.shape
    kh = k.shape[2]
    groups = n // kh
    rows = block_q // wgs                      # query rows per compute warpgroup
    dtype = q.dtype
    n_q_blocks = meta_arrays[0].shape[-1]
    kv_padded = kv_len % block_kv != 0         # the last kv tile holds padded keys

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, fc_ref, fi_ref, pc_ref, pi_ref,
               *refs):
        *operand_refs, dq_ref, q_smems, do_smems, qdo_barriers = refs
        arith = TileArithmetic(scale, cap, mask_fn, kv_len, kv_padded,
                               OperandTiles(operand_refs, operand_kinds, q_axis=0),
                               len(operand_kinds), dtype)
        i = n_q_blocks - 1 - lax.axis_index("q_blocks")      # heaviest q-blocks first
        head = lax.axis_index("heads")
        bi = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        head_kv = lax.div(head, jnp.int32(groups))
        lists = TileLists((fc_ref, fi_ref, pc_ref, pi_ref), batch=bi, block=i, head0=head,
                          groups=1)
        q_base = i * block_q + wg * rows
        q_rows = pl.ds(q_base, rows)
        q_smem, do_smem, barrier = q_smems.at[wg], do_smems.at[wg], qdo_barriers.at[wg]

        def compute_thread(pipeline):
            plgpu.copy_gmem_to_smem(q_ref.at[bi, q_rows, head], q_smem, barrier)
            plgpu.copy_gmem_to_smem(do_ref.at[bi, q_rows, head], do_smem, barrier)
            lse2_i = plgpu.load(lse_ref.at[bi, head, q_rows], (), layout=WGMMA_ROW,
                                optimized=False)
            delta_i = plgpu.load(delta_ref.at[bi, head, q_rows], (), layout=WGMMA_ROW,
                                 optimized=False)
            plgpu.barrier_wait(barrier)

            def accumulate(dq_acc):
                pipeline((dq_acc, lse2_i, delta_i))
                return dq_acc[...]

            dq = pl.run_scoped(accumulate, plgpu.ACC((rows, hp), jnp.float32))
            q_smem[...] = (dq * scale).astype(q_smem.dtype)    # Q_i's buffer stages dQ_i
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, q_rows, head])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        def tile(index, k_smem, v_smem, k_done, v_done, carry):
            (s,) = index
            step = lists.decode(s)
            dq_acc, lse2_i, delta_i = carry

            def scores_issued():
                plgpu.wgmma_wait(1)                                      # dP done: V read
                plgpu.barrier_arrive(v_done)

            dq_tile(arith, q_smem, do_smem, k_smem, v_smem, dq_acc, lse2=lse2_i, delta=delta_i,
                    scores_issued=scores_issued, partial=step.partial, q_start=q_base,
                    kv_start=step.block * block_kv, batch=bi, head=head)
            plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(k_done)
            return dq_acc, lse2_i, delta_i

        def kv_index(s):
            return lists.decode(s).block, 0

        kvspec = plgpu.BlockSpec((block_kv, hp), kv_index,
                                 transforms=swizzled((block_kv, hp), dtype))
        tile_list_pipeline(tile, lists, stages=stages, wgs=wgs, compute_thread=compute_thread,
                           memory_registers=memory_registers,
                           in_specs=[kvspec, kvspec])(k_ref.at[bi, :, head_kv], v_ref.at[bi, :, head_kv])

    qdo_smem = plgpu.SMEM((wgs, rows, hp), dtype, transforms=swizzled((rows, hp), dtype))
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((b, tp, n, hp), dtype),
        scratch_types=[qdo_smem, qdo_smem, plgpu.Barrier(num_barriers=wgs, num_arrivals=2)],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        grid=(n_q_blocks, n, b),
        grid_names=("q_blocks", "heads", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
    )(q, k, v, do, lse2, delta, *meta_arrays, *operands)
