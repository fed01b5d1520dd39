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
With attention dropout both regenerate the forward's keep-mask per tile (KernelDropout)
and use Z = keep / (1 − rate): dV += (P ∘ Z)ᵀ dO and dP = (dO Vᵀ) ∘ Z.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (LOG2E, acc_dtype, dbias_mode, delta_array, pad_axis,
                                   pad_btnh, pad_to_multiple, padded_query_len, prepare_bias,
                                   prepare_operands, reduce_dbias, reversed_q_block)
from pallas_kernels.score_mod import flat_operand, score_vjp, tile_sum
from pallas_kernels.triton.common import (KernelDropout, bias_access, dot_nn, dot_nt, dot_tn,
                                          forward_table, kernel_dropout, make_operand_access,
                                          padded_head_dim, scaled_logits, score_operand_spec,
                                          split_refs, tile_keep, tile_positions,
                                          transposed_table, walk_tiles, zero_unreachable)


def _probabilities_and_dlogits(q, k, v, do, lse2, delta, keep, *, scale, cap, acc, bias=None,
                               dropout=None, drop=None, score=None):
    """Recompute P for one tile from the saved lse, then dS w.r.t. the pre-cap logits
    scale·q·k + bias (= dbias; dQ and dK scale it by `scale`). In a PARTIAL tile both
    are selected to 0 on masked pairs, so NaN/Inf in a masked key's logits or in its V
    row (through dP = dO·Vᵀ) never reaches a gradient. With dropout (a KernelDropout, and
    `drop` the tile's keep-mask) the probabilities returned, those dV takes, are P ∘ Z,
    and dP is (dO Vᵀ) ∘ Z, Z = drop / (1 − rate); dS = P ∘ (dP − D) keeps the undropped P.

    score: None, or (fn, batch, head, q_pos, kv_pos, refs, shapes) of a score function:
    the logits are fn(capped logits), and dS is pulled back through fn with jax's
    derivative of fn (pallas_kernels/score_mod.py). Returns (p, ds, loads): loads are
    the cotangents of fn's floating operand loads [(operand, flat index, cotangent)]."""
    logits, tanh = scaled_logits(dot_nt(q, k, acc), scale, cap, 1.0 if score else LOG2E, bias)
    pull = None
    if score is not None:
        fn, batch, head, q_pos, kv_pos, refs, shapes = score
        if keep is not None:   # fn and its derivative see finite inputs on masked pairs
            logits = jnp.where(keep, logits, 0.0)
        logits, pull = score_vjp(fn, logits, batch, head, q_pos, kv_pos, refs, shapes)
        logits = logits * LOG2E
    p = jnp.exp2(logits - lse2[:, None])
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    dp = dot_nt(do, v, acc)
    p_applied = p
    if drop is not None:
        dp = jnp.where(drop, dp * dropout.inverse_keep, 0.0)
        p_applied = jnp.where(drop, p * dropout.inverse_keep, 0.0)
    ds = p * (dp - delta[:, None])
    loads = []
    if pull is not None:
        if keep is not None:   # masked pairs send no cotangent into fn's operands
            ds = jnp.where(keep, ds, 0.0)
        ds, loads = pull(ds)
    if cap is not None:
        ds = ds * (1.0 - tanh * tanh)   # d(c·tanh(x/c))/dx
    if keep is not None:
        ds = jnp.where(keep, ds, 0.0)
    return p_applied, ds, loads


def _accumulate_operand_grads(sums, loads, wanted):
    """Add the cotangents of a tile's operand loads into per-operand sums ([size] each,
    for the operands in `wanted`). Only scalar loads (per-head or per-batch values) are
    summed here: a tile of indices would scatter into the table element by element."""
    sums = list(sums)
    for position, lin, d in loads:
        if position not in wanted:
            continue
        slot = wanted.index(position)
        if jnp.ndim(lin) != 0:
            raise NotImplementedError(
                f"score_mod operand {position} is read with a tile of indices (a table lookup); the "
                "kernels compute gradients only for operands read at scalar indices (e.g. "
                "slopes[head]). For a learned table pass the looked-up values as bias= (its "
                "gradient is computed), or stop_gradient the table.")
        size = sums[slot].shape[0]
        hit = jax.lax.broadcasted_iota(jnp.int32, (size,), 0) == lin
        sums[slot] = sums[slot] + jnp.where(hit, tile_sum(d).astype(sums[slot].dtype), 0.0)
    return tuple(sums)


def _dkdv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, n_operands,
                 accesses, mask_fn, bias_acc, dropout, layout, per_head_table, groups, scale, cap,
                 kv_len, q_len, bq, bk, acc, score_mod, score_shapes, score_wanted, dbias):
    operand_refs, bias_ref, seed_ref, score_refs, (dk_ref, dv_ref, *grad_refs) = split_refs(
        refs, n_operands, bias_acc, dropout, len(score_shapes))
    dbias_ref = grad_refs[:1] if dbias else []
    dscore_refs = grad_refs[1:] if dbias else grad_refs   # one [size] row per wanted operand
    kv_start = pl.program_id(0) * bk
    batch, kv_head = pl.program_id(1), pl.program_id(2)
    k = k_ref[...]                                        # [bk, Hp], on chip throughout
    v = v_ref[...]
    hp = k.shape[-1]

    def visit(q_block, carry, partial, *, g, h_head):
        dk, dv, colsum, score_sums = carry
        q_start = pl.multiple_of(q_block * bq, bq)
        rows = pl.ds(q_start, bq)
        q = q_ref[rows, g, :]
        do = do_ref[rows, g, :]
        lse2 = lse_ref[g, rows] * LOG2E
        delta = delta_ref[g, rows]
        keep = None
        if partial:
            keep = tile_keep(mask_fn, accesses, operand_refs, q_start, kv_start, kv_len,
                             bq=bq, bk=bk, q_len=q_len, g=g)
        bias = None if bias_acc is None else bias_acc.load(bias_ref, q_start, kv_start, g)
        drop = None if dropout is None else dropout.tile(h_head, q_start, kv_start, bq=bq, bk=bk)
        score = None
        if score_mod is not None:
            score = (score_mod, batch, kv_head * groups + g,
                     *tile_positions(q_start, kv_start, bq=bq, bk=bk), score_refs, score_shapes)
        p, ds, loads = _probabilities_and_dlogits(q, k, v, do, lse2, delta, keep, scale=scale,
                                                  cap=cap, acc=acc, bias=bias, dropout=dropout,
                                                  drop=drop, score=score)
        if partial and layout.zero_isolated:   # query rows that attend no key here may hold NaN
            q = zero_unreachable(q, keep, axis=1)
        dv = dv + dot_tn(p.astype(do.dtype), do, acc)
        dk = dk + dot_tn(ds.astype(q.dtype), q, acc)
        if colsum:   # a [.., 1, S] bias: its gradient is dS summed over the query rows
            colsum = (colsum[0] + jnp.sum(ds, axis=0),)
        score_sums = _accumulate_operand_grads(score_sums, loads, score_wanted)
        return (dk, dv, colsum, score_sums)

    # Operand gradients: this program's share, summed over its G heads and its q-blocks;
    # the caller sums the shares of all programs (no atomics: deterministic).
    score_sums = tuple(jnp.zeros(r.shape, acc) for r in dscore_refs)
    carry = (jnp.zeros((bk, hp), acc), jnp.zeros((bk, hp), acc), (), score_sums)
    for g in range(groups):                                  # query heads sharing this kv head
        carry = (*carry[:2], (jnp.zeros((bk,), acc),) if dbias_ref else (), carry[3])
        # grid (j, b, kh): query head kh·G + g, as the forward numbers it for dropout
        h_head = None if dropout is None else dropout.head_hash(seed_ref, batch, kv_head * groups + g)
        carry = walk_tiles(table_ref, layout, functools.partial(visit, g=g, h_head=h_head), carry,
                           head=g if per_head_table else None)
        if dbias_ref:
            dbias_ref[0][g, :] = carry[2][0].astype(dbias_ref[0].dtype)
    dk, dv, _, score_sums = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    for ref, total in zip(dscore_refs, score_sums):
        ref[...] = total.astype(ref.dtype)


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, n_operands,
               accesses, mask_fn, bias_acc, dropout, dbias_mode, layout, scale, cap, kv_len, q_len,
               bq, bk, acc, score_mod, score_shapes, score_wanted):
    del score_wanted   # operand gradients come from the dK/dV kernel
    operand_refs, bias_ref, seed_ref, score_refs, (dq_ref, *dbias_ref) = split_refs(
        refs, n_operands, bias_acc, dropout, len(score_shapes))
    q_start = reversed_q_block(pl.program_id(0), pl.num_programs(0)) * bq   # heaviest first
    batch, head = pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    if dropout is not None:   # grid (i, b, n): batch row b, query head n
        h_head = dropout.head_hash(seed_ref, pl.program_id(1), pl.program_id(2))

    def visit(kv_block, dq, partial):
        kv_start = pl.multiple_of(kv_block * bk, bk)
        k = k_ref[pl.ds(kv_start, bk), :]
        v = v_ref[pl.ds(kv_start, bk), :]
        keep = None
        if partial:   # keys no query here may attend (padding) may hold NaN: dQ += dS·K
            keep = tile_keep(mask_fn, accesses, operand_refs, q_start, kv_start, kv_len,
                             bq=bq, bk=bk, q_len=q_len)
            if layout.zero_isolated:
                k = zero_unreachable(k, keep, axis=0)
        bias = None if bias_acc is None else bias_acc.load(bias_ref, q_start, kv_start, 0)
        drop = None if dropout is None else dropout.tile(h_head, q_start, kv_start, bq=bq, bk=bk)
        score = None
        if score_mod is not None:
            score = (score_mod, batch, head, *tile_positions(q_start, kv_start, bq=bq, bk=bk),
                     score_refs, score_shapes)
        _, ds, _ = _probabilities_and_dlogits(q, k, v, do, lse2, delta, keep, scale=scale, cap=cap,
                                              acc=acc, bias=bias, dropout=dropout, drop=drop,
                                              score=score)
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
             parts=("dq", "dkdv", "dbias"), dropout_seed=None, score_operands=None, score_grads=()):
    """(dq, dk, dv, dbias): dbias has the bias's own shape (None without a bias).
    `parts` runs only the dQ kernel ("dq") or only the dK/dV kernel ("dkdv"), and asks
    for the bias gradient ("dbias") or not; what was not asked for comes back as None
    (ring attention sends dK/dV on while dQ runs; a constant bias needs no gradient).
    dbias is dS reduced to the bias's shape by the kernel that loops over the reduced
    axis (pallas_kernels.common.dbias_mode). `dropout_seed`: the forward's uint32 [4]
    (pallas_kernels.dropout.seed_array), with static.dropout_rate > 0.

    With a score function (static.score_mod), `score_operands` are its arrays and the
    result has a fifth member: their gradients, for those `score_grads` flags (None for
    the others). The dK/dV kernel writes one share per program, summed here."""
    delta = delta_array(delta, out, dout)   # D = rowsum(dO ∘ O) − dlse: all it needs of O
    del out
    with_score = score_operands is not None
    score_operands = tuple(score_operands or ())
    wanted = tuple(i for i, w in enumerate(score_grads) if w)
    dq = dk = dv = dbias = None
    dscore = [None] * len(score_operands)
    mode = dbias_mode(bias.shape) if bias is not None and "dbias" in parts else None
    if "dkdv" in parts or mode == "cols" or wanted:
        pb = _Problem.of(q, k, v, bias, lse, dout, delta, metas["dkdv"], score_operands)
        dk, dv, dbias_cols, shares = _dkdv(pb, static, metas["dkdv"], operands, dropout_seed,
                                           dbias=mode == "cols", score_wanted=wanted)
        for i, share in zip(wanted, shares):   # [B, nK, K, size]: one share per program
            x = score_operands[i]
            dscore[i] = jnp.sum(share, axis=(0, 1, 2))[:x.size].reshape(x.shape).astype(x.dtype)
        if mode == "cols":
            dbias = dbias_cols[:, :, None, :]                # [B, N, 1, S]
        if "dkdv" not in parts:
            dk = dv = None
    if "dq" in parts or mode in ("tiles", "rows"):
        dq_mode = mode if mode in ("tiles", "rows") else None
        pb = _Problem.of(q, k, v, bias, lse, dout, delta, metas["dq"], score_operands)
        dq, dbias_rows = _dq(pb, static, metas["dq"], operands, dropout_seed, dbias_mode=dq_mode)
        if dq_mode is not None:
            dbias = dbias_rows if mode == "tiles" else dbias_rows[..., None]   # [B, N, T, S|1]
        if "dq" not in parts:
            dq = None
    if dbias is not None:
        dbias = reduce_dbias(dbias, bias)
    if with_score:
        return dq, dk, dv, dbias, tuple(dscore)
    return dq, dk, dv, dbias


@dataclasses.dataclass(frozen=True)
class _Problem:
    """One backward kernel's inputs, padded to its tiles (block_q, block_kv) and to the
    padded head dim hp: q, dO [B, Tp, N, hp]; k, v [B, Sp, K, hp]; lse, D [B, N, Tp] in
    the accumulation dtype; the bias [Bb, Hb, Tp|1, Sp|1] or None; the score operands
    flattened (pallas_kernels.score_mod.flat_operand)."""
    b: int      # B, T, N, H, S, K: the unpadded sizes
    t: int
    n: int
    h: int
    s: int
    kh: int
    bq: int     # the kernel's tile
    bk: int
    tp: int     # T, S and H padded
    sp: int
    hp: int
    acc: object  # accumulation dtype
    q: jax.Array
    k: jax.Array
    v: jax.Array
    do: jax.Array
    lse: jax.Array
    delta: jax.Array
    bias: jax.Array | None
    score: tuple = ()

    @property
    def groups(self) -> int:
        return self.n // self.kh

    @classmethod
    def of(cls, q, k, v, bias, lse, dout, delta, meta, score_operands=()):
        b, t, n, h = q.shape
        s, kh = k.shape[1], k.shape[2]
        bq, bk = meta.block_q, meta.block_kv
        hp = padded_head_dim(h)
        tp, sp = pad_to_multiple(t, bq), pad_to_multiple(s, bk)
        acc = acc_dtype(q.dtype)
        # Padded rows: lse = +inf makes their P exactly 0 (with lse = 0 a bias or score_mod
        # logit above ~88 gave P = inf and inf·0 = NaN in dV, dK and dbias), D = 0 and
        # dO = 0; PARTIAL tiles also rule them out (padded_query_len) under a mask.
        return cls(b, t, n, h, s, kh, bq, bk, tp, sp, hp, acc,
                   pad_btnh(q, tp, hp), pad_btnh(k, sp, hp), pad_btnh(v, sp, hp),
                   pad_btnh(dout.astype(q.dtype), tp, hp), pad_axis(lse.astype(acc), 2, tp, jnp.inf),
                   pad_axis(delta.astype(acc), 2, tp), prepare_bias(bias, tp, sp, acc),
                   tuple(flat_operand(x) for x in score_operands))

    def kernel_params(self, static):
        """Keyword arguments every backward kernel takes."""
        return dict(mask_fn=static.mask_fn, scale=static.scale, cap=static.logits_soft_cap,
                    dropout=kernel_dropout(static), kv_len=self.s,
                    q_len=padded_query_len(static.mask_fn, self.t, self.tp), bq=self.bq, bk=self.bk,
                    acc=self.acc, score_mod=static.score_mod,
                    score_shapes=static.score_operand_shapes)

    def operands(self, static, operands, layout):
        return make_operand_access(
            prepare_operands(operands, static.operand_kinds, self.t, self.s, self.tp, self.sp,
                             self.bq, self.bk),
            layout, bq=self.bq, bk=self.bk, groups=self.groups)


def _call(kernel, pb: _Problem, static, table, accesses, bias_acc, dropout_seed, *, grid, specs,
          out_specs, out_shape, name, reverse_rows=None):
    """pallas_call of one backward kernel. `specs` are the BlockSpecs of
    (table, q, k, v, dO, lse, D); the mask operands, the bias, the dropout seed and the
    score operands follow them (their q-blocks in reverse order when `reverse_rows` = nQ,
    as the dQ grid runs them)."""
    operand_specs = [a.spec(reverse_rows=reverse_rows) for a in accesses]
    bias_specs = [] if bias_acc is None else [bias_acc.spec(reverse_rows=reverse_rows)]
    seed = [dropout_seed] if static.dropout_rate else []
    seed_specs = [KernelDropout.spec()] if seed else []
    score_specs = [score_operand_spec(x) for x in pb.score]
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[*specs, *operand_specs, *bias_specs, *seed_specs, *score_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=static.config.num_warps_bwd,
                                             num_stages=static.config.num_stages_bwd),
        interpret=static.interpret,
        name=name,
    )(table, pb.q, pb.k, pb.v, pb.do, pb.lse, pb.delta, *[a.arr for a in accesses],
      *([pb.bias] if pb.bias is not None else []), *seed, *pb.score)


def _dkdv(pb: _Problem, static, meta, operands, dropout_seed, dbias=False, score_wanted=()):
    """dK, dV (and, with `dbias`, dS summed over the query rows: [B, N, S]; for each score
    operand in `score_wanted`, its gradient's share of each program: [B, nK, K, size]):
    programs over (kv-block j, batch, kv head), walking the transposed lists."""
    bk, tp, hp, groups = pb.bk, pb.tp, pb.hp, pb.groups
    table, layout = transposed_table(meta)
    tbm, thm = table.shape[:2]
    per_head_table = thm > 1
    accesses = pb.operands(static, operands, "cols")
    bias_acc = bias_access(pb.bias, "cols", bq=pb.bq, bk=bk, groups=groups)
    bsel = (lambda bb: bb) if tbm > 1 else (lambda bb: 0)
    specs = [
        pl.BlockSpec((None, groups if per_head_table else None, None, table.shape[-1]),
                     lambda j, bb, hh: (bsel(bb), hh if per_head_table else 0, j, 0)),
        pl.BlockSpec((None, tp, groups, hp), lambda j, bb, hh: (bb, 0, hh, 0)),    # q (group)
        pl.BlockSpec((None, bk, None, hp), lambda j, bb, hh: (bb, j, hh, 0)),      # k
        pl.BlockSpec((None, bk, None, hp), lambda j, bb, hh: (bb, j, hh, 0)),      # v
        pl.BlockSpec((None, tp, groups, hp), lambda j, bb, hh: (bb, 0, hh, 0)),    # dO (group)
        pl.BlockSpec((None, groups, tp), lambda j, bb, hh: (bb, hh, 0)),           # lse
        pl.BlockSpec((None, groups, tp), lambda j, bb, hh: (bb, hh, 0)),           # D
    ]
    kv_out_spec = pl.BlockSpec((None, bk, None, hp), lambda j, bb, hh: (bb, j, hh, 0))
    out_specs = [kv_out_spec, kv_out_spec]
    out_shape = [jax.ShapeDtypeStruct(pb.k.shape, pb.k.dtype), jax.ShapeDtypeStruct(pb.v.shape, pb.v.dtype)]
    if dbias:   # per query head: the G heads of group hh are rows hh·G … hh·G + G − 1
        out_specs.append(pl.BlockSpec((None, groups, bk), lambda j, bb, hh: (bb, hh, j)))
        out_shape.append(jax.ShapeDtypeStruct((pb.b, pb.n, pb.sp), pb.acc))
    nk = pb.sp // bk
    for i in score_wanted:
        size = pb.score[i].shape[0]
        out_specs.append(pl.BlockSpec((None, None, None, size), lambda j, bb, hh: (bb, j, hh, 0)))
        out_shape.append(jax.ShapeDtypeStruct((pb.b, nk, pb.kh, size), pb.acc))
    kernel = functools.partial(_dkdv_kernel, n_operands=len(accesses), accesses=accesses,
                               bias_acc=bias_acc, layout=layout, per_head_table=per_head_table,
                               groups=groups, score_wanted=score_wanted, dbias=dbias,
                               **pb.kernel_params(static))
    dk, dv, *extra = _call(kernel, pb, static, table, accesses, bias_acc, dropout_seed,
                           grid=(pb.sp // bk, pb.b, pb.kh), specs=specs, out_specs=out_specs,
                           out_shape=out_shape, name="jaxattn_flash_dkdv")
    s, h = pb.s, pb.h
    dbias_cols, shares = (extra[:1], extra[1:]) if dbias else ([], extra)
    return dk[:, :s, :, :h], dv[:, :s, :, :h], (dbias_cols[0][:, :, :s] if dbias else None), shares


def _dq(pb: _Problem, static, meta, operands, dropout_seed, dbias_mode=None):
    """dQ: programs over (q-block, batch, query head), walking the forward lists.
    dbias_mode "tiles" also writes dS per (b, n) ([B, N, T, S]); "rows" its sums over
    the key columns ([B, N, T])."""
    bq, hp, sp, groups = pb.bq, pb.hp, pb.sp, pb.groups
    table, layout = forward_table(meta)
    fbm, fhm = table.shape[:2]
    accesses = pb.operands(static, operands, "rows")
    bias_acc = bias_access(pb.bias, "rows", bq=bq, bk=pb.bk, groups=groups)
    nq = pb.tp // bq
    row = lambda i: reversed_q_block(i, nq)  # noqa: E731  (q-block of program i)
    q_tile = pl.BlockSpec((None, bq, None, hp), lambda i, bb, nn: (bb, row(i), nn, 0))
    row_stat = pl.BlockSpec((None, None, bq), lambda i, bb, nn: (bb, nn, row(i)))
    kv_all = pl.BlockSpec((None, sp, None, hp), lambda i, bb, nn: (bb, 0, nn // groups, 0))
    specs = [
        pl.BlockSpec((None, None, None, table.shape[-1]),
                     lambda i, bb, nn: (bb if fbm > 1 else 0, nn if fhm > 1 else 0, row(i), 0)),
        q_tile, kv_all, kv_all, q_tile, row_stat, row_stat,      # q, k, v, dO, lse, D
    ]
    out_specs = [q_tile]
    out_shape = [jax.ShapeDtypeStruct(pb.q.shape, pb.q.dtype)]
    if dbias_mode == "tiles":   # dS of every (b, n), reduced to the bias's shape by the caller
        out_specs.append(pl.BlockSpec((None, None, bq, sp), lambda i, bb, nn: (bb, nn, row(i), 0)))
        out_shape.append(jax.ShapeDtypeStruct((pb.b, pb.n, pb.tp, sp), pb.acc))
    elif dbias_mode == "rows":
        out_specs.append(row_stat)
        out_shape.append(jax.ShapeDtypeStruct((pb.b, pb.n, pb.tp), pb.acc))
    kernel = functools.partial(_dq_kernel, n_operands=len(accesses), accesses=accesses,
                               bias_acc=bias_acc, dbias_mode=dbias_mode, layout=layout,
                               score_wanted=(), **pb.kernel_params(static))
    dq, *dbias = _call(kernel, pb, static, table, accesses, bias_acc, dropout_seed,
                       grid=(nq, pb.b, pb.n),
                       specs=specs, out_specs=out_specs, out_shape=out_shape, name="jaxattn_flash_dq",
                       reverse_rows=nq)
    t, s, h = pb.t, pb.s, pb.h
    if dbias_mode == "tiles":
        return dq[:, :t, :, :h], dbias[0][:, :, :t, :s]
    return dq[:, :t, :, :h], (dbias[0][:, :, :t] if dbias_mode == "rows" else None)
