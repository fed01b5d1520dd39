"""The fused Mosaic GPU backward: dK, dV and dQ in one pass, dQ summed in a fixed order.

The two-kernel backward (backward_dkdv.py + backward_dq.py) multiplies 7 tiles per
visited tile pair: the dQ kernel computes S and dP again. The fused one multiplies 5. It
is the dK/dV kernel (backward_dkdv.py with rank arrays: one program per kv-block j,
walking j's TRANSPOSED lists, GQA heads looped in-kernel) with one more product per tile,

    dQ_i (partial) = dS_ij K_j         (A = dSᵀ staged in shared memory, read transposed)

and the partial sums of every q-block i are added into a float32 dQ in global memory.
Floating-point addition is not associative, so the ORDER of those adds decides the
bits of the result. To keep two runs bitwise identical the adds into q-block i happen
in one fixed order: ascending kv-block j, and within a program its warpgroup 0 before
warpgroup 1. Each (batch, query head, q-block) has a counter in global memory (a Mosaic
GPU semaphore, zeroed per call). A contributor's place in the order, its *rank*, is
precomputed from the block metadata (`contributor_ranks`): the number of kv-blocks
j' < j that visit q-block i. The warpgroup that owns rows w of kv-block j:

    stages its dQ partial in shared memory;
    waits until the counter reaches wgs·rank + w (every contributor before it has added);
    TMA-stores the partial (the first contributor) or TMA-reduce-adds it (all others);
    when that copy has completed — checked one tile later, so the copy overlaps the next
    tile's products — adds 1 to the counter: the next contributor may go.

No contributor waits on a later one, a warpgroup releases its tile's pipeline slots
before it waits, and it raises its last counter before it waits for its next turn. The
grid runs kv-blocks slowest, so every program of kv-block j − 1 is launched before any
of kv-block j — provided the GPU starts a grid's CTAs in linear order, which CUDA does
not promise but Hopper does (FlashAttention-3's deterministic backward rests on the
same); under that assumption the waits cannot deadlock.
Rows of a q-block that no kv-block visits are never written; the caller zeroes them
(`visitors` = 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu.backward_walk import swizzled


# How the dQ partial sums reach global memory: "ordered" (the kernel as described above);
# for measuring where its time goes, "unordered" (every partial reduce-added as soon as
# it is staged, no counters: the sum is not deterministic and the first add lands on
# unwritten memory) and "skip" (no dQ copies at all). Only "ordered" gives a gradient.
DQ_ADDS = "ordered"


def contributor_ranks(meta):
    """(rank_full, rank_partial, visitors) of block metadata `meta` (any tiles). Builds
    int32 [Bm, Hm, nQ, nK] arrays on the device at every call (~134 MB each at 512k
    tokens with 64 × 128 tiles): affordable beside such a backward, not free.

    rank_* are shaped like meta.t_full_index / meta.t_partial_index: for the entry
    q-block i on kv-block j's transposed list, the number of kv-blocks j' < j whose tiles
    with q-block i are on its forward lists (FULL or PARTIAL). visitors [Bm, Hm, nQ]: how
    many kv-blocks visit each q-block (0: its dQ rows get no contribution)."""
    n_kv = meta.t_full_count.shape[-1]

    def visits(count, index):          # [..., nQ], [..., nQ, L] -> [..., nQ, nK] in {0, 1}
        lead = index.shape[:-1]
        valid = (jnp.arange(index.shape[-1]) < count[..., None]).astype(jnp.int32)
        rows = jnp.arange(int(jnp.size(count)))[:, None]
        flat = jnp.zeros((rows.shape[0], n_kv), jnp.int32).at[
            rows, index.reshape(rows.shape[0], -1)].max(valid.reshape(rows.shape[0], -1))
        return flat.reshape(*lead, n_kv)

    visited = jnp.maximum(visits(meta.full_count, meta.full_index),
                          visits(meta.partial_count, meta.partial_index))
    before = jnp.cumsum(visited, axis=-1) - visited          # visitors with a smaller j
    before_t = jnp.swapaxes(before, -1, -2)                   # [Bm, Hm, nK, nQ]
    rank_full = jnp.take_along_axis(before_t, meta.t_full_index, axis=-1)
    rank_partial = jnp.take_along_axis(before_t, meta.t_partial_index, axis=-1)
    return rank_full, rank_partial, visited.sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class OrderedSums:
    """dQ's partial sums in the fused dK/dV kernel (backward_dkdv.py): shared-memory
    staging, the counters, and the ordered adds of one compute warpgroup. Built outside
    the kernel for its output and scratch types; `bind` inside it (per warpgroup)."""

    batch: int
    heads: int
    q_blocks: int
    block_q: int
    head_dim: int
    rows: int                  # key rows of one compute warpgroup
    wgs: int
    dtype: object
    refs: tuple = ()           # (counters, dq out, dS staging, dQ staging) once bound
    wg: object = None

    def out_type(self):
        return jax.ShapeDtypeStruct((self.batch, self.heads, self.q_blocks * self.block_q,
                                     self.head_dim), jnp.float32)

    def scratch_types(self):
        ds = plgpu.SMEM((self.wgs, self.rows, self.block_q), self.dtype,
                        transforms=swizzled((self.rows, self.block_q), self.dtype))
        dq = plgpu.SMEM((self.wgs, self.block_q, self.head_dim), jnp.float32,
                        transforms=swizzled((self.block_q, self.head_dim), jnp.float32))
        return [ds, dq]

    def bind(self, dq_ref, ds_smems, dq_smems, *, wg):
        counters = pl.get_global(plgpu.SemaphoreType.REGULAR(
            (self.batch * self.heads * self.q_blocks,)))
        return dataclasses.replace(self, refs=(counters, dq_ref, ds_smems.at[wg], dq_smems.at[wg]),
                                   wg=wg)

    @staticmethod
    def nothing_pending():
        return jnp.int32(-1)

    def partial_sum(self, ds_t, k_smem):
        """dS K for this warpgroup's key rows: dSᵀ (registers, [rows, block_q]) is staged
        in shared memory and read transposed as the A operand. Waits for every wgmma the
        warpgroup issued, so the tile's operands may be released after it."""
        _, _, ds_smem, _ = self.refs
        ds_smem[...] = ds_t
        plgpu.commit_smem()

        def product(acc):
            plgpu.wgmma(acc, ds_smem.T, k_smem)
            return plgpu.wgmma_accumulator_load(acc, wait_n=0)

        return pl.run_scoped(product, plgpu.ACC((self.block_q, self.head_dim), jnp.float32))

    def let_next_in(self, counter):
        """The last copy has landed: count it (counter < 0: there was none)."""
        counters = self.refs[0]
        plgpu.wait_smem_to_gmem(0)

        @pl.when(counter >= 0)
        def _():
            plgpu.semaphore_signal(counters.at[counter], 1, memory_scope="gpu")

    def add(self, partial, pending, *, batch, head, q_block, rank):
        """Stage `partial` and add it into dQ[batch, head, q_block] at this warpgroup's
        turn; returns the counter to signal once the copy has landed (next tile)."""
        counters, dq_ref, _, dq_smem = self.refs
        # The previous tile's copy had this tile's products to land; then this partial
        # takes the staging buffer and waits for its turn.
        self.let_next_in(pending)
        dq_smem[...] = partial
        plgpu.commit_smem()
        dst = dq_ref.at[batch, head, pl.ds(q_block * self.block_q, self.block_q)]
        if DQ_ADDS not in ("ordered", "unordered", "skip"):
            raise ValueError("backward_fused.DQ_ADDS must be 'ordered', 'unordered' or 'skip', "
                             f"got {DQ_ADDS!r}")
        if DQ_ADDS != "ordered":
            if DQ_ADDS == "unordered":
                plgpu.copy_smem_to_gmem(dq_smem, dst, reduction_op="add")
            return pending
        counter = (batch * self.heads + head) * self.q_blocks + q_block
        turn = rank * self.wgs + self.wg
        plgpu.semaphore_wait(counters.at[counter], turn, decrement=False, memory_scope="gpu")

        @pl.when(turn == 0)
        def _():
            plgpu.copy_smem_to_gmem(dq_smem, dst)

        @pl.when(turn > 0)
        def _():
            plgpu.copy_smem_to_gmem(dq_smem, dst, reduction_op="add")

        return counter
