"""Block-sparse FlashAttention backward kernels (Pallas, Triton lowering).

Two kernels, no atomics, so the result is bitwise deterministic:

* dK/dV: one program per (kv-block j, batch b, kv head kh). It keeps K_j, V_j on chip and,
  for each of the G query heads sharing kh (GQA), walks the q-blocks the *transposed*
  metadata lists for kv-block j — FULL ones first, then PARTIAL ones:
      P = exp(S − lse),  dV += Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − D),  dK += dSᵀ Q.
* dQ: one program per (q-block i, batch b, query head n), walking the same kv-block
  lists as the forward:  dQ += dS K; with a bias it also writes dbias = dS per tile.

Both skip EMPTY tiles exactly like the forward, so backward cost follows the number of
non-empty tiles. D = rowsum(dO ∘ O) − dlse comes precomputed (pallas_kernels/flash_vjp.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.metadata import pad_to_multiple
from pallas_kernels.triton.common import (LOG2E, acc_dtype, dot_nn, dot_nt, dot_tn,
                                          forward_table, make_operand_access, pad_axis, pad_btnh,
                                          padded_head_dim, prepare_operands, scaled_logits,
                                          tile_keep, transposed_table, walk_tiles,
                                          bias_access, prepare_bias, split_refs)


def _probabilities_and_dlogits(q, k, v, do, lse2, delta, keep, *, scale, cap, acc, bias=None):
    """Recompute P for one tile from the saved lse, then dS w.r.t. the pre-cap logits
    scale·q·k + bias (= dbias; dQ and dK scale it by `scale`)."""
    logits2, tanh = scaled_logits(dot_nt(q, k, acc), scale, cap, LOG2E, bias)
    p = jnp.exp2(logits2 - lse2[:, None])
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    dp = dot_nt(do, v, acc)
    ds = p * (dp - delta[:, None])
    if cap is not None:
        ds = ds * (1.0 - tanh * tanh)   # d(c·tanh(x/c))/dx
    return p, ds


def _dkdv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, n_operands,
                 accesses, mask_fn, bias_acc, layout, per_head_table, groups, scale, cap, kv_len,
                 bq, bk, acc):
    operand_refs, bias_ref, (dk_ref, dv_ref, *dbias_ref) = split_refs(refs, n_operands, bias_acc)
    kv_start = pl.program_id(0) * bk
    k = k_ref[...]                                        # [bk, Hp], on chip throughout
    v = v_ref[...]
    hp = k.shape[-1]

    def visit(q_block, carry, partial, *, g):
        dk, dv, *colsum = carry
        q_start = pl.multiple_of(q_block * bq, bq)
        rows = pl.ds(q_start, bq)
        q = q_ref[rows, g, :]
        do = do_ref[rows, g, :]
        lse2 = lse_ref[g, rows] * LOG2E
        delta = delta_ref[g, rows]
        keep = None
        if partial:
            keep = tile_keep(mask_fn, accesses, operand_refs, q_start, kv_start, kv_len,
                             bq=bq, bk=bk, g=g)
        bias = None if bias_acc is None else bias_acc.load(bias_ref, q_start, kv_start, g)
        p, ds = _probabilities_and_dlogits(q, k, v, do, lse2, delta, keep, scale=scale, cap=cap,
                                           acc=acc, bias=bias)
        dv = dv + dot_tn(p.astype(do.dtype), do, acc)
        dk = dk + dot_tn(ds.astype(q.dtype), q, acc)
        if colsum:   # a [.., 1, S] bias: its gradient is dS summed over the query rows
            colsum = [colsum[0] + jnp.sum(ds, axis=0)]
        return (dk, dv, *colsum)

    carry = (jnp.zeros((bk, hp), acc), jnp.zeros((bk, hp), acc))
    for g in range(groups):                                  # query heads sharing this kv head
        carry = (*carry[:2], *([jnp.zeros((bk,), acc)] if dbias_ref else []))
        carry = walk_tiles(table_ref, layout, functools.partial(visit, g=g), carry,
                           head=g if per_head_table else None)
        if dbias_ref:
            dbias_ref[0][g, :] = carry[2].astype(dbias_ref[0].dtype)
    dk, dv = carry[:2]
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, n_operands,
               accesses, mask_fn, bias_acc, dbias_mode, layout, scale, cap, kv_len, bq, bk, acc):
    operand_refs, bias_ref, (dq_ref, *dbias_ref) = split_refs(refs, n_operands, bias_acc)
    q_start = (pl.num_programs(0) - 1 - pl.program_id(0)) * bq   # heaviest q-blocks first
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...] * LOG2E
    delta = delta_ref[...]

    def visit(kv_block, dq, partial):
        kv_start = pl.multiple_of(kv_block * bk, bk)
        k = k_ref[pl.ds(kv_start, bk), :]
        v = v_ref[pl.ds(kv_start, bk), :]
        keep = None
        if partial:
            keep = tile_keep(mask_fn, accesses, operand_refs, q_start, kv_start, kv_len,
                             bq=bq, bk=bk)
        bias = None if bias_acc is None else bias_acc.load(bias_ref, q_start, kv_start, 0)
        _, ds = _probabilities_and_dlogits(q, k, v, do, lse2, delta, keep, scale=scale, cap=cap,
                                           acc=acc, bias=bias)
        dq, *rowsum = dq
        if dbias_mode == "tiles":   # dbias of this tile is dS itself; EMPTY tiles keep zeros
            dbias_ref[0][:, pl.ds(kv_start, bk)] = ds.astype(dbias_ref[0].dtype)
        elif dbias_mode == "rows":  # a [.., T|1, 1] bias: dS summed over the key columns
            rowsum = [rowsum[0] + jnp.sum(ds, axis=1)]
        return (dq + dot_nn(ds.astype(k.dtype), k, acc), *rowsum)

    if dbias_mode == "tiles":
        def zero_tile(j, c):
            dbias_ref[0][:, pl.ds(pl.multiple_of(j * bk, bk), bk)] = jnp.zeros((bq, bk), dbias_ref[0].dtype)
            return c
        jax.lax.fori_loop(0, dbias_ref[0].shape[-1] // bk, zero_tile, 0)
    carry = (jnp.zeros(q.shape, acc), *([jnp.zeros((bq,), acc)] if dbias_mode == "rows" else []))
    dq, *rowsum = walk_tiles(table_ref, layout, visit, carry)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    if dbias_mode == "rows":
        dbias_ref[0][...] = rowsum[0].astype(dbias_ref[0].dtype)


def backward(static, q, k, v, bias, out, lse, dout, delta, metas, operands,
             parts=("dq", "dkdv", "dbias")):
    """(dq, dk, dv, dbias): dbias has the bias's own shape (None without a bias).
    `parts` runs only the dQ kernel ("dq") or only the dK/dV kernel ("dkdv"), and asks
    for the bias gradient ("dbias") or not; what was not asked for comes back as None
    (ring attention sends dK/dV on while dQ runs; a constant bias needs no gradient).

    dbias is dS reduced to the bias's shape. The kernels reduce over what they loop
    over: a [.., 1, S] bias gets column sums from the dK/dV kernel, a [.., T|1, 1] one row
    sums from the dQ kernel; only a [.., T, S] bias has dS written per (b, n) tile."""
    del out  # D = rowsum(dO ∘ O) − dlse already carries what the backward needs of O.
    dq = dk = dv = dbias = None
    mode = None   # which kernel makes dbias, and how
    if bias is not None and "dbias" in parts:
        t_full, s_full = bias.shape[2] > 1, bias.shape[3] > 1
        mode = "tiles" if t_full and s_full else ("cols" if s_full else "rows")
    if "dkdv" in parts or mode == "cols":
        dk, dv, dbias_cols = _dkdv(static, q, k, v, bias, lse, dout, delta, metas["dkdv"], operands,
                                   dbias=mode == "cols")
        if mode == "cols":
            dbias = dbias_cols[:, :, None, :]                # [B, N, 1, S]
        if "dkdv" not in parts:
            dk = dv = None
    if "dq" in parts or mode in ("tiles", "rows"):
        dq_mode = mode if mode in ("tiles", "rows") else None
        dq, dbias_rows = _dq(static, q, k, v, bias, lse, dout, delta, metas["dq"], operands,
                             dbias_mode=dq_mode)
        if dq_mode is not None:
            dbias = dbias_rows if mode == "tiles" else dbias_rows[..., None]   # [B, N, T, S|1]
        if "dq" not in parts:
            dq = None
    if dbias is not None:   # sum over the axes the bias is broadcast along
        sum_axes = tuple(a for a in range(4) if bias.shape[a] == 1 and dbias.shape[a] != 1)
        dbias = jnp.sum(dbias, axis=sum_axes, keepdims=True).astype(bias.dtype)
    return dq, dk, dv, dbias


def _padded_inputs(q, k, v, lse, dout, delta, bq, bk):
    t, s, h = q.shape[1], k.shape[1], q.shape[3]
    hp = padded_head_dim(h)
    tp, sp = pad_to_multiple(t, bq), pad_to_multiple(s, bk)
    acc = acc_dtype(q.dtype)
    # Padded rows: lse = 0 and D = 0 keep P finite, and dO = 0 makes their dS and dV zero.
    return (tp, sp, hp, acc, pad_btnh(q, tp, hp), pad_btnh(k, sp, hp), pad_btnh(v, sp, hp),
            pad_btnh(dout.astype(q.dtype), tp, hp), pad_axis(lse.astype(acc), 2, tp),
            pad_axis(delta.astype(acc), 2, tp))


def _setup(static, q, k, v, lse, dout, delta, meta, operands):
    """Shapes, padded inputs, mask operands and kernel parameters shared by both kernels."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = meta.block_q, meta.block_kv
    tp, sp, hp, acc, qp, kp, vp, dop, lse_p, delta_p = _padded_inputs(q, k, v, lse, dout, delta, bq, bk)
    prepared = prepare_operands(operands, static.operand_kinds, t, s, tp, sp, bq, bk)
    common = dict(mask_fn=static.mask_fn, scale=static.scale, cap=static.logits_soft_cap,
                  kv_len=s, bq=bq, bk=bk, acc=acc)
    params = plgpu.CompilerParams(num_warps=static.config.num_warps_bwd,
                                  num_stages=static.config.num_stages_bwd)
    return (b, t, n, h, s, kh, n // kh, bq, bk, tp, sp, hp, qp, kp, vp, dop, lse_p, delta_p,
            prepared, common, params)


def _dkdv(static, q, k, v, bias, lse, dout, delta, meta, operands, dbias=False):
    """dK, dV (and, with `dbias`, dS summed over the query rows: [B, N, S]): programs over
    kv-blocks, walking the transposed lists."""
    (b, t, n, h, s, kh, groups, bq, bk, tp, sp, hp, qp, kp, vp, dop, lse_p, delta_p, prepared,
     common, params) = _setup(static, q, k, v, lse, dout, delta, meta, operands)

    t_table, layout = transposed_table(meta)
    tbm, thm = t_table.shape[:2]
    per_head_table = thm > 1
    accesses = make_operand_access(prepared, "cols", bq=bq, bk=bk, groups=groups)
    bias_p = prepare_bias(bias, tp, sp, common["acc"])
    bias_acc = bias_access(bias_p, "cols", bq=bq, bk=bk, groups=groups)
    bsel = (lambda bb: bb) if tbm > 1 else (lambda bb: 0)
    dkdv_in_specs = [
        pl.BlockSpec((None, groups if per_head_table else None, None, t_table.shape[-1]),
                     lambda j, bb, hh: (bsel(bb), hh if per_head_table else 0, j, 0)),
        pl.BlockSpec((None, tp, groups, hp), lambda j, bb, hh: (bb, 0, hh, 0)),    # q (group)
        pl.BlockSpec((None, bk, None, hp), lambda j, bb, hh: (bb, j, hh, 0)),      # k
        pl.BlockSpec((None, bk, None, hp), lambda j, bb, hh: (bb, j, hh, 0)),      # v
        pl.BlockSpec((None, tp, groups, hp), lambda j, bb, hh: (bb, 0, hh, 0)),    # dO (group)
        pl.BlockSpec((None, groups, tp), lambda j, bb, hh: (bb, hh, 0)),           # lse
        pl.BlockSpec((None, groups, tp), lambda j, bb, hh: (bb, hh, 0)),           # D
        *[a.spec() for a in accesses],
        *([bias_acc.spec()] if bias_acc is not None else []),
    ]
    kv_out_spec = pl.BlockSpec((None, bk, None, hp), lambda j, bb, hh: (bb, j, hh, 0))
    out_specs = [kv_out_spec, kv_out_spec]
    out_shape = [jax.ShapeDtypeStruct((b, sp, kh, hp), k.dtype),
                 jax.ShapeDtypeStruct((b, sp, kh, hp), v.dtype)]
    if dbias:   # per query head: the G heads of group hh are rows hh·G … hh·G + G − 1
        out_specs.append(pl.BlockSpec((None, groups, bk), lambda j, bb, hh: (bb, hh, j)))
        out_shape.append(jax.ShapeDtypeStruct((b, n, sp), common["acc"]))
    dk, dv, *dbias_cols = pl.pallas_call(
        functools.partial(_dkdv_kernel, n_operands=len(accesses), accesses=accesses,
                          bias_acc=bias_acc, layout=layout, per_head_table=per_head_table,
                          groups=groups, **common),
        grid=(sp // bk, b, kh),
        in_specs=dkdv_in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=static.interpret,
        name="jaxattn_flash_dkdv",
    )(t_table, qp, kp, vp, dop, lse_p, delta_p, *[a.arr for a in accesses],
      *([bias_p] if bias_p is not None else []))
    return dk[:, :s, :, :h], dv[:, :s, :, :h], (dbias_cols[0][:, :, :s] if dbias else None)


def _dq(static, q, k, v, bias, lse, dout, delta, meta, operands, dbias_mode=None):
    """dQ: programs over q-blocks, walking the forward lists. dbias_mode "tiles" also
    writes dS per (b, n) ([B, N, T, S]); "rows" its sums over the key columns
    ([B, N, T])."""
    (b, t, n, h, s, kh, groups, bq, bk, tp, sp, hp, qp, kp, vp, dop, lse_p, delta_p, prepared,
     common, params) = _setup(static, q, k, v, lse, dout, delta, meta, operands)
    table, layout = forward_table(meta)
    fbm, fhm = table.shape[:2]
    accesses = make_operand_access(prepared, "rows", bq=bq, bk=bk, groups=groups)
    bias_p = prepare_bias(bias, tp, sp, common["acc"])
    bias_acc = bias_access(bias_p, "rows", bq=bq, bk=bk, groups=groups)
    nq = tp // bq
    dq_in_specs = [
        pl.BlockSpec((None, None, None, table.shape[-1]),
                     lambda i, bb, nn: (bb if fbm > 1 else 0, nn if fhm > 1 else 0, nq - 1 - i, 0)),
        pl.BlockSpec((None, bq, None, hp), lambda i, bb, nn: (bb, nq - 1 - i, nn, 0)),
        pl.BlockSpec((None, sp, None, hp), lambda i, bb, nn: (bb, 0, nn // groups, 0)),
        pl.BlockSpec((None, sp, None, hp), lambda i, bb, nn: (bb, 0, nn // groups, 0)),
        pl.BlockSpec((None, bq, None, hp), lambda i, bb, nn: (bb, nq - 1 - i, nn, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bb, nn: (bb, nn, nq - 1 - i)),
        pl.BlockSpec((None, None, bq), lambda i, bb, nn: (bb, nn, nq - 1 - i)),
        *[a.spec(reverse_rows=nq) for a in accesses],
        *([bias_acc.spec(reverse_rows=nq)] if bias_acc is not None else []),
    ]
    out_specs = [pl.BlockSpec((None, bq, None, hp), lambda i, bb, nn: (bb, nq - 1 - i, nn, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, tp, n, hp), q.dtype)]
    if dbias_mode == "tiles":   # dS of every (b, n), reduced to the bias's shape by the caller
        out_specs.append(pl.BlockSpec((None, None, bq, sp), lambda i, bb, nn: (bb, nn, nq - 1 - i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, n, tp, sp), common["acc"]))
    elif dbias_mode == "rows":
        out_specs.append(pl.BlockSpec((None, None, bq), lambda i, bb, nn: (bb, nn, nq - 1 - i)))
        out_shape.append(jax.ShapeDtypeStruct((b, n, tp), common["acc"]))
    dq, *dbias = pl.pallas_call(
        functools.partial(_dq_kernel, n_operands=len(accesses), accesses=accesses,
                          bias_acc=bias_acc, dbias_mode=dbias_mode, layout=layout, **common),
        grid=(tp // bq, b, n),
        in_specs=dq_in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=static.interpret,
        name="jaxattn_flash_dq",
    )(table, qp, kp, vp, dop, lse_p, delta_p, *[a.arr for a in accesses],
      *([bias_p] if bias_p is not None else []))
    if dbias_mode == "tiles":
        return dq[:, :t, :, :h], dbias[0][:, :, :t, :s]
    return dq[:, :t, :, :h], (dbias[0][:, :, :t] if dbias_mode == "rows" else None)
