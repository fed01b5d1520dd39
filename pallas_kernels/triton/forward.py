"""Block-sparse FlashAttention forward kernel (Pallas, Triton lowering).

One program per (q-block i, batch b, query head n). It keeps the q tile on chip and
walks only the kv-blocks the metadata lists for its q-block — first the FULL ones (no
mask work), then the PARTIAL ones (mask evaluated in the tile) — with the online
softmax of FlashAttention-2 (Algorithm 1). EMPTY tiles are never loaded. It writes the
output tile and the row log-sum-exp used by the backward pass. With attention dropout
it regenerates each tile's keep-mask from the seed (KernelDropout): dropped pairs stay in
the softmax statistics and leave P·V, and the output is divided by (1 − rate).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (LN2, LOG2E, MASK_VALUE, acc_dtype, pad_btnh, pad_to_multiple,
                                   padded_query_len, prepare_bias, prepare_operands,
                                   reversed_q_block)
from pallas_kernels.score_mod import apply_score_mod, flat_operand
from pallas_kernels.triton.common import (KernelDropout, bias_access, dot_nt, forward_table,
                                          kernel_dropout, make_operand_access,
                                          online_softmax_step, padded_head_dim, scaled_logits,
                                          score_operand_spec, split_refs, tile_keep, tile_positions,
                                          walk_tiles)


def _forward_kernel(table_ref, q_ref, k_ref, v_ref, *refs, n_operands, accesses, mask_fn,
                    bias_acc, dropout, layout, scale, cap, kv_len, q_len, bq, bk, acc, score_mod,
                    score_shapes):
    operand_refs, bias_ref, seed_ref, score_refs, (o_ref, lse_ref) = split_refs(
        refs, n_operands, bias_acc, dropout, len(score_shapes))
    # Programs run in reverse q-block order (heaviest q-blocks first).
    q_start = reversed_q_block(pl.program_id(0), pl.num_programs(0)) * bq
    q = q_ref[...]                                    # [bq, Hp], stays on chip
    hp = q.shape[-1]
    batch, head = pl.program_id(1), pl.program_id(2)  # grid (i, b, n): batch row, query head
    if dropout is not None:
        h_head = dropout.head_hash(seed_ref, batch, head)

    def visit(kv_block, carry, partial):
        m_i, l_i, o_acc = carry
        kv_start = pl.multiple_of(kv_block * bk, bk)
        k = k_ref[pl.ds(kv_start, bk), :]
        # S·log2(e) with S = scale·QKᵀ (+ bias, soft-capped), one multiply folded in [bq, bk].
        bias = None if bias_acc is None else bias_acc.load(bias_ref, q_start, kv_start, 0)
        if score_mod is None:
            logits2, _ = scaled_logits(dot_nt(q, k, acc), scale, cap, LOG2E, bias)
        else:   # S = fn(S) on the tile, before the mask; then the base change
            logits, _ = scaled_logits(dot_nt(q, k, acc), scale, cap, 1.0, bias)
            q_pos, kv_pos = tile_positions(q_start, kv_start, bq=bq, bk=bk)
            logits = apply_score_mod(score_mod, logits, batch, head, q_pos, kv_pos, score_refs,
                                     score_shapes)
            logits2 = logits * LOG2E
        keep = None
        if partial:   # PARTIAL tile: the mask (and kv padding) evaluated element-wise
            keep = tile_keep(mask_fn, accesses, operand_refs, q_start, kv_start, kv_len,
                             bq=bq, bk=bk, q_len=q_len)
        drop = None if dropout is None else dropout.tile(h_head, q_start, kv_start, bq=bq, bk=bk)
        return online_softmax_step(logits2, m_i, l_i, o_acc,
                                   lambda: v_ref[pl.ds(kv_start, bk), :], keep,
                                   zero_isolated=layout.zero_isolated, dropout_keep=drop)

    # FULL tiles first (no iota, no compare, no select), then PARTIAL ones; EMPTY tiles
    # are in neither list and are never loaded.
    carry = (jnp.full((bq,), MASK_VALUE, acc), jnp.zeros((bq,), acc), jnp.zeros((bq, hp), acc))
    carry = walk_tiles(table_ref, layout, visit, carry)
    m_i, l_i, o_acc = carry

    # Epilogue (Algorithm 1, line 12): O = acc / l; a row with no allowed key has
    # l = 0 and returns O = 0 with lse = -inf.
    nonempty = l_i > 0
    l_safe = jnp.where(nonempty, l_i, 1.0)
    o = o_acc / l_safe[:, None]
    if dropout is not None:   # kept probabilities are P / (1 − rate)
        o = o * dropout.inverse_keep
    o_ref[...] = o.astype(o_ref.dtype)
    lse = jnp.where(nonempty, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
    lse_ref[...] = lse.astype(lse_ref.dtype)


def forward(static, q, k, v, bias, metas, operands, dropout_seed=None, score_operands=()):
    """q [B, T, N, H], k/v [B, S, K, H], bias None or [Bb, Hb, T|1, S|1], dropout_seed
    uint32 [4] (pallas_kernels.dropout.seed_array) with static.dropout_rate > 0,
    score_operands the arrays static.score_mod reads → (out [B, T, N, H], lse [B, N, T])."""
    cfg = static.config
    fwd_meta = metas["forward"]
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    groups = n // kh
    bq, bk = cfg.block_q, cfg.block_kv
    assert (fwd_meta.block_q, fwd_meta.block_kv) == (bq, bk), "metadata built for other tiles"
    hp = padded_head_dim(h)
    tp, sp = pad_to_multiple(t, bq), pad_to_multiple(s, bk)
    acc = acc_dtype(q.dtype)
    qp, kp, vp = pad_btnh(q, tp, hp), pad_btnh(k, sp, hp), pad_btnh(v, sp, hp)

    table, layout = forward_table(fwd_meta)
    tbm, thm = table.shape[:2]
    prepared = prepare_operands(operands, static.operand_kinds, t, s, tp, sp, bq, bk)
    accesses = make_operand_access(prepared, "rows", bq=bq, bk=bk, groups=groups)
    bias_p = prepare_bias(bias, tp, sp, acc)
    bias_acc = bias_access(bias_p, "rows", bq=bq, bk=bk, groups=groups)
    dropout = kernel_dropout(static)
    score_flat = [flat_operand(x) for x in score_operands]

    nq = tp // bq
    row = lambda i: reversed_q_block(i, nq)  # noqa: E731  (q-block of program i)
    grid = (nq, b, n)
    in_specs = [
        pl.BlockSpec((None, None, None, table.shape[-1]),
                     lambda i, bb, nn: (bb if tbm > 1 else 0, nn if thm > 1 else 0, row(i), 0)),
        pl.BlockSpec((None, bq, None, hp), lambda i, bb, nn: (bb, row(i), nn, 0)),
        pl.BlockSpec((None, sp, None, hp), lambda i, bb, nn: (bb, 0, nn // groups, 0)),
        pl.BlockSpec((None, sp, None, hp), lambda i, bb, nn: (bb, 0, nn // groups, 0)),
        *[a.spec(reverse_rows=nq) for a in accesses],
        *([bias_acc.spec(reverse_rows=nq)] if bias_acc is not None else []),
        *([KernelDropout.spec()] if dropout is not None else []),
        *[score_operand_spec(x) for x in score_flat],
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, hp), lambda i, bb, nn: (bb, row(i), nn, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bb, nn: (bb, nn, row(i))),
    ]
    kernel = functools.partial(
        _forward_kernel, n_operands=len(accesses), accesses=accesses, mask_fn=static.mask_fn,
        bias_acc=bias_acc, dropout=dropout,
        layout=layout, scale=static.scale, cap=static.logits_soft_cap,
        kv_len=s, q_len=padded_query_len(static.mask_fn, t, tp), bq=bq, bk=bk, acc=acc,
        score_mod=static.score_mod,
        score_shapes=static.score_operand_shapes)
    out, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((b, tp, n, hp), q.dtype),
                   jax.ShapeDtypeStruct((b, n, tp), acc)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=static.interpret,
        name="jaxattn_flash_forward",
    )(table, qp, kp, vp, *[a.arr for a in accesses], *([bias_p] if bias_p is not None else []),
      *([dropout_seed] if dropout is not None else []), *score_flat)
    return out[:, :t, :, :h], lse[:, :, :t]
