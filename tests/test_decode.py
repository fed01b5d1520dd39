"""decode_attention: the reference against full causal attention, the Pallas-Triton
decode kernel (interpret mode) against the reference, paged against contiguous caches,
errors, and lowering of the kernel for an H100.

Unwritten cache slots (at or past lengths[b]) and unused pages are filled with NaN in
every kernel case, so agreement with the reference proves none of them leaks.
Kernel compilations in interpret mode dominate the time: each case below is one.
"""

import sys

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import masks as M
from jaxattn.decode import kernel_decode, key_bounds
from pallas_kernels.triton.decode import DecodeConfig, default_decode_config, default_num_splits
from helpers import lower_for_h100


def _caches(b, s, k, h, lengths, *, seed=0, dtype=np.float32):
    """Contiguous caches [B, S, K, H] (numpy) holding NaN at every slot >= lengths[b]."""
    rng = np.random.default_rng(seed)
    kc, vc = (rng.standard_normal((b, s, k, h)).astype(dtype) for _ in range(2))
    unwritten = np.arange(s)[None, :] >= np.asarray(lengths)[:, None]
    kc[unwritten], vc[unwritten] = np.nan, np.nan
    return kc, vc


def _query(b, tq, n, h, seed=1, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((b, tq, n, h)).astype(dtype)


def _to_paged(kc, vc, lengths, page_size, *, extra_pages=3, seed=2):
    """Scatter contiguous caches into shuffled pages. Pages a row does not use, and the
    spare pages, hold NaN; their page-table entries are garbage (out of range)."""
    b, s, k, h = kc.shape
    max_pages = -(-s // page_size)
    num_pages = b * max_pages + extra_pages
    order = np.random.default_rng(seed).permutation(num_pages)[: b * max_pages].reshape(b, max_pages)
    pages_k = np.full((num_pages, page_size, k, h), np.nan, kc.dtype)
    pages_v = pages_k.copy()
    table = order.copy()
    for row in range(b):
        for slot in range(max_pages):
            if slot * page_size < lengths[row]:
                sl = slice(slot * page_size, (slot + 1) * page_size)
                n_slots = len(range(s)[sl])
                pages_k[order[row, slot], :n_slots] = kc[row, sl]
                pages_v[order[row, slot], :n_slots] = vc[row, sl]
            else:
                table[row, slot] = [-7, 10**6][slot % 2]   # never followed
    return pages_k, pages_v, table.astype(np.int32)


def _decode(impl, q, kc, vc, lengths, **kw):
    return jaxattn.decode_attention(q, kc, vc, lengths=np.asarray(lengths, np.int32),
                                    implementation=impl, return_residuals=True, **kw)


def _assert_close(got, want, atol=2e-5):
    (go, gl), (wo, wl) = got, want
    assert not np.isnan(np.asarray(go)).any()
    np.testing.assert_allclose(go, wo, atol=atol, rtol=1e-5)
    np.testing.assert_array_equal(np.isneginf(gl), np.isneginf(wl))
    finite = np.isfinite(np.asarray(wl))
    np.testing.assert_allclose(np.asarray(gl)[finite], np.asarray(wl)[finite], atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------------
# The reference is the definition: the last Tq rows of causal attention over the prefix.
# ------------------------------------------------------------------------------------
def _as_full_attention(q, lengths, s):
    """Queries placed at their absolute positions of a length-s sequence: causal attention
    over the whole cache then gives, at those rows, exactly what decoding must return
    (causality keeps every key >= lengths[b] out)."""
    b, tq = q.shape[:2]
    qf = np.zeros((b, s, *q.shape[2:]), q.dtype)
    for row, length in enumerate(lengths):
        qf[row, length - tq:length] = q[row]
    return qf


def _rows_at(x, lengths, tq, axis):
    return np.stack([np.take(np.asarray(x)[row], np.arange(length - tq, length), axis=axis - 1)
                     for row, length in enumerate(lengths)])


@pytest.mark.parametrize("tq,mask", [
    (1, None), (4, M.LocalMask(5, 0) & (M.StridedMask(3) | M.GlobalMask(2) | M.PrefixLMMask(6))),
    (2, "arrays")])
def test_reference_is_last_rows_of_causal_attention(tq, mask):
    b, s, n, k, h = 3, 32, 4, 2, 8
    lengths = [32, 11, tq]
    kc, vc = _caches(b, s, k, h, lengths)
    q = _query(b, tq, n, h)
    if mask == "arrays":   # masks holding arrays, indexed at absolute positions
        mask = _array_mask(b, n, s)
    out, lse = _decode("reference", q, kc, vc, lengths, mask=mask, logits_soft_cap=7.0)
    fo, fl = jaxattn.dot_product_attention(
        _as_full_attention(q, lengths, s), np.nan_to_num(kc), np.nan_to_num(vc), mask=mask,
        is_causal=True, logits_soft_cap=7.0, implementation="reference", return_residuals=True)
    np.testing.assert_allclose(out, _rows_at(fo, lengths, tq, axis=1), atol=1e-6)
    np.testing.assert_allclose(lse, _rows_at(fl, lengths, tq, axis=2), atol=1e-5)


def _array_mask(b, n, s, seed=0):
    """Segment ids (q and kv operands), a per-head dense mask and a block layout, all
    indexed at absolute positions 0..s-1."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.integers(0, 3, (b, s)), axis=1).astype(np.int32)
    dense = rng.random((1, n, s, s)) < 0.7
    layout = rng.random((-(-s // 8), -(-s // 8))) < 0.5
    return (M.SegmentMask(jnp.asarray(ids)) & M.DenseMask(dense)) | M.BlockSparseMask(layout, 8, 8)


# ------------------------------------------------------------------------------------
# The kernel against the reference (one interpret-mode compilation per case).
# ------------------------------------------------------------------------------------
# (B, S, N, K, H, Tq), lengths, mask, soft cap, num_splits. H = 40 and 96 are not powers
# of two: the kernel tiles them as 64 and 128 columns and loads K/V with a column mask
# (interpret mode fills the columns past H with NaN, so a leak would show).
KERNEL_CASES = {
    "gqa_tq1_ragged_auto_splits": ((4, 77, 4, 2, 32, 1), [77, 0, 37, 1], None, None, None),
    "gqa_tq4_window_softcap_3_splits_h40": ((4, 64, 4, 2, 40, 4), [64, 2, 20, 4], M.LocalMask(9, 0), 5.0, 3),
    "mqa_tq4_ragged_softcap_h96": ((3, 50, 4, 1, 96, 4), [50, 0, 23], None, 3.0, None),
    "gqa_tq2_masks_with_arrays": ((3, 40, 4, 2, 16, 2), [40, 17, 1], "arrays", None, 2),
}


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_reference_contiguous(name):
    (b, s, n, k, h, tq), lengths, mask, cap, splits = KERNEL_CASES[name]
    mask = _array_mask(b, n, s) if mask == "arrays" else mask
    kc, vc = _caches(b, s, k, h, lengths)
    q = _query(b, tq, n, h)
    want = _decode("reference", q, kc, vc, lengths, mask=mask, logits_soft_cap=cap)
    got = _decode("pallas_triton", q, kc, vc, lengths, mask=mask, logits_soft_cap=cap, num_splits=splits)
    _assert_close(got, want)
    for row, length in enumerate(lengths):
        if length == 0:   # nothing to attend to: zeros, lse -inf
            assert np.all(np.asarray(got[0][row]) == 0) and np.all(np.isneginf(got[1][row]))


# (B, S, N, K, H, Tq), lengths, page size, mask, num_splits
PAGED_CASES = {
    "mqa_page8_two_pages_per_tile_strided_or_global_h96": (
        (3, 60, 4, 1, 96, 1), [60, 9, 0], 8, M.StridedMask(3) | M.GlobalMask(4), 2),
    "gqa_page32_tq4_window_h40": ((2, 96, 4, 2, 40, 4), [96, 40], 32, M.LocalMask(20, 0), None),
    # operands as long as the cache (44), tiles reaching past it: their loads are masked
    "gqa_page4_tq2_masks_with_arrays": ((3, 44, 4, 2, 16, 2), [44, 17, 1], 4, "arrays", 2),
}


@pytest.mark.parametrize("name", list(PAGED_CASES))
def test_kernel_paged_matches_contiguous(name):
    (b, s, n, k, h, tq), lengths, page_size, mask, splits = PAGED_CASES[name]
    mask = _array_mask(b, n, s) if mask == "arrays" else mask
    kc, vc = _caches(b, s, k, h, lengths)
    q = _query(b, tq, n, h)
    pk, pv, table = _to_paged(kc, vc, lengths, page_size)
    want = _decode("reference", q, kc, vc, lengths, mask=mask)
    _assert_close(_decode("reference", q, pk, pv, lengths, page_table=table, mask=mask), want, atol=1e-6)
    got = _decode("pallas_triton", q, pk, pv, lengths, page_table=table, mask=mask, num_splits=splits)
    _assert_close(got, want)


WIDE_GATHERED_CASES = {   # (B, K, lengths, mask, reads ahead[, new tokens per row])
    "one wave: entries read ahead": (1, 1, [500], M.FullMask(), True),
    # pages past the length hold NaN and garbage entries; the window starts past tile 0
    "one wave, window, unused pages": (1, 1, [300], M.LocalMask(150, 0), True),
    # no key to read: zeros, lse -inf (the kernel's one table read stays inside the table,
    # which interpret mode, clamping indices, cannot show)
    "one wave, offset past the cache: nothing to read": (1, 1, [512], M.LocalMask(0, None, 1000), True),
    "two waves: read where used": (2, 2, [500, 130], M.FullMask(), False),
    # four new tokens per row (MQA's 128 rows on a GPU), causal among themselves
    "four new tokens, two waves": (2, 2, [500, 130], M.FullMask(), False, 4),
}


@pytest.mark.parametrize("name", list(WIDE_GATHERED_CASES))
def test_wide_gathered_tiles_match_the_reference(monkeypatch, name):
    """128-key tiles gathered from 16-slot pages (MQA's default on a GPU, one or four new
    tokens), in interpret
    mode with that config: with the grid one wave of programs (interpret mode counts 4
    cores) the kernel reads each tile's entries one tile ahead, otherwise where they are
    used; both equal the reference with NaN in unwritten slots and unused pages, and
    garbage entries for those pages (never followed)."""
    batch, kv_heads, lengths, mask, ahead, *tq = WIDE_GATHERED_CASES[name]
    triton_decode = sys.modules["pallas_kernels.triton.decode"]   # the package exports a `decode` function
    chosen = []
    real = triton_decode._table_ahead
    monkeypatch.setattr(triton_decode, "_table_ahead",
                        lambda *a, **kw: chosen.append(real(*a, **kw)) or chosen[-1])
    s, n, h = 512, 4, 16
    kc, vc = _caches(batch, s, kv_heads, h, lengths)
    q = _query(batch, tq[0] if tq else 1, n, h)
    pk, pv, table = _to_paged(kc, vc, lengths, 16)
    want = _decode("reference", q, kc, vc, lengths, mask=mask)
    got = kernel_decode("pallas_triton", jnp.asarray(q), jnp.asarray(pk), jnp.asarray(pv),
                        jnp.asarray(lengths, jnp.int32), jnp.asarray(table), mask,
                        scale=h ** -0.5, logits_soft_cap=None, num_splits=2,
                        return_residuals=True, config=DecodeConfig(128, 4, 1), interpret=True)
    assert chosen == [ahead]
    _assert_close(got, want)


def test_table_reads_ahead_where_measured_faster():
    from pallas_kernels.triton.decode import _table_ahead
    assert not _table_ahead(False, 1, 64, programs=8, cores=132)            # contiguous
    assert _table_ahead(True, 1, 64, programs=1024, cores=132)              # one page a tile
    assert _table_ahead(True, 8, 128, programs=132, cores=132)              # MQA, B = 1
    assert not _table_ahead(True, 8, 128, programs=264, cores=132)          # MQA, B = 8
    assert not _table_ahead(True, 4, 64, programs=66, cores=132)            # K = 8's 64-key tiles


def _ops_outside_kernels(jaxpr):
    """The equations of a jaxpr and of its sub-jaxprs, except the bodies of pallas_calls
    (kernel code, which works on on-chip tiles)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name != "pallas_call":
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from _ops_outside_kernels(sub)


@pytest.mark.parametrize("layout", ["contiguous", "paged16", "paged4"])
def test_head_dim_96_reads_the_cache_in_place(layout):
    """H = 96 is tiled as 128 columns on chip, but the K/V tiles are loaded with a column
    mask from the cache as it is: no op outside the kernels makes an array as large as
    the cache (a padded copy would cost a full pass over the cache per generated token),
    and the kernel's K/V operands are the cache's own [.., 96] arrays. Only reshapes (free)
    are allowed: the paged pool is viewed as one column of slots."""
    b, s, n, k, h = 2, 64, 4, 2, 96
    if layout == "contiguous":
        cache, table = (b, s, k, h), None
    else:
        page = int(layout.removeprefix("paged"))
        cache = (b * s // page + 3, page, k, h)
        table = jax.ShapeDtypeStruct((b, s // page), np.int32)

    def fn(q, kc, vc, lengths, table):
        return jaxattn.decode_attention(q, kc, vc, lengths=lengths, page_table=table,
                                        implementation="pallas_triton", num_splits=2)
    jaxpr = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((b, 1, n, h), jnp.float32),
                               jax.ShapeDtypeStruct(cache, jnp.float32),
                               jax.ShapeDtypeStruct(cache, jnp.float32),
                               jax.ShapeDtypeStruct((b,), np.int32), table)
    ops = list(_ops_outside_kernels(jaxpr.jaxpr))
    cache_size = int(np.prod(cache))
    copies = [f"{e.primitive.name} -> {[v.aval.str_short() for v in e.outvars]}" for e in ops
              if e.primitive.name not in ("pallas_call", "reshape")
              and any(getattr(v.aval, "size", 0) >= cache_size for v in e.outvars)]
    assert not copies, copies
    (kernel,) = [e for e in ops if e.primitive.name == "pallas_call"
                 and str(e.params["name"]) == "jaxattn_flash_decode"]
    cache_operands = [v.aval.shape for v in kernel.invars if v.aval.size >= cache_size]
    assert len(cache_operands) == 2 and all(shape[-1] == h for shape in cache_operands), cache_operands


@pytest.mark.parametrize("layout", ["contiguous", "paged4"])
def test_mask_operands_reach_the_kernel_unpadded(layout):
    """Segment ids are as long as the cache (50 or 52 positions, not a whole number of
    tiles): the kernel masks the key positions past them in its loads, so no op outside
    the kernels pads them to whole tiles on every generated token."""
    b, n, k, h = 2, 4, 2, 16
    s = 50 if layout == "contiguous" else 52            # 13 pages of 4
    ids = jnp.asarray(np.repeat(np.arange(2), [20, s - 20])[None].repeat(b, 0), jnp.int32)
    mask = M.SegmentMask(ids)
    cache, table = ((b, s, k, h), None) if layout == "contiguous" else \
        ((b * 13 + 1, 4, k, h), jax.ShapeDtypeStruct((b, 13), np.int32))

    def fn(q, kc, vc, lengths, table):
        return jaxattn.decode_attention(q, kc, vc, lengths=lengths, page_table=table, mask=mask,
                                        implementation="pallas_triton", num_splits=2)
    jaxpr = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((b, 1, n, h), jnp.float32),
                               jax.ShapeDtypeStruct(cache, jnp.float32),
                               jax.ShapeDtypeStruct(cache, jnp.float32),
                               jax.ShapeDtypeStruct((b,), np.int32), table)
    pads = [e for e in _ops_outside_kernels(jaxpr.jaxpr) if e.primitive.name == "pad"
            and e.invars[0].aval.dtype == jnp.int32 and e.invars[0].aval.shape[-1] == s]
    assert not pads, [str(e) for e in pads]


def test_key_bounds_of_masks():
    assert key_bounds(M.FullMask()) == key_bounds(M.CausalMask())
    b = key_bounds(M.LocalMask(99, 0))
    assert (b.lower(1000), b.upper(1000), b.exact, b.span(1)) == (901, 1000, True, 100)
    b = key_bounds(M.LocalMask(10, 3, offset=-2) & M.CausalMask(-1))
    assert (b.lower(50), b.upper(50), b.exact) == (38, 49, True)
    assert not key_bounds(M.LocalMask(10, 0) & M.StridedMask(2)).exact
    assert key_bounds(M.LocalMask(10, 0) | M.GlobalMask(2)) == key_bounds(M.StridedMask(2))


def test_split_count_fills_the_gpu():
    assert default_num_splits(1, 8, 2048, cores=132) == 16       # one sequence: one wave of splits
    assert default_num_splits(8, 8, 64, cores=132) == 2          # short cache: just fill the GPU
    assert default_num_splits(64, 8, 64, cores=132) == 1         # B·K programs fill it already
    assert default_num_splits(64, 8, 512, cores=132) == 4        # long cache: 4 splits in flight
    assert default_num_splits(1, 1, 8, cores=132) == 2           # >= 4 tiles per split
    assert default_num_splits(1, 8, 2048, cores=132, paged=True) == 33   # paged: two waves
    # pages smaller than a tile (a gathered tile): four waves
    assert default_num_splits(1, 8, 2048, cores=132, paged=True, pages_per_tile=4) == 66
    assert default_num_splits(8, 8, 64, cores=132, paged=True, pages_per_tile=4) == 8
    assert default_num_splits(8, 8, 512, cores=132, paged=True, pages_per_tile=4) == 8
    # ... whose splits may be as short as 2 tiles (a short cache at B·K = 8: 64 tiles)
    assert default_num_splits(1, 8, 64, cores=132, paged=True, pages_per_tile=4) == 32
    assert default_num_splits(1, 8, 64, cores=132, paged=True) == 16      # one page per tile: 4
    assert default_num_splits(1, 1, 2048, cores=132, paged=True, pages_per_tile=4) == 132  # <= cores
    # 128-key gathered tiles (MQA over small pages) hold twice the bytes: two waves
    assert default_num_splits(8, 1, 256, cores=132, paged=True, pages_per_tile=8, block_kv=128) == 33
    assert default_num_splits(64, 1, 32, cores=132, paged=True, pages_per_tile=2, block_kv=128) == 4
    assert default_num_splits(1, 1, 256, cores=132, paged=True, pages_per_tile=8, block_kv=128) == 128
    # a 128-row query tile fills its core alone: paged caches keep one wave, no 4-split floor
    alone = dict(cores=132, paged=True, pages_per_tile=8, block_kv=128, one_program_per_core=True)
    assert default_num_splits(8, 1, 256, **alone) == 16
    assert default_num_splits(8, 1, 1024, **alone) == 16
    assert default_num_splits(64, 1, 256, **alone) == 2
    assert default_num_splits(1, 1, 256, **alone) == 128
    assert default_num_splits(64, 1, 256, cores=132, one_program_per_core=True) == 4  # contiguous


def test_tile_width_follows_the_cache_layout_and_query_rows():
    wide = lambda **kw: default_decode_config(interpret=False, **kw).block_kv
    assert wide(rows=32, page_size=16) == 128           # MQA over small pages: 8 pages a tile
    assert wide(rows=32, page_size=64) == 128           # ... or 2 pages of 64
    assert wide(rows=32, page_size=None) == 64          # contiguous cache
    assert wide(rows=16, page_size=16) == 64            # GQA's few rows: 64-key tiles
    assert wide(rows=64, page_size=16) == 64            # not measured
    assert wide(rows=32, page_size=128) == 64           # a tile inside one page
    assert wide(rows=32, page_size=16, head_dim=256) == 64   # shared memory
    assert wide(rows=32, page_size=16, itemsize=4) == 64     # float32 cache
    assert wide(rows=32, page_size=16, head_dim=64, itemsize=4) == 128   # ... of 256-byte rows, as bf16 D128
    assert default_decode_config(128, interpret=False, page_size=16) == DecodeConfig(128, 8, 3)  # MQA, Tq 4
    assert default_decode_config(128, interpret=False, page_size=64) == DecodeConfig(64, 8, 3)   # not measured
    assert default_decode_config(128, interpret=False, page_size=8).block_kv == 64               # not measured
    assert default_decode_config(128, interpret=False, page_size=16, head_dim=256).block_kv == 64
    assert default_decode_config(32, interpret=True, page_size=16).block_kv == 16


def test_pipeline_depth_follows_the_cache_layout_and_query_rows():
    """MQA's 32 query rows over a contiguous cache keep 4 K/V stages in flight; GQA's few
    rows, paged caches, wide rows (shared memory) and interpret mode keep fewer."""
    stages = lambda rows, **kw: default_decode_config(rows, interpret=False, **kw).num_stages  # noqa: E731
    assert stages(32) == 4
    assert stages(16) == stages(64) == stages(128) == 3
    assert stages(32, page_size=16) == stages(32, page_size=128) == 3
    assert stages(32, head_dim=256) == stages(32, itemsize=4) == 3
    assert default_decode_config(32, interpret=True).num_stages == 1


# ------------------------------------------------------------------------------------
# Errors: what was expected, what came, how to fix it.
# ------------------------------------------------------------------------------------
def test_errors():
    q, kc = _query(2, 1, 4, 8), np.zeros((2, 16, 2, 8), np.float32)
    lengths = np.array([3, 4], np.int32)

    def call(q=q, kc=kc, vc=None, **kw):
        kw.setdefault("lengths", lengths)
        kw.setdefault("implementation", "reference")
        return jaxattn.decode_attention(q, kc, kc if vc is None else vc, **kw)

    with pytest.raises(ValueError, match=r"head counts: expected query heads N a multiple .* got N=4, K=3"):
        call(kc=np.zeros((2, 16, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"key_cache batch: expected query's batch size 2 .* pass page_table"):
        call(kc=np.zeros((5, 16, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"page_table: expected int32 \[B, max_pages\].*page_table=None"):
        call(page_table=np.zeros((2,), np.int32))
    with pytest.raises(ValueError, match=r"page_table shape: expected \[2, 3\]"):
        call(page_table=np.zeros((3, 3), np.int32))
    with pytest.raises(ValueError, match=r"page_table: expected int32 .* got dtype float32"):
        call(page_table=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"query length: expected Tq <= the cache capacity 16, got Tq=17"):
        call(q=_query(2, 17, 4, 8))
    with pytest.raises(ValueError, match=r"query length: expected Tq <= the cache capacity 8"):
        call(q=_query(2, 9, 4, 8), kc=np.zeros((10, 4, 2, 8), np.float32), page_table=np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match=r"lengths: expected int32 .* got dtype float32.*astype\(jnp.int32\)"):
        call(lengths=np.array([3.0, 4.0], np.float32))
    with pytest.raises(ValueError, match=r"lengths shape: expected \[2\] .* got \(2, 1\)"):
        call(lengths=np.zeros((2, 1), np.int32))
    with pytest.raises(ValueError, match=r"lengths: expected an int32 array .* got int"):
        call(lengths=3)
    with pytest.raises(ValueError, match=r"value_cache shape: expected key_cache's shape"):
        call(vc=np.zeros((2, 15, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"key_cache head dim: expected query's head dim 8, got 4"):
        call(kc=np.zeros((2, 16, 2, 4), np.float32), vc=np.zeros((2, 16, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"query rank: expected 4 dims in \[B, Tq, N, H\]"):
        call(q=q[:, 0])
    with pytest.raises(ValueError, match=r"dtypes: expected query, key_cache and value_cache of one dtype"):
        call(kc=kc.astype(np.float16), vc=kc.astype(np.float16))
    with pytest.raises(ValueError, match=r"num_splits: expected None or a positive int, got 0"):
        call(num_splits=0)
    with pytest.raises(ValueError, match=r"logits_soft_cap: expected a positive finite float"):
        call(logits_soft_cap=-1.0)
    with pytest.raises(ValueError, match=r"implementation: expected None or one of"):
        call(implementation="cudnn")
    with pytest.raises(ValueError, match=r"BlockSparseMask layout: expected at least \(2, 2\) blocks"):
        call(mask=M.BlockSparseMask(np.ones((1, 1), bool), 8, 8))
    with pytest.raises(ValueError, match=r"mask: expected None, a jaxattn.masks.Mask or a bool array"):
        call(mask="causal")


def test_kernel_declines_more_rows_than_it_holds():
    q, kc = _query(1, 8, 32, 16), np.zeros((1, 16, 1, 16), np.float32)   # Tq·N/K = 256 rows
    with pytest.raises(NotImplementedError, match="at most 128 query rows"):
        _decode("pallas_triton", q, kc, kc, [16])


# ------------------------------------------------------------------------------------
# Lowering for an H100 on the CPU machine (catches Triton lowering errors, no GPU needed).
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tq,n,k,cache_shape,pages,mask,splits", [
    (1, 32, 8, (2, 1000, 8, 128), None, M.FullMask(), 4),             # clamped last tile
    (4, 32, 8, (2, 1024, 8, 128), None, M.LocalMask(100, 0), 1),
    (1, 32, 1, (64, 16, 1, 128), 20, M.FullMask(), 3),                 # 4 pages per tile
    (4, 8, 8, (64, 64, 8, 64), 20, M.StridedMask(3), None),            # 1 page per tile
    (2, 8, 2, (2, 256, 2, 80), None, "arrays", 2),                     # mask operand tiles, H80
    (2, 8, 2, (2, 250, 2, 64), None, "arrays", 3),                     # ... past their end: masked
    (1, 32, 8, (64, 16, 8, 96), 20, M.LocalMask(300, 0), None),       # H96 gathered: column mask
])
def test_lowers_for_h100(monkeypatch, tq, n, k, cache_shape, pages, mask, splits):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    h, b = cache_shape[-1], 2
    mask = _array_mask(b, n, cache_shape[1]) if mask == "arrays" else mask

    def fn(q, kc, vc, lengths, table):
        return kernel_decode("pallas_triton", q, kc, vc, lengths, table, mask, scale=0.1,
                             logits_soft_cap=30.0, num_splits=splits, return_residuals=True,
                             interpret=False, config=DecodeConfig())
    sds = [jax.ShapeDtypeStruct((b, tq, n, h), jnp.bfloat16), jax.ShapeDtypeStruct(cache_shape, jnp.bfloat16),
           jax.ShapeDtypeStruct(cache_shape, jnp.bfloat16), jax.ShapeDtypeStruct((b,), np.int32),
           None if pages is None else jax.ShapeDtypeStruct((b, pages), np.int32)]
    text = lower_for_h100(fn, *sds)
    assert "jaxattn_flash_decode" in text


@pytest.mark.parametrize("k,page,dtype,tq,block_kv", [(1, 16, jnp.bfloat16, 1, 128), (1, 64, jnp.bfloat16, 1, 128),
                                                      (8, 16, jnp.bfloat16, 1, 64), (1, 16, jnp.float32, 1, 64),
                                                      (1, 16, jnp.bfloat16, 4, 128), (1, 64, jnp.bfloat16, 4, 64)])
def test_default_tiles_of_a_paged_cache_lower_for_h100(monkeypatch, k, page, dtype, tq, block_kv):
    """The kernel's own choice (config=None) for a paged cache: MQA's 32 query rows gather
    128-key tiles (8 pages of 16 or 2 of 64) from a 16-bit cache, and so do its 128 rows
    of four new tokens over 16-slot pages; GQA's 4 rows and a float32 cache 64-key ones;
    all lower."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    triton_decode = sys.modules["pallas_kernels.triton.decode"]   # the package exports a `decode` function
    chosen = []

    def recording(*args, **kwargs):
        chosen.append(default_decode_config(*args, **kwargs))
        return chosen[-1]
    monkeypatch.setattr(triton_decode, "default_decode_config", recording)
    b, n, h, pages = 2, 32, 128, 20

    def fn(q, kc, vc, lengths, table):
        return kernel_decode("pallas_triton", q, kc, vc, lengths, table, M.FullMask(), scale=0.1,
                             logits_soft_cap=None, num_splits=None, return_residuals=False,
                             interpret=False, config=None)
    cache = jax.ShapeDtypeStruct((b * pages, page, k, h), dtype)
    text = lower_for_h100(fn, jax.ShapeDtypeStruct((b, tq, n, h), dtype), cache, cache,
                          jax.ShapeDtypeStruct((b,), np.int32),
                          jax.ShapeDtypeStruct((b, pages), np.int32))
    assert "jaxattn_flash_decode" in text
    assert chosen and all(c.block_kv == block_kv for c in chosen), chosen


# ------------------------------------------------------------------------------------
# GPU tier (skipped without a GPU): real sizes and the kernels' real tiles, bf16, worst
# row against the float32 reference on the same inputs.
# ------------------------------------------------------------------------------------
def _check_real_size(k, tq, layout, mask=None, score_mod=None, h=128):
    """Kernel vs the float32 reference decode at real sizes (B4, S 8192, N32, H128 unless
    given, bf16, ragged lengths incl. 0), worst row per sequence."""
    b, s, n = 4, 8192, 32
    lengths = np.array([8192, 5000, 77, 0], np.int32)
    kc, vc = _caches(b, s, k, h, lengths)
    q = _query(b, tq, n, h)
    table = None
    if layout != "contiguous":
        kc, vc, table = _to_paged(kc, vc, lengths, int(layout.removeprefix("paged")))
    kc, vc, qb = (jnp.asarray(x, jnp.bfloat16) for x in (kc, vc, q))
    call = dict(lengths=lengths, page_table=table, mask=mask, score_mod=score_mod)
    got = jaxattn.decode_attention(qb, kc, vc, implementation="pallas_triton", **call)
    want = jaxattn.decode_attention(*(x.astype(jnp.float32) for x in (qb, kc, vc)),
                                    implementation="reference", **call)
    err = np.asarray(jnp.max(jnp.abs(got.astype(jnp.float32) - want), axis=(1, 2, 3)))
    assert not np.isnan(np.asarray(got, np.float32)).any()
    assert (err < 2e-2).all(), err


@pytest.mark.gpu
@pytest.mark.parametrize("k,tq", [(8, 1), (8, 4), (1, 4), (1, 1)])   # K = 1: 128-key tiles over 16-slot pages
@pytest.mark.parametrize("layout,mask", [("contiguous", None), ("contiguous", M.LocalMask(1023, 0)),
                                         ("paged16", None), ("paged64", M.LocalMask(511, 0))])
def test_gpu_real_sizes(k, tq, layout, mask):
    _check_real_size(k, tq, layout, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [96, 80])
@pytest.mark.parametrize("k,tq,layout,mask", [(8, 1, "contiguous", None), (1, 4, "contiguous", M.LocalMask(1023, 0)),
                                              (8, 1, "paged16", None), (8, 4, "paged64", M.LocalMask(511, 0)),
                                              (1, 1, "paged16", None), (1, 4, "paged16", None)])
def test_gpu_real_sizes_head_dim_not_power_of_two(h, k, tq, layout, mask):
    """H = 96 and 80 tiled as 128 columns, K/V loaded with a column mask from the cache as
    it is (contiguous blocks, one page per tile, and 16-slot pages gathered into a tile)."""
    _check_real_size(k, tq, layout, mask, h=h)


@pytest.mark.gpu
@pytest.mark.parametrize("score", ["alibi", "per_row"])
@pytest.mark.parametrize("layout,tq", [("contiguous", 1), ("paged16", 4)])
def test_gpu_real_sizes_score_mod(score, layout, tq):
    """score_mod inside the decode kernel at real sizes and tiles (GQA 32/8)."""
    _check_real_size(8, tq, layout, score_mod=_score_mod(score, 32))


def test_score_mod_with_sinks_is_the_last_rows_of_attention_with_both():
    """score_mod and sinks together in the Triton decode kernel: out and lse equal
    dot_product_attention with both at the same rows (unwritten slots hold NaN)."""
    b, s, n, k, h, tq = 2, 32, 4, 2, 8, 2
    lengths = [32, 9]
    kc, vc = _caches(b, s, k, h, lengths)
    q = _query(b, tq, n, h)
    sinks = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    mod = jaxattn.alibi(jaxattn.alibi_slopes(n))
    out, lse = _decode("pallas_triton", q, kc, vc, lengths, sinks=sinks, score_mod=mod)
    fo, fl = jaxattn.dot_product_attention(
        _as_full_attention(q, lengths, s), np.nan_to_num(kc), np.nan_to_num(vc), is_causal=True,
        sinks=sinks, score_mod=mod, implementation="reference", return_residuals=True)
    np.testing.assert_allclose(out, _rows_at(fo, lengths, tq, axis=1), atol=2e-5)
    np.testing.assert_allclose(lse, _rows_at(fl, lengths, tq, axis=2), atol=2e-5)


def test_sinks_are_the_last_rows_of_attention_with_sinks():
    """decode_attention(sinks=) (the Triton decode kernel) equals dot_product_attention(
    sinks=) at the same rows, out and lse, on a cache whose unwritten slots hold NaN."""
    b, s, n, k, h, tq = 2, 32, 4, 2, 8, 2
    lengths = [32, 9]
    kc, vc = _caches(b, s, k, h, lengths)
    q = _query(b, tq, n, h)
    sinks = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    out, lse = _decode("pallas_triton", q, kc, vc, lengths, sinks=sinks)
    fo, fl = jaxattn.dot_product_attention(
        _as_full_attention(q, lengths, s), np.nan_to_num(kc), np.nan_to_num(vc), is_causal=True,
        sinks=sinks, implementation="reference", return_residuals=True)
    np.testing.assert_allclose(out, _rows_at(fo, lengths, tq, axis=1), atol=2e-5)
    np.testing.assert_allclose(lse, _rows_at(fl, lengths, tq, axis=2), atol=2e-5)


# ------------------------------------------------------------------------------------
# score_mod: the same function dot_product_attention applies over the whole sequence,
# at absolute positions, with each query head's own index (GQA rows are packed per KV
# head in the kernel). The caches hold NaN at unwritten slots and `_reviving` turns a
# non-finite score into 3.0, so a mask applied before fn (or a score of an unwritten
# slot computed at all) would change the result.
# ------------------------------------------------------------------------------------
def _reviving(score, batch, head, q_pos, kv_pos, temperature):
    s = score * temperature[head] * (1.0 + 0.25 * batch.astype(score.dtype)) \
        - 0.01 * (q_pos - kv_pos).astype(score.dtype)
    return jnp.where(jnp.isfinite(s), s, 3.0)


def _score_mod(name, n):
    rng = np.random.default_rng(11)
    if name == "alibi":
        return jaxattn.alibi(jaxattn.alibi_slopes(n))
    if name == "relative_buckets":
        return jaxattn.relative_position_buckets(rng.standard_normal((n, 8)).astype(np.float32),
                                                 max_distance=24)
    if name == "soft_cap":
        return jaxattn.soft_cap(2.0)
    return jaxattn.ScoreMod(_reviving, jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32))


# (B, S, N, K, H, Tq), lengths, page size (None: contiguous), score_mod, mask, soft cap, splits
SCORE_CASES = {
    "gqa_tq1_alibi_after_softcap": ((4, 40, 4, 2, 16, 1), [40, 17, 1, 0], None, "alibi", None, 5.0, 2),
    "mqa_tq3_relative_buckets_window": ((2, 48, 4, 1, 16, 3), [48, 21], None, "relative_buckets",
                                        M.LocalMask(12, 0), None, None),
    "gqa_paged8_tq2_batch_head_reviving": ((3, 40, 4, 2, 16, 2), [40, 9, 2], 8, "per_row", None, None, 2),
    "mqa_paged16_tq1_soft_cap": ((2, 48, 4, 1, 16, 1), [48, 30], 16, "soft_cap", None, None, None),
}


@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_score_mod_is_last_rows_of_attention_with_it(name):
    (b, s, n, k, h, tq), lengths, page_size, score_name, mask, cap, splits = SCORE_CASES[name]
    score_mod = _score_mod(score_name, n)
    kc, vc = _caches(b, s, k, h, lengths)
    full_k, full_v = np.nan_to_num(kc), np.nan_to_num(vc)   # the sequences, for attention over them
    q = _query(b, tq, n, h)
    table = None
    if page_size is not None:
        kc, vc, table = _to_paged(kc, vc, lengths, page_size)
    lengths_a = np.asarray(lengths, np.int32)

    @jax.jit
    def run(q, kc, vc, table, lengths, full_k, full_v):
        got = [jaxattn.decode_attention(q, kc, vc, lengths=lengths, page_table=table, mask=mask,
                                        logits_soft_cap=cap, score_mod=score_mod, num_splits=splits,
                                        implementation=impl, return_residuals=True)
               for impl in ("reference", "pallas_triton")]
        full = jaxattn.dot_product_attention(
            _as_full_attention_jnp(q, lengths, s), full_k, full_v, mask=mask, is_causal=True,
            logits_soft_cap=cap, score_mod=score_mod, implementation="reference", return_residuals=True)
        return got, full

    got, (fo, fl) = run(q, kc, vc, table, lengths_a, full_k, full_v)
    want_o, want_l = _rows_at(fo, lengths, tq, axis=1), _rows_at(fl, lengths, tq, axis=2)
    before_start = np.asarray(lengths)[:, None] - tq + np.arange(tq)[None, :] < 0   # [B, Tq]
    want_o[before_start], want_l.transpose(0, 2, 1)[before_start] = 0.0, -np.inf   # no key: 0, -inf
    for impl, result in zip(("reference", "pallas_triton"), got):
        assert not np.isnan(np.asarray(result[0])).any(), impl
        _assert_close(result, (want_o, want_l), atol=2e-5)


def _as_full_attention_jnp(q, lengths, s):
    """_as_full_attention under jit: row b's queries scattered to positions
    lengths[b] - Tq ... lengths[b] - 1 (rows before position 0 dropped)."""
    b, tq = q.shape[:2]
    pos = lengths[:, None] - tq + jnp.arange(tq)[None, :]
    pos = jnp.where(pos >= 0, pos, s)   # out of range: dropped by the scatter
    return jnp.zeros((b, s, *q.shape[2:]), q.dtype).at[jnp.arange(b)[:, None], pos].set(q, mode="drop")


def test_score_mod_gradients_reference_only():
    """The reference decode is jnp: differentiable, score_mod operands included (here
    against dot_product_attention's gradient at the same rows); the kernel has no
    backward and says so."""
    b, s, n, k, h, tq = 2, 24, 4, 2, 8, 2
    lengths = [24, 7]
    kc, vc = _caches(b, s, k, h, lengths)
    q = _query(b, tq, n, h)
    slopes = jnp.asarray(jaxattn.alibi_slopes(n))
    lengths_a = np.asarray(lengths, np.int32)
    do = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)

    def decoded(q, slopes):
        out = jaxattn.decode_attention(q, kc, vc, lengths=lengths_a, score_mod=jaxattn.alibi(slopes),
                                       implementation="reference")
        return jnp.sum(out * do)

    def full(q, slopes):
        out = jaxattn.dot_product_attention(_as_full_attention_jnp(q, lengths_a, s), np.nan_to_num(kc),
                                            np.nan_to_num(vc), is_causal=True,
                                            score_mod=jaxattn.alibi(slopes), implementation="reference")
        rows = lengths_a[:, None] - tq + np.arange(tq)[None, :]
        return jnp.sum(jnp.take_along_axis(out, rows[:, :, None, None], axis=1) * do)

    got, want = jax.jit(lambda q, sl: (jax.grad(decoded, (0, 1))(q, sl), jax.grad(full, (0, 1))(q, sl)))(
        q, slopes)
    for a, w in zip(got, want):
        assert not np.isnan(np.asarray(a)).any()
        np.testing.assert_allclose(a, w, atol=2e-5, rtol=1e-5)
    kernel = lambda sl: jnp.sum(jaxattn.decode_attention(  # noqa: E731
        q, kc, vc, lengths=lengths_a, score_mod=jaxattn.alibi(sl), implementation="pallas_triton"))
    with pytest.raises(NotImplementedError, match="has no backward"):
        jax.make_jaxpr(jax.grad(kernel))(slopes)


def test_score_mod_errors():
    q, kc = _query(2, 1, 4, 8), np.zeros((2, 16, 2, 8), np.float32)
    lengths = np.array([3, 4], np.int32)
    with pytest.raises(ValueError, match="score_mod: expected None, a jaxattn.ScoreMod or a callable"):
        jaxattn.decode_attention(q, kc, kc, lengths=lengths, score_mod=3.0)
    table = jnp.ones((4,))
    with pytest.raises(ValueError, match="by closure"):
        jaxattn.decode_attention(q, kc, kc, lengths=lengths, score_mod=lambda s, b, h, i, j: s + table[h])


def test_score_mod_lowers_for_h100(monkeypatch):
    """Per-row query heads (GQA rows packed per KV head) index the operands with a tile
    of indices: a gather load. ALiBi (a [N] vector) and T5 buckets (an [N, 32] table)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    b, tq, n, k, h = 2, 2, 8, 2, 64
    cache = (2, 256, k, h)
    for score_mod in (jaxattn.alibi(jaxattn.alibi_slopes(n)),
                      jaxattn.relative_position_buckets(np.zeros((n, 32), np.float32))):
        def fn(q, kc, vc, lengths):
            return kernel_decode("pallas_triton", q, kc, vc, lengths, None, M.LocalMask(100, 0), scale=0.1,
                                 logits_soft_cap=None, num_splits=2, return_residuals=True,
                                 score_mod=score_mod, interpret=False, config=DecodeConfig())
        sds = [jax.ShapeDtypeStruct((b, tq, n, h), jnp.bfloat16), jax.ShapeDtypeStruct(cache, jnp.bfloat16),
               jax.ShapeDtypeStruct(cache, jnp.bfloat16), jax.ShapeDtypeStruct((b,), np.int32)]
        assert "jaxattn_flash_decode" in lower_for_h100(fn, *sds)
