"""One tile's products in the Mosaic GPU backward: the dK/dV pass (transposed) and the
dQ pass, each written once for the kernel that runs one CTA per block and the
persistent one (the same products in the same order, so their gradients are bitwise
equal). The kernels differ only in where the tiles sit and how slots are released;
those are the callers' business, after the last product has been issued.

dK/dV, rows = keys, columns = queries, so that Pᵀ and dSᵀ are already the register
operands of the next wgmma (FlashAttention-2, Algorithm 2):
    Sᵀ = K Qᵀ;  Pᵀ = exp2(scale·log2e·Sᵀ − lse·log2e), masked on PARTIAL tiles;
    dPᵀ = V dOᵀ;  dV += Pᵀ dO;  dSᵀ = Pᵀ ∘ (dPᵀ − D), 0 where Pᵀ is;  dK += dSᵀ Q.
At head dim 256 the dK/dV kernel's two warpgroups share the tile's rows and each keeps
half of dK's and dV's columns (backward_dkdv_persistent.py): its operands sit in shared
memory as column halves, Sᵀ and dPᵀ sum one product per half, and dV, dK multiply the
warpgroup's own half of dO and Q. By default each product is formed once and Pᵀ, dSᵀ
handed over between the warpgroups (dkdv_tile_shared); with a soft cap both warpgroups
form both (dkdv_tile with two column parts).
dQ, rows = queries:
    dP = dO Vᵀ;  S = Q Kᵀ;  P as above;  dS = P ∘ (dP − D), 0 where P is;  dQ += dS K.
dK and dQ are scaled once at the end, by the callers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu import named_barrier
from pallas_kernels.mosaic_gpu.backward_walk import (OperandTiles, dlogits, keep_partial,
                                                     logits_and_probabilities, tile_positions)


@dataclasses.dataclass(frozen=True)
class TileArithmetic:
    """What a kernel call's tiles share: the logits' scale and soft cap, the mask
    (mask_fn, its operands' loader, the true key count when the last kv tile is
    padded, the true query count where the dK/dV kernel's last q-block is padded) and
    the dtype of the wgmma operands built in registers (P, dS)."""
    scale: float
    cap: float | None
    mask_fn: Callable | None
    kv_len: int
    kv_padded: bool
    operand_tiles: OperandTiles
    operand_count: int
    dtype: Any
    q_len: int | None = None   # T where a masked dK/dV tile's query rows are padded past it

    def probabilities(self, s, lse2, *, row_axis: int, partial, q_start, kv_start, batch, head):
        """(P, tanh or None) of raw scores s, P selected to 0 where a PARTIAL tile's mask
        rules a pair out. row_axis: the tile's query axis."""
        p, tanh = logits_and_probabilities(s, lse2, scale=self.scale, cap=self.cap,
                                           row_axis=row_axis)
        kv_axis = 1 - row_axis
        positions = functools.partial(tile_positions, s.shape, q_start, row_axis, kv_start,
                                      kv_axis)
        operands_here = functools.partial(self.operand_tiles, s.shape, batch=batch, head=head,
                                          q_start=q_start, kv_start=kv_start)
        p = keep_partial(p, partial, self.mask_fn, positions, self.kv_len, self.kv_padded,
                         operands_here, self.operand_count, q_len=self.q_len)
        return p, tanh

    def dlogits(self, p, dp, delta, tanh, *, row_axis: int, partial):
        """dS of the tile (backward_walk.dlogits), selected to exactly 0 where a PARTIAL
        tile's P was: a pair the mask rules out then contributes nothing even where dP,
        D or the cap's tanh is NaN (a V row, an output or a K row that is NaN/Inf; P = 0
        alone would give 0 · NaN = NaN in dK and dQ). FULL tiles skip the select."""
        ds = dlogits(p, dp, delta, tanh, row_axis=row_axis)
        if self.mask_fn is None and not self.kv_padded and self.q_len is None:
            return ds
        return lax.cond(partial, lambda: jnp.where(p == 0.0, 0.0, ds), lambda: ds)


def dkdv_tile(arith: TileArithmetic, k_parts, v_parts, q_parts, do_parts, dk_acc, dv_acc, *,
              q_cols, do_cols, lse_row: Callable, delta_row: Callable, partial, q_start,
              kv_start, batch, head):
    """One (kv-block, q-block) tile of the dK/dV pass. K, V [rows, ·] and Q, dO
    [block_q, ·] sit in shared memory as column parts (`*_parts`: the whole head dim as
    one part, or its halves at head dim 256), so Sᵀ and dPᵀ sum one product per part;
    dk_acc, dv_acc are the warpgroup's float32 accumulators over the columns of
    `q_cols` / `do_cols` (one of the parts, or the whole tile). lse_row() / delta_row()
    load the q-block's lse·log2e and D in the column layout (called when needed: D only
    after dPᵀ, so it is not live through the mask). Issues dK += dSᵀ Q last, without
    waiting for it, and returns dSᵀ (the fused kernel's dQ partial reuses it)."""
    rows, block_q = k_parts[0].shape[0], q_parts[0].shape[0]

    def scores(acc):
        for k_part, q_part in zip(k_parts, q_parts):
            plgpu.wgmma(acc, k_part, q_part.T)                      # Sᵀ = K Qᵀ
        return acc[...], lse_row()

    tile_acc = plgpu.ACC((rows, block_q), jnp.float32)
    s_t, lse2 = pl.run_scoped(scores, tile_acc)
    p_t, tanh = arith.probabilities(s_t, lse2, row_axis=1, partial=partial, q_start=q_start,
                                    kv_start=kv_start, batch=batch, head=head)

    def probabilities_grad(acc):
        for v_part, do_part in zip(v_parts, do_parts):
            plgpu.wgmma(acc, v_part, do_part.T)                     # dPᵀ = V dOᵀ
        plgpu.wgmma(dv_acc, p_t.astype(arith.dtype), do_cols)       # dV += Pᵀ dO
        return plgpu.wgmma_accumulator_load(acc, wait_n=1)          # dPᵀ only

    dp_t = pl.run_scoped(probabilities_grad, tile_acc)
    ds_t = arith.dlogits(p_t, dp_t, delta_row(), tanh, row_axis=1,
                         partial=partial).astype(arith.dtype)
    plgpu.wgmma(dk_acc, ds_t, q_cols)                               # dK += dSᵀ Q
    return ds_t


def dq_tile(arith: TileArithmetic, q_tile, do_tile, k_tile, v_tile, dq_acc, *, lse2, delta,
            scores_issued: Callable, partial, q_start, kv_start, batch, head):
    """One (q-block, kv-block) tile of the dQ pass: Q, dO [rows, Hp] and K, V
    [block_kv, Hp] in shared memory; lse2 and delta the warpgroup's rows (row layout);
    dq_acc its float32 accumulator. scores_issued() runs once dP and S are issued, before
    they are read (it waits for them, and may release V's slot). Issues dQ += dS K last,
    without waiting for it."""
    rows, block_kv = q_tile.shape[0], k_tile.shape[0]

    def scores_and_grads(dp_acc, s_acc):
        plgpu.wgmma(dp_acc, do_tile, v_tile.T)                      # dP = dO Vᵀ
        plgpu.wgmma(s_acc, q_tile, k_tile.T)                        # S = Q Kᵀ
        scores_issued()
        return dp_acc[...], s_acc[...]

    tile_acc = plgpu.ACC((rows, block_kv), jnp.float32)
    dp, s = pl.run_scoped(scores_and_grads, tile_acc, tile_acc)
    p, tanh = arith.probabilities(s, lse2, row_axis=0, partial=partial, q_start=q_start,
                                  kv_start=kv_start, batch=batch, head=head)
    ds = arith.dlogits(p, dp, delta, tanh, row_axis=0, partial=partial)
    plgpu.wgmma(dq_acc, ds.astype(arith.dtype), k_tile)            # dQ += dS K


@dataclasses.dataclass(frozen=True)
class Exchange:
    """Where the two warpgroups of the shared-products dK/dV tile hand Pᵀ and dSᵀ over:
    two [rows, block_q] 16-bit buffers in shared memory and the named barriers that
    say each is written (warpgroup 0 arrives on `p_ready` and waits on `ds_ready`,
    warpgroup 1 the other way round; 256 threads each)."""
    p_smem: Any
    ds_smem: Any
    p_ready: int
    ds_ready: int


def dkdv_tile_shared(arith: TileArithmetic, x_parts, dk_acc, dv_acc, *, role, q_cols, do_cols,
                     exchange: Exchange, lse_row: Callable, delta_row: Callable, partial,
                     q_start, kv_start, batch, head):
    """One tile of the dK/dV pass at head dim 256 with each product formed once: both
    warpgroups own the tile's keys and one column half of dK and dV each. Warpgroup
    `role` 0 forms Sᵀ = K Qᵀ and Pᵀ, warpgroup 1 dPᵀ = V dOᵀ (x_parts: the (A, B) column
    halves of its product, summed); Pᵀ goes to warpgroup 1 through shared memory, which
    forms dSᵀ = Pᵀ ∘ (dPᵀ − D) (0 where Pᵀ is, on PARTIAL tiles) and hands it back; then
    each multiplies its half: dV += Pᵀ dO, dK += dSᵀ Q (q_cols / do_cols). No soft cap
    (dSᵀ would need its tanh too). Issues the last two products without waiting."""
    rows, block_q = x_parts[0][0].shape[0], x_parts[0][1].shape[0]
    threads = 2 * 128

    def product(acc):
        for a, b in x_parts:
            plgpu.wgmma(acc, a, b.T)
        return acc[...]

    x = pl.run_scoped(product, plgpu.ACC((rows, block_q), jnp.float32))

    def scores():          # warpgroup 0: x = Sᵀ
        p_t, _ = arith.probabilities(x, lse_row(), row_axis=1, partial=partial, q_start=q_start,
                                     kv_start=kv_start, batch=batch, head=head)
        p_b = p_t.astype(arith.dtype)
        exchange.p_smem[...] = p_b
        named_barrier.bar_arrive(exchange.p_ready, threads)
        named_barrier.bar_sync(exchange.ds_ready, threads)
        return p_b, plgpu.load(exchange.ds_smem, (), layout=plgpu.Layout.WGMMA)

    def gradients():       # warpgroup 1: x = dPᵀ
        named_barrier.bar_sync(exchange.p_ready, threads)
        p_b = plgpu.load(exchange.p_smem, (), layout=plgpu.Layout.WGMMA)
        ds_b = arith.dlogits(p_b.astype(jnp.float32), x, delta_row(), None, row_axis=1,
                             partial=partial).astype(arith.dtype)
        exchange.ds_smem[...] = ds_b
        named_barrier.bar_arrive(exchange.ds_ready, threads)
        return p_b, ds_b

    p_b, ds_b = lax.cond(role == 0, scores, gradients)
    plgpu.wgmma(dv_acc, p_b, do_cols)                               # dV += Pᵀ dO
    plgpu.wgmma(dk_acc, ds_b, q_cols)                               # dK += dSᵀ Q
