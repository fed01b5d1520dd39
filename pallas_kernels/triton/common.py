"""Pieces shared by the Triton forward and backward kernels: the head-dim padding
rule, the packed tile tables and their walk, the online-softmax step, and how mask
operands and the bias are read tile by tile. What every backend shares lives in
pallas_kernels/common.py.

Inputs reach the kernels padded (pallas_kernels/README.md, "Padding"): T and S up to
whole tiles, the head dim up to a power of two >= 16 (Triton tiles must be powers of
two).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import MASK_VALUE, reversed_q_block
from pallas_kernels.dropout import head_hash, keep_pairs
from pallas_kernels.metadata import BlockMetadata

def padded_head_dim(h: int) -> int:
    """Triton tiles are powers of two, and tensor-core dots want at least 16 columns."""
    return max(16, pl.next_power_of_2(h))


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """Static description of a packed table row (see pack_table)."""
    la: int                      # slots of the FULL list
    full_is_run: bool            # every FULL list is one run (full, causal, windows)
    dense_count: int | None      # every list is 0..dense_count-1 and nothing is PARTIAL
    zero_isolated: bool = True   # PARTIAL tiles may hold rows of the walked operand (K/V for
                                 # the forward table, Q for the transposed one) that no
                                 # row of the other side attends: zero them (zero_unreachable)


def pack_table(count_a, index_a, count_b, index_b, *, full_is_run=False, dense_count=None,
               zero_isolated=True):
    """One int32 row per block: [n_a, n_b, a_0 .. a_{La-1}, b_0 .. b_{Lb-1}, 0 ...],
    padded to a power-of-two length. Returns (table [Bm, Hm, n, L], TableLayout)."""
    la = index_a.shape[-1]
    row = jnp.concatenate([jnp.asarray(count_a)[..., None], jnp.asarray(count_b)[..., None],
                           jnp.asarray(index_a), jnp.asarray(index_b)], axis=-1)
    length = pl.next_power_of_2(row.shape[-1])
    if length != row.shape[-1]:
        row = jnp.pad(row, [(0, 0)] * (row.ndim - 1) + [(0, length - row.shape[-1])])
    return row.astype(jnp.int32), TableLayout(la, full_is_run, dense_count, zero_isolated)


def forward_table(meta: BlockMetadata):
    """Per q-block: its FULL kv-blocks, then its PARTIAL kv-blocks."""
    return pack_table(meta.full_count, meta.full_index, meta.partial_count, meta.partial_index,
                      full_is_run=meta.full_is_run,
                      dense_count=meta.num_kv_blocks if meta.dense else None,
                      zero_isolated=meta.partial_isolates_keys)


def transposed_table(meta: BlockMetadata):
    """Per kv-block: its FULL q-blocks, then its PARTIAL q-blocks."""
    return pack_table(meta.t_full_count, meta.t_full_index, meta.t_partial_count,
                      meta.t_partial_index, full_is_run=meta.t_full_is_run,
                      dense_count=meta.num_q_blocks if meta.dense else None,
                      zero_isolated=meta.partial_isolates_queries)


def walk_tiles(table_ref, layout: TableLayout, visit, carry, head=None):
    """Visit this block's FULL tiles, then its PARTIAL ones: visit(block, carry, partial).

    FULL lists that are one run (full, causal, windows) get computed indices k0 + t, and
    dense attention a static trip count, so Triton can software-pipeline the K/V loads;
    other lists load each index from the table. (Walking such lists run by run in a
    nested loop measured slower on an H100: BigBird 152/195 vs 222-242/237-255 TFLOP/s,
    benchmarks/results/flash_bench_2026-11-27_h100_runs_experiment.json.)"""
    la = layout.la
    if layout.dense_count is not None:
        return jax.lax.fori_loop(0, layout.dense_count, lambda t, c: visit(t, c, False), carry)
    # `head`: row of a per-head table, read in the same indexer as the entry (a chained
    # ref view, table_ref.at[head][i], does not lower on a GPU).
    table = _Rows(table_ref, head)
    if layout.full_is_run:
        first = table[2]
        carry = jax.lax.fori_loop(0, table[0], lambda t, c: visit(first + t, c, False), carry)
    else:
        carry = jax.lax.fori_loop(0, table[0], lambda t, c: visit(table[2 + t], c, False), carry)
    first_partial = 2 + la
    return jax.lax.fori_loop(0, table[1], lambda t, c: visit(table[first_partial + t], c, True), carry)


class _Rows:
    """table[i] of a [L] table ref, or of row `head` of a [H, L] one, as one indexer."""

    def __init__(self, ref, head):
        self.ref, self.head = ref, head

    def __getitem__(self, i):
        return self.ref[i] if self.head is None else self.ref[self.head, i]


def online_softmax_step(qk2, m_prev, l_prev, acc_prev, load_v, keep=None, zero_isolated=True,
                        dropout_keep=None):
    """One kv-tile of FlashAttention-2 Algorithm 1 (lines 8-10), in base 2.

    qk2: logits × log2(e) [bq, bk]; keep: bool mask of allowed pairs (PARTIAL tiles) or
    None (FULL tiles: no mask work at all). Masked logits and probabilities are
    selected away (never multiplied), so a row that has seen no allowed key keeps l = 0
    and acc = 0, and a masked key holding NaN or Inf cannot reach them: its logits are
    replaced, and its V row is zeroed when no query of the tile may attend it (P·V
    would otherwise make 0 · NaN = NaN) unless zero_isolated=False says the block
    metadata proved no such key exists (that reduction over the tile and select cost
    ~40 % of a PARTIAL-heavy forward on an H200). V is loaded only once the softmax statistics
    are done (load_v()), which keeps register pressure lower while the V tile is in
    flight (measured faster on H100 than loading K and V together). `dropout_keep`
    (attention dropout): pairs it drops count in m and l but not in P·V; the caller
    divides the output by (1 − rate).
    """
    if keep is not None:
        qk2 = jnp.where(keep, qk2, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(qk2, axis=-1))
    correction = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(qk2 - m_next[:, None])
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    l_next = correction * l_prev + jnp.sum(p, axis=-1)
    if dropout_keep is not None:
        p = jnp.where(dropout_keep, p, 0.0)
    acc_corrected = correction[:, None] * acc_prev
    v = load_v()
    if keep is not None and zero_isolated:
        v = zero_unreachable(v, keep, axis=0)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=acc_prev.dtype)
    return m_next, l_next, acc_corrected + pv


def zero_unreachable(x, keep, *, axis):
    """Rows of a K/V tile (axis=0: keys no query of the tile may attend) or of a Q tile
    (axis=1: queries that may attend no key of the tile) replaced by zeros, so padding
    or unwritten slots holding NaN/Inf cannot meet a zero probability in a dot
    (0 · NaN = NaN). keep: [bq, bk] allowed pairs of a PARTIAL tile."""
    reachable = jnp.max(keep.astype(jnp.int32), axis=axis) > 0
    return jnp.where(reachable[:, None], x, jnp.zeros_like(x))


def dot_nt(a, b, acc):
    """a @ b.T without materialising the transpose."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=acc)


def dot_tn(a, b, acc):
    """a.T @ b."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=acc)


def dot_nn(a, b, acc):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=acc)


def scaled_logits(qk, scale: float, cap: float | None, unit: float = 1.0, bias=None):
    """Raw q·k → unit × logits: scale, add the bias tile, then soft cap c·tanh(x/c);
    `unit` = log2(e) folds the base change of exp2 into the same multiply. Also returns
    tanh for the backward's chain rule (None without a cap)."""
    if cap is None:
        if bias is None:
            return qk * (scale * unit), None
        return (qk * scale + bias.astype(qk.dtype)) * unit, None
    x = qk * scale if bias is None else qk * scale + bias.astype(qk.dtype)
    t = jnp.tanh(x * (1.0 / cap))
    return (cap * unit) * t, t


# ---------------------------------------------------------------------------------
# Mask operands inside the kernels. Two grid layouts exist:
#   "rows": a program owns one q-block (forward, dQ): grid (nQ, B, N), ids (i, b, n);
#   "cols": a program owns one kv-block of one kv head (dK/dV): grid (nK, B, K),
#           ids (j, b, kh), looping over the G = N / K query heads of its group.
# For each operand kind, spec() gives its BlockSpec and load() the tile (see the
# OPERAND_KINDS table in pallas_kernels/metadata.py).
# ---------------------------------------------------------------------------------
class DenseAccess:
    """A dense [Bb, Hb, Tb, Sb] operand read tile by tile: the additive bias, and "qkv"
    mask operands. Tb in {1, Tp} and Sb in {1, Sp}; a tile is [bq|1, bk|1] and broadcasts
    against the logits. One indexer per load (Triton lowering takes no chained ref views:
    `ref.at[g][rows, :]` fails on a GPU with "No support for multiple indexers")."""

    def __init__(self, arr, layout, *, bq, bk, groups):
        self.arr, self.layout, self.bq, self.bk, self.groups = arr, layout, bq, bk, groups
        self.per_batch, self.per_head = arr.shape[0] > 1, arr.shape[1] > 1
        self.full_rows, self.full_cols = arr.shape[2] > 1, arr.shape[3] > 1

    def spec(self, reverse_rows: int | None = None):
        bsel = (lambda b: b) if self.per_batch else (lambda b: 0)
        hsel = (lambda h: h) if self.per_head else (lambda h: 0)
        tb, sb = self.arr.shape[2:]
        if self.layout == "rows":   # grid (i, b, n): rows of q-block i, every column
            row = (lambda i: reversed_q_block(i, reverse_rows)) if reverse_rows else (lambda i: i)
            return pl.BlockSpec((None, None, self.bq if self.full_rows else 1, sb),
                                lambda i, b, n: (bsel(b), hsel(n), row(i) if self.full_rows else 0, 0))
        # "cols", grid (j, b, kh): every row of kv-block j, for the G heads of group kh
        return pl.BlockSpec((None, self.groups if self.per_head else None, tb, self.bk if self.full_cols else 1),
                            lambda j, b, kh: (bsel(b), hsel(kh), 0, j if self.full_cols else 0))

    def load(self, ref, q_start, kv_start, g):
        if self.layout == "rows":
            return ref[:, pl.ds(kv_start, self.bk) if self.full_cols else slice(None)]
        rows = pl.ds(q_start, self.bq) if self.full_rows else slice(None)
        return ref[g, rows, :] if self.per_head else ref[rows, :]


class OperandAccess:
    def __init__(self, kind, layout_block, arr, layout, *, bq, bk, groups):
        self.kind, self.layout_block, self.arr = kind, layout_block, arr
        self.layout, self.bq, self.bk, self.groups = layout, bq, bk, groups
        self.per_batch = arr.shape[0] > 1
        self.per_head = kind in ("qkv", "block") and arr.shape[1] > 1
        self._dense = DenseAccess(arr, layout, bq=bq, bk=bk, groups=groups) if kind == "qkv" else None

    def spec(self, reverse_rows: int | None = None):
        """BlockSpec; with reverse_rows=nQ, "rows" program i owns q-block
        reversed_q_block(i, nQ)."""
        bsel = (lambda b: b) if self.per_batch else (lambda b: 0)
        rows = self.layout == "rows"
        if rows and reverse_rows:
            spec = self.spec()
            return pl.BlockSpec(spec.block_shape,
                                lambda i, b, n: spec.index_map(reversed_q_block(i, reverse_rows), b, n))
        kind, a = self.kind, self.arr
        if kind == "q":
            if rows:
                return pl.BlockSpec((None, self.bq), lambda i, b, n: (bsel(b), i))
            return pl.BlockSpec((None, a.shape[1]), lambda j, b, kh: (bsel(b), 0))
        if kind == "kv":
            if rows:
                return pl.BlockSpec((None, a.shape[1]), lambda i, b, n: (bsel(b), 0))
            return pl.BlockSpec((None, self.bk), lambda j, b, kh: (bsel(b), j))
        if kind == "qkv":
            return self._dense.spec()
        hsel = (lambda h: h) if self.per_head else (lambda h: 0)
        # "block": the whole (small) layout.
        if rows:
            return pl.BlockSpec((None, None, *a.shape[2:]), lambda i, b, n: (bsel(b), hsel(n), 0, 0))
        head_block = self.groups if self.per_head else None
        return pl.BlockSpec((None, head_block, *a.shape[2:]), lambda j, b, kh: (bsel(b), hsel(kh), 0, 0))

    def load(self, ref, q_start, kv_start, g):
        """Tile for absolute q rows [q_start, q_start+bq) and kv columns
        [kv_start, kv_start+bk); g = query head within the group (cols layout)."""
        rows = self.layout == "rows"
        kind = self.kind
        if kind == "q":
            return (ref[...] if rows else ref[pl.ds(q_start, self.bq)])[:, None]
        if kind == "kv":
            return (ref[pl.ds(kv_start, self.bk)] if rows else ref[...])[None, :]
        if kind == "qkv":
            return self._dense.load(ref, q_start, kv_start, g)
        lbq, lbk = self.layout_block
        at = (q_start // lbq, kv_start // lbk)
        return ref[(g, *at) if not rows and self.per_head else at]   # one indexer


def make_operand_access(prepared, layout, *, bq, bk, groups):
    return [OperandAccess(kind, lb, arr, layout, bq=bq, bk=bk, groups=groups)
            for kind, lb, arr in prepared]


def bias_access(bias, layout, *, bq, bk, groups):
    """DenseAccess for a prepared bias, or None."""
    return None if bias is None else DenseAccess(bias, layout, bq=bq, bk=bk, groups=groups)


def split_refs(refs, n_operands: int, bias_acc, dropout=None, n_score: int = 0):
    """A kernel's trailing refs, in their order: (mask operand refs, bias ref or None,
    dropout seed ref or None, score operand refs (n_score of them), output refs)."""
    has_bias, has_seed = bias_acc is not None, dropout is not None
    rest = refs[n_operands + has_bias:]
    rest, seed_ref = rest[has_seed:], rest[0] if has_seed else None
    return (refs[:n_operands], refs[n_operands] if has_bias else None, seed_ref,
            rest[:n_score], rest[n_score:])


def score_operand_spec(flat):
    """A flattened score operand (pallas_kernels.score_mod.flat_operand): whole, in
    every program of any grid."""
    return pl.BlockSpec(flat.shape, lambda *ids: (0,))


def tile_positions(q_start, kv_start, *, bq, bk):
    """Absolute positions of a tile's rows [bq, 1] and columns [1, bk], int32."""
    return (q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0),
            kv_start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1))


@dataclasses.dataclass(frozen=True)
class KernelDropout:
    """Attention dropout inside a kernel: the keep-mask of each visited tile regenerated
    from the seed operand (the last input, uint32 [4] = (seed, batch offset, head offset,
    0): pallas_kernels.dropout.seed_array), the batch row, the query head and the tile's
    absolute positions (pallas_kernels/dropout.py), so the forward and both backward
    kernels drop the same pairs without storing them."""
    rate: float
    broadcast: bool

    @property
    def inverse_keep(self) -> float:
        """1 / (1 − rate): the factor of every kept probability."""
        return 1.0 / (1.0 - self.rate)

    @staticmethod
    def spec():
        return pl.BlockSpec((4,), lambda *_: (0,))

    def head_hash(self, seed_ref, batch, head):
        """The hash chain after (seed, batch, head), once per program or head; batch and
        head (int32 program ids) count from the operand's offsets."""
        return head_hash(seed_ref[0], seed_ref[1] + batch.astype(jnp.uint32),
                         seed_ref[2] + head.astype(jnp.uint32), broadcast=self.broadcast)

    def tile(self, h_head, q_start, kv_start, *, bq, bk):
        """bool [bq, bk]: the pairs of the tile at (q_start, kv_start) that are kept."""
        q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kv_pos = kv_start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        return keep_pairs(h_head, q_pos, kv_pos, self.rate)


def kernel_dropout(static) -> KernelDropout | None:
    """The call's dropout (FlashStatic.dropout_rate > 0), or None."""
    return KernelDropout(static.dropout_rate, static.broadcast_dropout) if static.dropout_rate else None


def tile_keep(mask_fn, accesses, refs, q_start, kv_start, kv_len, *, bq, bk, g=0, q_len=None):
    """Allowed pairs of one PARTIAL tile: the mask at absolute positions AND kv < kv_len
    (AND q < q_len when the query rows are padded: a padding row attends nothing, so a key
    only padding rows would reach counts as unattended and is zeroed like one)."""
    q_pos, kv_pos = tile_positions(q_start, kv_start, bq=bq, bk=bk)
    keep = kv_pos < kv_len
    if q_len is not None:
        keep = keep & (q_pos < q_len)
    if mask_fn is not None:
        values = tuple(a.load(r, q_start, kv_start, g) for a, r in zip(accesses, refs))
        keep = keep & mask_fn(q_pos, kv_pos, values)
    return jnp.broadcast_to(keep, (bq, bk))
