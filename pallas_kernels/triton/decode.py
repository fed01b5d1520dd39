"""Flash-decoding kernel (Pallas, Triton lowering; Pallas interpret mode on CPU).

The Triton backend's ``decode`` entry (pallas_kernels/backend.py; the contract is
written in pallas_kernels/decode_static.py):

    decode(static: DecodeStatic, q, k_cache, v_cache, lengths, page_table=None, operands=(),
           score_operands=())
        -> (out [B, Tq, N, H] in q's dtype, lse [B, N, Tq] natural log, float32 or float64 for float64 inputs)

    q           [B, Tq, N, H]: the Tq newest tokens, at positions lengths[b] - Tq + t
    k/v_cache   [B, S_max, K, H] (page_table None) or [num_pages, page_size, K, H]
    lengths     int32 [B]: keys valid in row b (traced)
    page_table  None or int32 [B, max_pages]: the pages of row b, in order
    operands    the mask's operand values at the query rows, one array each, shaped
                [B|1, N|1, Tq|1, capacity|1] (int or bool): element [b, n, t, j] is what
                mask_fn reads for query t of head n and key position j. The kernel loads
                one [rows|1, block_kv|1] tile of each per visited tile (segment ids of the
                keys, a dense or block-sparse mask's rows) and passes them to mask_fn.
    score_operands  the arrays static.score_mod reads (flattened, read whole by every
                program, as in the forward kernel: pallas_kernels/score_mod.py)
    static      pallas_kernels.decode_static.DecodeStatic (scale, soft cap, mask_fn,
                score_mod, KeyBounds, num_splits, config or None, interpret)

Raises NotImplementedError for valid requests it cannot serve (a page size that is not a
power of two, more than MAX_ROWS query rows per KV head); the caller falls back.

Algorithm (flash-decoding). One program per (batch row b, KV head h, split s):

1. GQA packed into the matrix rows: the G = N / K query heads that share KV head h,
   times the Tq new tokens, are one [Tq·G, H] query tile (row r = t·G + g), so every K/V
   tile is loaded once for the whole group — no K/V copies per query head. The query
   reaches the kernel as [B, K, Tq·G, H] (for Tq = 1 a free reshape of [B, 1, N, H]); the
   program loads its rows into an [rp, hp] tile (powers of two, rp >= 16 for the tensor
   cores) with a masked load that zero-fills the padding on chip, so no padded copy of
   the query is made in memory. Padding rows are excluded from every masked tile's
   selects, as padding, and never stored. K/V tiles are loaded the same way: [bk, hp]
   with the columns >= H zero-filled on chip, so a head dim that is not a power of two
   (40, 80, 96) reads the cache in place — padding the cache to hp in memory would copy
   it whole at every decoding step.
2. Trip counts from lengths: the keys row b can see are [lo, hi] with lo from the mask's
   KeyBounds (a sliding window) and hi = min(lengths[b] - 1, ...). Only the tiles of
   block_kv keys covering [lo, hi] are visited; tiles past lengths[b] or left of a window
   are never loaded. This range is split evenly over the `num_splits` programs of the row
   (the split count comes from the shapes so that B·K·splits programs fill the GPU).
3. Each program runs the online softmax of FlashAttention-2 over its tiles. Tiles that
   every row may see entirely (interior of causal/local masks) take the fast path with
   no mask work; the others (first and last tiles, any other mask) evaluate causality,
   lengths and the mask with selects, and zero the V rows of keys no row may see, so
   NaN or Inf in unwritten or masked slots never reaches a result (0 · NaN would).
   A score function (static.score_mod) changes every visited tile's scaled, soft-capped
   logits before that select, at absolute positions, with each packed row's own query
   head (row r = t·G + g of KV head h is query head h·G + g at position
   lengths[b] - Tq + t): a masked pair stays masked whatever fn returns.
4. Paged caches: the tile's page numbers are read from the page table inside the kernel
   and the K/V rows gathered from those pages directly (several pages per tile when the
   page is smaller than the tile) — no contiguous copy. Page-table entries of pages past
   the needed range are never followed.
5. Outputs are stored in their final packed layout, [B, K, Tq·G, H] and lse
   [B, K, Tq·G], by masked stores of the tile's real rows and columns. With one split
   the program writes the normalised output in q's dtype: one kernel per step. With
   several, each writes its float32 partial output, normalised by its own sum, and lse,
   and one merge kernel (pallas_kernels/triton/decode_merge.py) combines them exactly,
   reading the splits of each (b, h) up to 128 at a time with an online log-sum-exp
   (blocks of rows and columns in separate programs when B·K is small):
   lse = log Σ_s exp(lse_s), out = Σ_s exp(lse_s - lse) · out_s. Two kernels per step.
   Back to [B, Tq, N, H] and [B, N, Tq] is a free reshape for Tq = 1 (a transpose of the
   token and head axes for Tq > 1).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import LN2, LOG2E, MASK_VALUE, acc_dtype, pad_axis
from pallas_kernels.decode_static import DecodeStatic
from pallas_kernels.score_mod import apply_score_mod, flat_operand
from pallas_kernels.triton.common import (dot_nt, online_softmax_step, padded_head_dim, scaled_logits,
                                          score_operand_spec)
from pallas_kernels.triton.decode_merge import merge_splits, real_entries

# Query rows (Tq · N / K) one program holds; longer chunks belong to prefill kernels.
MAX_ROWS = 128
MIN_ROWS = 16          # tensor-core dots need >= 16 rows


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """block_kv: keys per tile (a power of two >= 16); warps and pipeline stages of Triton.

    The field defaults (64-key tiles, 4 warps, 3 stages) are a starting point; what a
    call runs without a config is `default_decode_config`, chosen per query rows and
    cache layout from sweeps on an H200 (its docstring; benchmarks/decode_bench.py
    --tune / --configs time the alternatives)."""

    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        if not _is_pow2(self.block_kv) or self.block_kv < 16:
            raise ValueError(f"DecodeConfig.block_kv={self.block_kv} must be a power of two >= 16.")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"DecodeConfig.num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16.")
        if self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages={self.num_stages} must be >= 1.")


def default_decode_config(rows: int, *, interpret: bool, page_size: int | None = None,
                          head_dim: int = 128, itemsize: int = 2) -> DecodeConfig:
    """Small tiles in interpret mode (cheap emulated grid, multi-tile logic exercised on
    small test caches); 8 warps once the packed query tile is large (MQA, Tq > 1).

    A paged cache whose pages are smaller than 128 slots, read by a 32-row query tile
    (MQA: 32 heads on one KV head; 17 to 32 rows pad to it), gathers 128-key tiles: 8
    pages of 16 slots or 2 of 64 per tile. Triton does not stage a gathered tile through
    shared memory ahead of use, so a tile's loads wait on its own table read; twice the
    keys per tile is twice the bytes in flight per wait, and the 32 rows' dot products
    are amortised over more keys.
    Five interleaved rounds on an H200, MQA Tq 1, GB/s with 64-key vs 128-key tiles
    (contiguous cache in the same process): page 16 — 8 × 128k 2545 vs 3088 (3296),
    64 × 32k 2688 vs 3442 (3537), 64 × 128k 2972 vs 3770 (3865), 1 × 128k 1186 vs 1376,
    8 × 32k 1815 vs 1966, 1 × 4k and 8 × 4k level; page 64 — 64 × 32k 3138 vs 3465
    (3572), 8 × 128k 3024 vs 3230 (3283), 1 × 32k and 8 × 32k level. With 16 padded query
    rows (K = 8, Tq 1) 128-key tiles were slower (8 × 128k page 16: 3833 vs 3325), so
    those keep 64. A 128-row query tile (8 warps; 65 to 128 rows pad to it: MQA with three
    or four new tokens) over 16-slot pages gathers 128-key tiles too: two interleaved
    rounds on an H200, GB/s issued back to back, 64-key / 128-key tiles (3 stages;
    contiguous cache in the same process):
    1 × 128k 1316 / 1440 (1848), 8 × 32k 1261 / 1572 (2500), 8 × 128k 1747 / 2205 (3166),
    64 × 32k 1842 / 2302 (3080); with 2 stages 1326 / 1646 / 2297 / 2445 (more from B = 8,
    less at B = 1), 4 warps and 32-key tiles no better overall. 1 × 32k, not in that
    sweep, lost (639 against 709–725 in other processes: ~2 wide tiles per split at
    B·K = 1). 128 rows over other page sizes, and other row counts, are not measured and
    keep 64-key tiles. Rows wider than 256 bytes (head dims above 128 in 16 bits, above 64
    in float32) keep 64-key tiles: their stages would not fit in shared memory as bf16
    D128's do.

    A contiguous cache read by a 32-row query tile keeps 4 K/V stages in flight instead
    of 3 (64-key tiles of rows up to 256 bytes: 128 KB of shared memory). Three
    interleaved rounds on an H200, MQA Tq 1, GB/s with 3 / 4 / 5 stages: 1 × 4k 78 / 100
    / 95, 1 × 32k 587 / 640 / 634, 1 × 128k 1547 / 1642 / 1491, 8 × 4k 608 / 712 / 581,
    8 × 32k 2061 / 2413 / 2137, 8 × 128k 3200 / 3379 / 3290, 64 × 4k 2276 / 2451 / 2278,
    64 × 32k 3525 / 3699 / 3349, 64 × 128k 3815 / 3980 / 3639. GQA's 16 padded rows
    (K = 8) did not gain (8 × 32k 3748 / 3805, 8 × 128k 3938 / 4081, 64 × 32k 4200 / 4054,
    rounds overlapping) and keep 3; gathered (paged) tiles are not pipelined by Triton and
    keep 3."""
    if interpret:
        return DecodeConfig(block_kv=16, num_warps=4, num_stages=1)
    num_warps = 4 if rows <= 64 else 8
    narrow_rows = head_dim * itemsize <= 256
    gathered_wide = narrow_rows and page_size is not None and (
        (rows == 32 and page_size < 128) or (rows == 128 and page_size == 16))
    deep = page_size is None and rows == 32 and narrow_rows
    return DecodeConfig(block_kv=128 if gathered_wide else 64, num_warps=num_warps,
                        num_stages=4 if deep else 3)


def num_cores(interpret: bool) -> int:
    """Streaming multiprocessors to fill (a small pretend count in interpret mode)."""
    if interpret:
        return 4
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # noqa: BLE001 - no device information
        return 132


def default_num_splits(batch: int, kv_heads: int, kv_tiles: int, *, cores: int,
                       min_tiles_per_split: int = 4, long_cache_tiles: int = 128,
                       paged: bool = False, pages_per_tile: int = 1, block_kv: int = 64,
                       one_program_per_core: bool = False) -> int:
    """Splits per (row, KV head), from a sweep on an H200 (BENCHMARKS.md, decode):

    * one wave: B·K·splits <= `cores` programs. Small batches need the cache split to
      fill the GPU, and a second wave only adds per-split prologues and a larger merge
      (1 × 32k: 16 splits 2020 GB/s, 33 splits 1738; 1 × 128k: 16 splits 3087, and 17,
      four programs past one wave, 2749);
    * a long cache keeps at least 4 splits even when B·K fills the GPU alone: more
      programs in flight hide more latency (64 × 32k: 4 splits 4056 GB/s, 1 split 3587;
      8 × 128k: 4 splits 3965, 33 splits 3880);
    * a paged cache keeps two waves: its tiles wait on a page-table read before their
      loads, and more programs in flight cover that (64-slot pages at B = 1: 33 splits
      3099 GB/s at 128k and 2017 at 32k in one run, 16 splits 2154–2171 and 1394–1427 in
      two later ones);
    * pages smaller than a tile (one tile gathers rows of several pages) keep four
      waves: Triton does not pipeline a gathered load through shared memory as it does a
      block of rows (ncu at 8 × 32k: 39 KB of shared memory per program against 72 KB,
      DRAM at 83 % of peak against 91 %), so each program has fewer bytes in flight and
      more programs make up for it. 16-slot pages, K = 8: at B = 1, 66 splits 2273 / 3387
      GB/s (32k / 128k) against 2201 / 3107 with 33; at 8 × 32k, 8 splits 3661 against
      3422 with 4 (contiguous, 4 splits: 3744); at 8 × 4k, 4 / 8 / 33 splits level (2309 /
      2317 / 2251). Their splits may hold 2 tiles instead of `min_tiles_per_split`: a
      gathered tile's table read and loads are not overlapped with the next tile's, so a
      short split is a few dependent round trips, and more of them in parallel is what
      helps (1 × 4k, 64 tiles, 5 interleaved rounds: 16 / 32 / 64 splits 718 / 795 / 730
      GB/s, contiguous 820);
    * gathered tiles of 128 keys or more keep two waves, not four: each holds twice the
      bytes in flight (measured on default_decode_config's 128-key MQA tiles only; K = 8
      with a 128-key config, and wider tiles, are not measured). Five interleaved rounds
      on an H200, MQA Tq 1, GB/s at 4 waves (the rule before) / 2 waves, contiguous in
      the same rounds: 16-slot pages 8 × 32k 2043 / 2260 (2411), 8 × 128k 3180 / 3314
      (3311), 64 × 4k 2032 / 2243 (2318); 64-slot pages 8 × 32k 2117 / 2471 (2551),
      8 × 128k 3314 / 3459 (3445), 64 × 4k 2175 / 2374 (2441); at B·K = 1 both rules
      give the same count (the cap below, or the cache's tiles / 2);
    * except where a program fills its core alone (`one_program_per_core`: the 128-row
      query tiles of MQA with 3 or 4 new tokens, 8 warps, whose registers and shared
      memory leave room for one program per SM; set by decode() only where measured, over
      pages smaller than their gathered tiles of 128 keys): there a paged cache keeps one
      wave, and no long-cache minimum. The second wave then runs after the first instead of beside
      it, and writes twice the partials. Two interleaved rounds on an H200, MQA Tq 4 over
      16-slot pages, 128-key tiles, GB/s back to back at 2 / 4 / 8 / 16 / 33 splits:
      8 × 32k 355 / 700 / 1265 / 1980 / 1605, 8 × 128k 368 / 747 / 1458 / 2644 / 2220,
      64 × 32k 2742 / 2310 / 2280 / 2153 / 1889 (contiguous 2516, 3032, 3028); at 1 × 32k
      the cap below gives the same count either way;
    * a paged row never gets more splits than there are cores (one wave of programs for
      that row alone, the contiguous optimum at B·K = 1: MQA 1 × 32k ran 581 GB/s with
      132 splits, 550 with 66); paged caches at B·K < 8 are not measured;
    * each split keeps at least `min_tiles_per_split` tiles of keys
      (GATHERED_MIN_TILES_PER_SPLIT where tiles gather several pages, above)."""
    waves = 1
    alone = paged and one_program_per_core
    if paged and not alone:
        waves = 4 if pages_per_tile > 1 and block_kv < WIDE_GATHERED_TILE else 2
    want = max(1, waves * cores // (batch * kv_heads))
    if paged:
        want = min(want, cores)
    if kv_tiles >= long_cache_tiles and not alone:
        want = max(want, 4)
    if paged and pages_per_tile > 1:
        min_tiles_per_split = min(min_tiles_per_split, GATHERED_MIN_TILES_PER_SPLIT)
    return max(1, min(want, kv_tiles // min_tiles_per_split))


# Tiles per split at least, for caches whose tiles gather rows of several pages.
GATHERED_MIN_TILES_PER_SPLIT = 2
# Query tiles of this many rows (8 warps) run one program per SM (default_num_splits).
WIDE_QUERY_TILE = 128
# Gathered tiles at least this many keys wide keep two waves of splits (default_num_splits).
WIDE_GATHERED_TILE = 128


def _div(x, d: int):
    """x // d for non-negative int32 x (a truncating divide lowers everywhere)."""
    return jax.lax.div(x, jnp.int32(d))


def _table_ahead(paged: bool, pages_per_tile: int, block_kv: int, *, programs: int,
                 cores: int) -> bool:
    """Whether the decode kernel reads each tile's page-table entries one tile ahead.
    Measured on an H200 (benchmarks/results/decode_*_ahead_ab_*: the two kernels in
    alternating processes, two each, three interleaved rounds per process), GB/s with
    (without) reading ahead:

    * a tile inside one page (one entry): always. K = 8 over 64-slot pages: 1 × 32k
      2571, 2630 (2536, 2441), 1 × 128k 3576, 3569 (3274, 3170), 8 × 32k 3693, 3728 (3411,
      3256), 8 × 128k 3935, 4051 (3579, 3574);
    * a tile gathered from several pages (a vector of entries carried through the loop):
      only 128-key tiles and wider (MQA's) when the grid is one wave of programs (at most
      one per core: nothing else on the SM hides the table read). MQA at 1 × 128k over
      16-slot pages 1571, 1345 (1386, 1229), over 64-slot pages 1684, 1242 (1466, 1266);
      at 1 × 32k 615, 618 (606, 594) and 647, 522 (606, 508). With two waves or more
      (B = 8, 64) it was up to 12 % slower (8 × 32k over 64-slot pages 1980, 1933
      against 2258, 2038), and with K = 8's 64-key gathered tiles (4 waves) 2–7 % slower
      (16-slot pages, 1 × 32k to 8 × 128k)."""
    if not paged:
        return False
    if pages_per_tile == 1:
        return True
    return block_kv >= WIDE_GATHERED_TILE and programs <= cores


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, *refs, paged, tq, groups, rows,
                   head_dim, capacity, slots, bk, page_size, pages_per_tile, num_pages, clamp_last, scale,
                   cap, mask_fn, operand_cols, score_mod, score_shapes, bounds, num_splits, acc,
                   table_ahead):
    table_ref, refs = (refs[0], refs[1:]) if paged else (None, refs)
    n_mask, n_score = len(operand_cols), len(score_shapes)
    operand_refs, score_refs = refs[:n_mask], refs[n_mask:n_mask + n_score]
    o_ref, lse_ref = refs[n_mask + n_score:]
    rp, hp = q_ref.shape
    b, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = lengths_ref[b]
    p_first, p_last = length - tq, length - 1     # positions of the first and last new token
    limit = jnp.minimum(length, capacity)          # keys [0, limit) exist and were written

    # Keys any row may see: [lo, hi]; their tiles [first, end) are this row's whole work.
    lo = jnp.maximum(bounds.lower(p_first), 0)
    hi = jnp.minimum(bounds.upper(p_last), limit - 1)
    first = _div(lo, bk)
    end = jnp.where(hi >= lo, _div(jnp.maximum(hi, 0), bk) + 1, first)
    # This program's share: an even slice of [first, end).
    chunk = _div(end - first + (num_splits - 1), num_splits)
    a = first + split * chunk
    z = jnp.minimum(end, a + chunk)
    # Clean tiles [cf, ce): every key seen by every row (no mask work). Only exact bounds
    # (causal/local masks) know them; otherwise every tile is evaluated.
    if bounds.exact:
        cf = _div(jnp.maximum(bounds.lower(p_last), 0) + (bk - 1), bk)
        clean_hi = jnp.minimum(bounds.upper(p_first), limit - 1)
        ce = jnp.maximum(_div(jnp.maximum(clean_hi + 1, 0), bk), cf)
    else:
        cf = ce = jnp.int32(0)

    # The packed query's real [rows, H] entries, zero-padded to the [rp, hp] tile on chip.
    entries, row_ok_1d = real_entries(rp, hp, rows, head_dim)
    q = plgpu.load(q_ref, mask=entries, other=0)                    # [rp, hp]
    r = jax.lax.broadcasted_iota(jnp.int32, (rp, 1), 0)
    q_pos = p_first + _div(r, groups)                               # row r = t·G + g
    row_ok = r < rows                                               # padding rows
    if score_mod is not None:   # each row's query head: h·G + g
        q_head = kv_head * groups + jax.lax.rem(r, jnp.int32(groups))

    def read_entries(t):
        """Tile t's page-table entries: the page holding it (one-page tiles), or the
        pages of its first and of each of its rows (gathered tiles)."""
        slot = _div(t * bk, page_size)
        if pages_per_tile == 1:
            return table_ref[slot]
        return table_ref[slot], table_ref[slot + _div(jax.lax.iota(jnp.int32, bk), page_size)]

    # With `table_ahead` (_table_ahead) the loops below carry the next tile's entries,
    # read one tile ahead, so a tile's K/V loads do not wait on its own table read;
    # otherwise a tile reads them where it uses them.
    def table_entry(t):
        """Tile t's entries read ahead, or () where nothing is read ahead."""
        return read_entries(t) if table_ahead else ()

    def tile(t, entry):
        """(tile t's rows in the K/V refs: a pl.ds block or a [bk] array of slots to
        gather, absolute position of its first key); `entry`: table_entry(t)."""
        kv_start = t * bk
        if not paged:
            start = jnp.minimum(kv_start, slots - bk) if clamp_last else kv_start
            return pl.ds(start, bk), start
        # The pool is one column of slots (page p holds slots p·page_size ...).
        entries = entry if table_ahead else read_entries(t)
        if pages_per_tile == 1:   # the tile lies inside one page: a plain block of rows
            row = (jnp.clip(entries, 0, num_pages - 1) * page_size
                   + jax.lax.rem(kv_start, jnp.int32(page_size)))
            return pl.ds(row, bk), kv_start
        # Several pages per tile: one gather of bk rows, each row's page read from the
        # table. Pages holding no key <= hi are replaced by the tile's first page (always
        # needed), so their table entries are never followed.
        r = jax.lax.iota(jnp.int32, bk)
        page_of_row = _div(r, page_size)
        first_page, pages = entries
        first_page = jnp.clip(first_page, 0, num_pages - 1)
        pages = jnp.where(kv_start + page_of_row * page_size <= hi,
                          jnp.clip(pages, 0, num_pages - 1), first_page)
        return pages * page_size + jax.lax.rem(r, jnp.int32(page_size)), kv_start

    # K/V tiles are [bk, hp] on chip while the cache holds H columns. For H < hp the
    # columns >= H are masked out of the load and read as 0: they add 0 to q·k and to
    # P·V (whose padding columns are never stored), and no padded copy of the cache is
    # made in memory. A gathered tile names its columns by an index array too (in
    # interpret mode a masked load takes only blocks or only index arrays, not a mix);
    # on the GPU both forms are the same pointer arithmetic.
    column = jax.lax.broadcasted_iota(jnp.int32, (1, hp), 1)
    real_columns = jnp.broadcast_to(column < head_dim, (bk, hp))

    def load(ref, rows):
        if hp == head_dim:
            return ref[rows, :]
        view = ref.at[rows, :] if isinstance(rows, pl.Slice) else ref.at[rows[:, None], column]
        return plgpu.load(view, mask=real_columns, other=0)

    def visit(t, carry, masked):
        m_i, l_i, o_acc, entry = carry
        rows, start = tile(t, entry)
        entry = table_entry(jnp.minimum(t + 1, last_tile))          # the next tile's, ahead
        k = load(k_ref, rows)                                       # [bk, hp]
        kv_pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        if score_mod is None:
            logits2, _ = scaled_logits(dot_nt(q, k, acc), scale, cap, LOG2E)
        else:   # S = fn(S) on the tile, before the mask; then the base change
            logits, _ = scaled_logits(dot_nt(q, k, acc), scale, cap, 1.0)
            logits = apply_score_mod(score_mod, logits, b, q_head, q_pos, kv_pos, score_refs,
                                     score_shapes)
            logits2 = logits * LOG2E
        if not masked:   # every pair allowed: FlashAttention-2's plain step
            return (*online_softmax_step(logits2, m_i, l_i, o_acc, lambda: load(v_ref, rows)), entry)
        kv_start = t * bk
        keep = row_ok & (kv_pos >= kv_start) & (kv_pos < limit) & (kv_pos <= q_pos)
        if mask_fn is not None:
            # One tile per operand, [rows|1, bk|1], at the tile's key positions; operands
            # are as long as the cache's positions, so a tile reaching past them reads 0
            # there (those keys are past `limit`, never kept) instead of a padded copy.
            values = tuple(
                plgpu.load(ref.at[:, pl.ds(start, bk)], other=0,
                           mask=jnp.broadcast_to(kv_pos < ref.shape[1], (ref.shape[0], bk)))
                if cols else ref[...]
                for ref, cols in zip(operand_refs, operand_cols))
            keep = keep & mask_fn(q_pos, kv_pos, values)
        keep = jnp.broadcast_to(keep, (rp, bk))
        # The step zeroes the V rows of keys no row may see (unwritten slots, keys left of
        # a window, the overlap of a clamped last tile): 0 · NaN would still be NaN.
        return (*online_softmax_step(logits2, m_i, l_i, o_acc, lambda: load(v_ref, rows), keep), entry)

    # The row's last tile: reads ahead stop there (its entry is read again, not followed).
    # A row with nothing to read (end == first, possibly past the cache when a mask's
    # offset or a length beyond the cache puts `lo` there) still reads one entry: keep
    # it inside the table.
    last_tile = jnp.clip(end - 1, 0, -(-capacity // bk) - 1)
    carry = (jnp.full((rp,), MASK_VALUE, acc), jnp.zeros((rp,), acc),
             jnp.zeros((rp, hp), acc), table_entry(jnp.minimum(a, last_tile)))
    masked = functools.partial(visit, masked=True)
    carry = jax.lax.fori_loop(a, jnp.minimum(z, cf), masked, carry)              # window edge
    carry = jax.lax.fori_loop(jnp.maximum(a, cf), jnp.minimum(z, ce),
                              functools.partial(visit, masked=False), carry)     # interior
    carry = jax.lax.fori_loop(jnp.maximum(a, ce), z, masked, carry)              # newest keys
    m_i, l_i, o_acc, _ = carry

    # Epilogue: O = acc / l; a row that saw no allowed key returns 0 with lse = -inf.
    # Only the real rows and columns are stored (the arrays hold nothing else).
    nonempty = l_i > 0
    l_safe = jnp.where(nonempty, l_i, 1.0)
    plgpu.store(o_ref, (o_acc / l_safe[:, None]).astype(o_ref.dtype), mask=entries)
    lse = jnp.where(nonempty, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
    plgpu.store(lse_ref, lse.astype(lse_ref.dtype), mask=row_ok_1d)


def _prepare_operand(a, *, kv_heads, groups, tq, rp):
    """[B|1, N|1, Tq|1, S|1] -> [B|1, K|1, rp|1, S|1] int32 with rows (t, g) like the
    packed query tile (row r = t·G + g of KV head h is query head h·G + g). Not padded
    along S: the kernel's loads mask the key positions past it."""
    a = jnp.asarray(a)
    a = a.astype(jnp.int32) if a.dtype != jnp.int32 else a
    bx, hx, tx, sx = a.shape
    if hx > 1 or tx > 1:
        a = jnp.broadcast_to(a, (bx, hx, tq, a.shape[3]))
        if hx > 1:
            a = a.reshape(bx, kv_heads, groups, tq, -1).transpose(0, 1, 3, 2, 4)
        else:
            a = jnp.broadcast_to(a[:, :, :, None], (bx, 1, tq, groups, a.shape[3]))
        a = pad_axis(a.reshape(bx, a.shape[1], tq * groups, -1), 2, rp)
    return a


def decode(static: DecodeStatic, q, k_cache, v_cache, lengths, page_table=None, operands=(),
           score_operands=()):
    """See the module docstring. Inputs are validated by the caller (jaxattn.decode)."""
    b, tq, n, h = q.shape
    kh = k_cache.shape[2]
    groups = n // kh
    rows = tq * groups
    if rows > MAX_ROWS:
        raise NotImplementedError(
            f"decode kernel holds at most {MAX_ROWS} query rows per KV head, got Tq·N/K = "
            f"{tq}·{groups} = {rows}; run long chunks (prefill) through dot_product_attention")
    paged = page_table is not None
    rp = max(MIN_ROWS, pl.next_power_of_2(rows))
    hp = padded_head_dim(h)
    acc = acc_dtype(q.dtype)
    cfg = static.config or default_decode_config(
        rp, interpret=static.interpret, page_size=k_cache.shape[1] if paged else None, head_dim=hp,
        itemsize=k_cache.dtype.itemsize)
    bk = cfg.block_kv
    page_size = pages_per_tile = num_pages = 1
    clamp_last = False
    if paged:
        num_pages, page_size = k_cache.shape[:2]
        if not _is_pow2(page_size):
            raise NotImplementedError(f"decode kernel needs a power-of-two page size, got {page_size}")
        pages_per_tile = max(1, bk // page_size)
        # Whole tiles of page-table entries (the extra entries point at page 0, masked).
        table = pad_axis(page_table.astype(jnp.int32), 1,
                         -(-page_table.shape[1] // pages_per_tile) * pages_per_tile)
        capacity = page_table.shape[1] * page_size
    else:
        capacity = k_cache.shape[1]
        if capacity < MIN_ROWS:   # a tiny cache: padding it costs nothing
            k_cache, v_cache = (pad_axis(x, 1, MIN_ROWS) for x in (k_cache, v_cache))
        slots = k_cache.shape[1]
        bk = min(bk, 1 << (slots.bit_length() - 1))
        clamp_last = slots % bk != 0   # the last tile is read from slots - bk

    # A 128-row query tile (8 warps) leaves room for one program per SM; measured only
    # over pages smaller than its gathered tiles of 128 keys or more (default_num_splits).
    wide_gathered_rows = (rp == WIDE_QUERY_TILE and pages_per_tile > 1
                          and bk >= WIDE_GATHERED_TILE)
    span = static.bounds.span(tq)
    kv_tiles = -(-min(capacity, span if span is not None else capacity) // bk)
    splits = static.num_splits or default_num_splits(
        b, kh, kv_tiles, cores=num_cores(static.interpret), paged=paged, pages_per_tile=pages_per_tile,
        block_kv=bk, one_program_per_core=wide_gathered_rows)
    splits = max(1, min(splits, -(-capacity // bk)))

    # [B, Tq, K·G, H] -> [B, K, Tq·G, H]: the G heads of KV head h and the Tq tokens as
    # rows. For Tq = 1 the transpose moves a unit dim only: a free reshape, no copy. The
    # kernel pads the [rows, H] tile to [rp, hp] on chip (masked load), not XLA.
    qp = q.reshape(b, tq, kh, groups, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)

    # The cache reaches the kernel as it is, H columns wide; its blocks are hp wide and
    # the kernel masks the columns >= H out of every K/V load (no padded copy).
    slots = k_cache.shape[1]
    if paged:
        # The pages as one column of num_pages · page_size slots (a free reshape): a tile
        # spanning several pages is then one gather of rows, read straight into the
        # [bk, H] layout the dot wants, with no reshape of gathered [pages, page_size, H]
        # blocks in between.
        k_cache, v_cache = (x.reshape(num_pages * page_size, *x.shape[2:]) for x in (k_cache, v_cache))
        cache_spec = pl.BlockSpec((num_pages * page_size, None, hp), lambda i, j, s: (0, j, 0))
        extra_specs = [pl.BlockSpec((None, table.shape[1]), lambda i, j, s: (i, 0))]
        extra = [table]
    else:
        cache_spec = pl.BlockSpec((None, k_cache.shape[1], None, hp), lambda i, j, s: (i, 0, j, 0))
        extra_specs, extra = [], []
    prepared = [_prepare_operand(a, kv_heads=kh, groups=groups, tq=tq, rp=rp) for a in operands]
    for a in prepared:
        per_b, per_h = a.shape[0] > 1, a.shape[1] > 1
        extra_specs.append(pl.BlockSpec(
            (None, None, *a.shape[2:]),
            lambda i, j, s, per_b=per_b, per_h=per_h: (i if per_b else 0, j if per_h else 0, 0, 0)))
        extra.append(a)
    score_flat = [flat_operand(x) for x in score_operands]
    extra_specs += [score_operand_spec(x) for x in score_flat]
    extra += score_flat
    in_specs = [pl.BlockSpec((b,), lambda i, j, s: (0,)),
                pl.BlockSpec((None, None, rp, hp), lambda i, j, s: (i, j, 0, 0)),
                cache_spec, cache_spec, *extra_specs]
    # Outputs hold only the real [rows, H] entries of each tile (masked stores): with one
    # split the final packed output in q's dtype, with several each split's float32
    # partial, merged by one more kernel.
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((b, kh, rows, h), q.dtype),
                     jax.ShapeDtypeStruct((b, kh, rows), acc)]
        out_specs = [pl.BlockSpec((None, None, rp, hp), lambda i, j, s: (i, j, 0, 0)),
                     pl.BlockSpec((None, None, rp), lambda i, j, s: (i, j, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((b, kh, splits, rows, h), acc),
                     jax.ShapeDtypeStruct((b, kh, splits, rows), acc)]
        out_specs = [pl.BlockSpec((None, None, None, rp, hp), lambda i, j, s: (i, j, s, 0, 0)),
                     pl.BlockSpec((None, None, None, rp), lambda i, j, s: (i, j, s, 0))]
    kernel = functools.partial(
        _decode_kernel, paged=paged, tq=tq, groups=groups, rows=rows, head_dim=h, capacity=capacity,
        slots=slots,
        bk=bk, page_size=page_size, pages_per_tile=pages_per_tile, num_pages=num_pages,
        clamp_last=clamp_last, scale=static.scale, cap=static.logits_soft_cap,
        mask_fn=static.mask_fn, operand_cols=tuple(a.shape[3] > 1 for a in prepared),
        score_mod=static.score_mod, score_shapes=static.score_operand_shapes,
        bounds=static.bounds, num_splits=splits, acc=acc,
        table_ahead=_table_ahead(paged, pages_per_tile, bk, programs=b * kh * splits,
                                 cores=num_cores(static.interpret)))
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=static.interpret,
        name="jaxattn_flash_decode",
    )(lengths.astype(jnp.int32), qp, k_cache, v_cache, *extra)
    if splits > 1:
        out, lse = merge_splits(out, lse, hp=hp, out_dtype=q.dtype, interpret=static.interpret)
    # [B, K, Tq·G, H] -> [B, Tq, N, H]; lse [B, K, Tq·G] -> [B, N, Tq]. Free reshapes for
    # Tq = 1 (the transposes move unit dims); a transpose for Tq > 1.
    out = out.reshape(b, kh, tq, groups, h).transpose(0, 2, 1, 3, 4).reshape(b, tq, n, h)
    lse = lse.reshape(b, kh, tq, groups).transpose(0, 1, 3, 2).reshape(b, n, tq)
    return out, lse.astype(jnp.promote_types(acc, jnp.float32))


__all__ = ["decode", "DecodeConfig", "default_decode_config", "default_num_splits", "MAX_ROWS"]
