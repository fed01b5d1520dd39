"""Block metadata vs the dense oracle, tile by tile (property tests).

For a tile of real rows [q0, q1) and real columns [k0, k1) the truth is read off
``mask.to_dense``: EMPTY when no pair is allowed, FULL when every pair is allowed and
the tile holds no padded key column, PARTIAL otherwise. Leaf masks must match it
exactly; compositions (AND = min, OR = max of the parts' states) may call a truly
empty/full tile PARTIAL, but only where a part is PARTIAL — never the reverse.
"""

import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxattn import masks as M
from jaxattn.masks.base import AndMask, OrMask, tile_bounds
from jaxattn.masks.block_metadata import _static_metadata, build_block_metadata, tile_states
from pallas_kernels.metadata import (EMPTY, FULL, MAX_ISOLATED_POSITIONS, PARTIAL, BlockMetadata,
                                     decode_positions)

# No deadline and no too_slow check: CI machines are shared and jit compiles vary.
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TILES = st.sampled_from([8, 16, 32, 64, 3, 5, 12, 24, 40])


# ---------------------------------------------------------------------------------
# Oracle and metadata decoding.
# ---------------------------------------------------------------------------------
def as4(x) -> np.ndarray:
    """Oracle or state grids as [Bm, Hm, ., .] numpy arrays."""
    x = np.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def oracle(mask, q_len, kv_len) -> np.ndarray:
    """mask.to_dense as bool [Bm, Hm, T, S] (to_dense drops a size-1 Hm, then Bm)."""
    bm, hm = mask.batch_heads()
    return np.asarray(mask.to_dense(q_len, kv_len)).reshape(bm, hm, q_len, kv_len)


def true_states(dense, q_len, kv_len, bq, bk) -> np.ndarray:
    """Tile states straight from a dense [Bm, Hm, T, S] matrix, by looping over tiles."""
    assert dense.ndim == 4
    n_q, n_k = -(-q_len // bq), -(-kv_len // bk)
    out = np.empty(dense.shape[:2] + (n_q, n_k), np.int8)
    for a in range(n_q):
        for b in range(n_k):
            tile = dense[:, :, a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
            padded = (b + 1) * bk > kv_len
            any_, all_ = tile.any((-1, -2)), tile.all((-1, -2))
            out[:, :, a, b] = np.where(all_ & ~padded, FULL, np.where(any_, PARTIAL, EMPTY))
    return out


def decode_lists(count, index, n_cols) -> np.ndarray:
    """bool [..., n_rows, n_cols] from (count, index) lists, checking the list contract."""
    count, index = np.asarray(count), np.asarray(index)
    assert count.dtype == np.int32 and index.dtype == np.int32
    assert index.shape[:-1] == count.shape and index.shape[-1] >= 1
    out = np.zeros(count.shape + (n_cols,), bool)
    for pos in np.ndindex(count.shape):
        c, idx = int(count[pos]), index[pos]
        assert 0 <= c <= n_cols
        valid = idx[:c]
        assert (np.diff(valid) > 0).all(), f"indices not ascending: {valid}"
        assert ((valid >= 0) & (valid < n_cols)).all()
        # Entries past the count repeat the last valid index (0 for an empty list).
        np.testing.assert_array_equal(idx[c:], valid[-1] if c else 0)
        out[pos + (valid,)] = True
    return out


def decode(md: BlockMetadata) -> np.ndarray:
    """Tile states [Bm, Hm, nQ, nK] from the forward lists; asserts that the
    transposed lists are exactly their transpose."""
    n_q, n_k = md.num_q_blocks, md.num_kv_blocks
    assert n_q == -(-md.q_len // md.block_q) and n_k == -(-md.kv_len // md.block_kv)
    full = decode_lists(md.full_count, md.full_index, n_k)
    part = decode_lists(md.partial_count, md.partial_index, n_k)
    assert not (full & part).any(), "a tile is listed both FULL and PARTIAL"
    t_full = decode_lists(md.t_full_count, md.t_full_index, n_q)
    t_part = decode_lists(md.t_partial_count, md.t_partial_index, n_q)
    np.testing.assert_array_equal(t_full, np.swapaxes(full, -1, -2))
    np.testing.assert_array_equal(t_part, np.swapaxes(part, -1, -2))
    return np.where(full, FULL, np.where(part, PARTIAL, EMPTY)).astype(np.int8)


def is_leaf(mask) -> bool:
    return not isinstance(mask, (AndMask, OrMask))


def check_states(mask, got, want):
    """Exact for leaves; sound (and conservative only through a PARTIAL part) otherwise."""
    got, want = np.broadcast_arrays(as4(got), as4(want))
    if is_leaf(mask):
        np.testing.assert_array_equal(got, want, err_msg=repr(mask))
        return
    bad_empty = (got == EMPTY) & (want != EMPTY)
    bad_full = (got == FULL) & (want != FULL)
    assert not bad_empty.any(), f"{mask!r}: a tile marked EMPTY has allowed pairs"
    assert not bad_full.any(), f"{mask!r}: a tile marked FULL has a masked or padded pair"
    # Wherever the composition is not exact, the tile is PARTIAL (checked above) and
    # at least one part is PARTIAL there: the only documented source of slack.
    inexact = got != want
    if inexact.any():
        assert (got[inexact] == PARTIAL).all()


# ---------------------------------------------------------------------------------
# Random masks.
# ---------------------------------------------------------------------------------
small = st.integers(0, 40)
offsets = st.integers(-40, 40)


@st.composite
def block_sparse(draw):
    bq, bk = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    shape = (-(-150 // bq), -(-150 // bk))  # big enough for every length drawn below
    seed = draw(st.integers(0, 2**31 - 1))
    p = draw(st.sampled_from([0.2, 0.5, 0.9]))
    return M.BlockSparseMask(np.random.default_rng(seed).random(shape) < p, bq, bk)


def leaves(q_len, kv_len):
    @st.composite
    def dense_mask(draw):
        seed = draw(st.integers(0, 2**31 - 1))
        kind = draw(st.sampled_from(["random", "band", "batched"]))
        rng = np.random.default_rng(seed)
        if kind == "random":
            a = rng.random((q_len, kv_len)) < draw(st.sampled_from([0.05, 0.5, 0.97]))
        elif kind == "band":  # large empty and full regions
            i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
            a = np.abs(i - j) < rng.integers(1, 60)
        else:  # per batch row: Bm = 2
            a = rng.random((2, 1, q_len, kv_len)) < 0.9
        return M.DenseMask(a)

    return st.one_of(
        st.just(M.FullMask()),
        st.builds(M.CausalMask, offsets),
        st.builds(M.LocalMask, st.none() | small, st.none() | small, offsets),
        st.builds(M.StridedMask, st.integers(1, 9), offsets),
        st.builds(M.GlobalMask, small),
        st.builds(M.PrefixLMMask, small),
        block_sparse(),
        dense_mask(),
    )


@st.composite
def cases(draw):
    q_len, kv_len = draw(st.integers(1, 150)), draw(st.integers(1, 150))
    bq, bk = draw(TILES), draw(TILES)
    mask = draw(st.recursive(
        leaves(q_len, kv_len),
        lambda sub: st.tuples(sub, sub, st.booleans()).map(lambda t: t[0] & t[1] if t[2] else t[0] | t[1]),
        max_leaves=4))
    return mask, q_len, kv_len, bq, bk


# ---------------------------------------------------------------------------------
# Static path.
# ---------------------------------------------------------------------------------
@SETTINGS
@given(cases())
def test_tile_states_match_dense(case):
    mask, q_len, kv_len, bq, bk = case
    want = true_states(oracle(mask, q_len, kv_len), q_len, kv_len, bq, bk)
    got = tile_states(mask, q_len, kv_len, bq, bk)
    assert isinstance(got, np.ndarray) and got.dtype == np.int8 and got.ndim == 4
    check_states(mask, got, want)


@SETTINGS
@given(cases())
def test_metadata_lists_match_dense(case):
    mask, q_len, kv_len, bq, bk = case
    md = build_block_metadata(mask, q_len, kv_len, bq, bk)
    assert (md.block_q, md.block_kv, md.q_len, md.kv_len) == (bq, bk, q_len, kv_len)
    decoded = decode(md)
    # The lists say exactly what tile_states says ...
    np.testing.assert_array_equal(decoded, np.broadcast_to(
        tile_states(mask, q_len, kv_len, bq, bk), decoded.shape))
    # ... which reproduces the dense matrix tile by tile.
    check_states(mask, decoded, true_states(oracle(mask, q_len, kv_len), q_len, kv_len, bq, bk))
    # Static lists are trimmed to the longest row (never shorter than 1).
    assert md.full_index.shape[-1] == max(1, int(np.asarray(md.full_count).max()))


def test_composition_can_be_conservative_but_sound():
    # Causal & anti-causal: each part is PARTIAL on the diagonal tile, their AND keeps
    # only the diagonal (nonempty); with offset 1 the AND is truly empty, yet stays PARTIAL.
    m = M.CausalMask() & M.LocalMask(0, None, offset=1)
    assert not m.to_dense(8, 8).any()
    assert tile_states(m, 8, 8, 8, 8)[0, 0, 0, 0] == PARTIAL  # documented slack
    assert tile_states(M.CausalMask(), 8, 8, 8, 8)[0, 0, 0, 0] == PARTIAL


def test_known_small_grids():
    # Causal at T=S=20, 8×8 tiles: diagonal PARTIAL (the last also padded), below FULL.
    np.testing.assert_array_equal(tile_states(M.CausalMask(), 20, 20, 8, 8)[0, 0],
                                  [[1, 0, 0], [2, 1, 0], [2, 2, 1]])
    # A full mask with S % block_kv != 0: the last column holds padding and is PARTIAL.
    np.testing.assert_array_equal(tile_states(M.FullMask(), 8, 20, 8, 8)[0, 0], [[2, 2, 1]])
    md = build_block_metadata(M.CausalMask(), 20, 20, 8, 8)
    np.testing.assert_array_equal(md.full_count[0, 0], [0, 1, 2])
    np.testing.assert_array_equal(md.full_index[0, 0], [[0, 0], [0, 0], [0, 1]])
    np.testing.assert_array_equal(md.partial_index[0, 0], [[0], [1], [2]])
    np.testing.assert_array_equal(md.t_full_count[0, 0], [2, 1, 0])
    np.testing.assert_array_equal(md.t_full_index[0, 0], [[1, 2], [2, 2], [0, 0]])


def test_static_metadata_is_cached():
    m = M.LocalMask(5, 0) & M.GlobalMask(2)
    a = build_block_metadata(m, 100, 90, 16, 32)
    b = build_block_metadata(M.LocalMask(5, 0) & M.GlobalMask(2), 100, 90, 16, 32)
    assert a is b


# ---------------------------------------------------------------------------------
# Dynamic path: jnp under jit, compared with the static path on the same data.
# ---------------------------------------------------------------------------------
DYN_SHAPES = [(37, 37, 8, 16), (20, 45, 5, 8)]  # few shapes: one compile each


@jax.jit(static_argnums=(1, 2, 3, 4))
def _jit_states_and_metadata(mask, q_len, kv_len, bq, bk):
    return tile_states(mask, q_len, kv_len, bq, bk), build_block_metadata(mask, q_len, kv_len, bq, bk)


def _jit_states(mask, q_len, kv_len, bq, bk):
    # One module-level jit: examples with the same shapes reuse the compilation.
    states, md = _jit_states_and_metadata(mask, q_len, kv_len, bq, bk)
    return np.asarray(states), jax.tree.map(np.asarray, md)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([(DYN_SHAPES[0], True, False), (DYN_SHAPES[1], False, True),
                        (DYN_SHAPES[1], True, True)]),  # (shape, causal, batched): 3 compiles
       st.integers(0, 2**31 - 1))
def test_dense_mask_dynamic_matches_static(config, seed):
    (q_len, kv_len, bq, bk), causal, batched = config
    rng = np.random.default_rng(seed)
    arr = rng.random((2, 1, q_len, kv_len) if batched else (q_len, kv_len)) < rng.choice([0.1, 0.9])
    arr[..., : q_len // 2, : kv_len // 3] = True  # some FULL and EMPTY tiles
    arr[..., q_len // 2:, kv_len // 3:] = False
    static, dynamic = M.DenseMask(arr), M.DenseMask(jnp.asarray(arr))
    assert dynamic.is_dynamic and not static.is_dynamic
    if causal:
        static, dynamic = M.CausalMask() & static, M.CausalMask() & dynamic
    d_states, d_md = _jit_states(dynamic, q_len, kv_len, bq, bk)
    s_states = tile_states(static, q_len, kv_len, bq, bk)
    np.testing.assert_array_equal(d_states, s_states)
    assert d_md.full_index.shape[-1] == -(-kv_len // bk)  # fixed length nK under jit
    np.testing.assert_array_equal(decode(d_md), decode(build_block_metadata(static, q_len, kv_len, bq, bk)))
    check_states(static, s_states, true_states(oracle(static, q_len, kv_len), q_len, kv_len, bq, bk))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(DYN_SHAPES), st.integers(0, 2**31 - 1), st.booleans())
def test_segment_mask_dynamic_matches_static(shape, seed, causal):
    q_len, kv_len, bq, bk = shape
    q_len = kv_len  # self-attention over packed documents
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.integers(0, rng.integers(1, 8), size=(2, q_len)), axis=-1).astype(np.int32)
    seg = M.SegmentMask(jnp.asarray(ids))
    same = M.DenseMask((ids[:, :, None] == ids[:, None, :])[:, None])  # static, same data
    if causal:
        seg, same = M.CausalMask() & seg, M.CausalMask() & same
    d_states, d_md = _jit_states(seg, q_len, kv_len, bq, bk)
    # Sorted ids: the min/max rule is exact, so dynamic == static on the same data.
    np.testing.assert_array_equal(d_states, tile_states(same, q_len, kv_len, bq, bk))
    np.testing.assert_array_equal(decode(d_md), d_states)
    check_states(same, d_states, true_states(oracle(seg, q_len, kv_len), q_len, kv_len, bq, bk))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(DYN_SHAPES), st.integers(0, 2**31 - 1))
def test_segment_mask_unsorted_ids_are_sound(shape, seed):
    q_len, kv_len, bq, bk = shape
    rng = np.random.default_rng(seed)
    q_ids = rng.integers(0, 4, size=(3, q_len))
    kv_ids = np.sort(rng.integers(0, 4, size=(3, kv_len)), axis=-1)
    seg = M.SegmentMask(jnp.asarray(q_ids), jnp.asarray(kv_ids))
    got, _ = _jit_states(seg, q_len, kv_len, bq, bk)
    assert got.shape == (3, 1, -(-q_len // bq), -(-kv_len // bk))
    want = true_states(oracle(seg, q_len, kv_len), q_len, kv_len, bq, bk)
    # Unsorted ids: documented as conservative, so only soundness is promised.
    assert not ((got == EMPTY) & (want != EMPTY)).any()
    assert not ((got == FULL) & (want != FULL)).any()


def test_segment_metadata_traced_ids_do_not_recompile():
    traces = []

    @jax.jit
    def f(ids):
        traces.append(1)
        return build_block_metadata(M.SegmentMask(ids), 32, 32, 8, 8)

    a = f(jnp.zeros((1, 32), jnp.int32))
    b = f(jnp.repeat(jnp.arange(4, dtype=jnp.int32), 8)[None])
    assert len(traces) == 1
    np.testing.assert_array_equal(a.full_count[0, 0], [4, 4, 4, 4])
    np.testing.assert_array_equal(b.full_count[0, 0], [1, 1, 1, 1])
    np.testing.assert_array_equal(b.partial_count[0, 0], [0, 0, 0, 0])
    np.testing.assert_array_equal(b.full_index[0, 0], np.repeat(np.arange(4), 4).reshape(4, 4))


# ---------------------------------------------------------------------------------
# 128k tokens at 128×128 tiles: fast and never T×S (a guard, not a benchmark).
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda n: M.CausalMask(),
    lambda n: M.LocalMask(1024, 0),
    lambda n: M.bigbird_mask(n, window=256, num_global=128, num_random_blocks=3, block_size=128),
], ids=["causal", "local", "bigbird"])
def test_128k_static_metadata_is_cheap(make):
    n = 128 * 1024
    _static_metadata.cache_clear()
    tile_bounds.cache_clear()
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        md = build_block_metadata(make(n), n, n, 128, 128)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0, f"building took {elapsed:.2f} s"
    # T*S bools would be 16 GiB; the [1024, 1024] tile grid and its lists are a few MB each.
    assert peak < 256 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert md.num_q_blocks == md.num_kv_blocks == 1024
    assert int(np.asarray(md.full_count).sum() + np.asarray(md.partial_count).sum()) > 0


# ---------------------------------------------------------------------------------
# Isolation facts: may a PARTIAL tile hold a key column (query row) nobody in the tile
# attends? The kernels skip zeroing such rows only where the answer is a proven "no".
# ---------------------------------------------------------------------------------
def isolation_oracle(dense, state, bq, bk):
    """(keys, queries, key positions, query positions) straight from the dense
    [Bm, Hm, T, S] matrix, tile by tile."""
    lone_keys, lone_queries = set(), set()
    for b, h, a, c in np.argwhere(state == PARTIAL):
        tile = dense[b, h, a * bq:(a + 1) * bq, c * bk:(c + 1) * bk]
        lone_keys |= set((c * bk + np.flatnonzero(~tile.any(axis=0))).tolist())
        lone_queries |= set((a * bq + np.flatnonzero(~tile.any(axis=1))).tolist())
    return bool(lone_keys), bool(lone_queries), sorted(lone_keys), sorted(lone_queries)


@SETTINGS
@given(cases())
def test_isolation_facts_match_dense(case):
    mask, q_len, kv_len, bq, bk = case
    md = build_block_metadata(mask, q_len, kv_len, bq, bk)
    dense = oracle(mask, q_len, kv_len)
    state = np.broadcast_to(tile_states(mask, q_len, kv_len, bq, bk),
                            dense.shape[:2] + tile_states(mask, q_len, kv_len, bq, bk).shape[2:])
    keys, queries, key_positions, query_positions = isolation_oracle(dense, state, bq, bk)
    assert (md.partial_isolates_keys, md.partial_isolates_queries) == (keys, queries)
    for raw, want, length in ((md.isolated_keys, key_positions, kv_len),
                              (md.isolated_queries, query_positions, q_len)):
        if raw is None:   # listed only while short: a check reads every row instead
            assert len(want) > min(MAX_ISOLATED_POSITIONS, length // 4)
        else:
            assert decode_positions(raw).tolist() == want


@pytest.mark.parametrize("mask, t, s, want", [
    (M.CausalMask(), 1024, 1024, False),                                  # diagonal tiles
    (M.LocalMask(256, 0) & M.CausalMask(), 2048, 2048, False),            # aligned window
    (M.LocalMask(100, 0) & M.CausalMask(), 2048, 2048, True),             # unaligned edge
    (M.StridedMask(256) & M.CausalMask(), 2048, 2048, False),            # residues align with tiles
    (M.StridedMask(200) & M.CausalMask(), 2048, 2048, True),             # residues cut tiles
    (M.CausalMask(), 1000, 1500, True),                                   # keys past the last query
    (M.FullMask(), 1000, 1000, False),                                    # padding alone
], ids=["causal", "window256", "window100", "strided256", "strided200", "causal-T<S", "full-padded"])
def test_isolation_facts_of_common_masks(mask, t, s, want):
    md = build_block_metadata(mask, t, s, 128, 64)
    assert md.partial_isolates_keys is want


def test_bigbird_blocks_isolate_nothing():
    # Aligned window, global and random blocks: every PARTIAL tile's columns are attended.
    md = build_block_metadata(M.bigbird_mask(2048, window=256, num_global=128, num_random_blocks=2,
                                             block_size=128), 2048, 2048, 128, 64)
    assert not md.partial_isolates_keys


def test_dynamic_masks_may_isolate():
    ids = jnp.zeros((1, 64), jnp.int32)
    md = build_block_metadata(M.SegmentMask(ids, ids), 64, 64, 16, 16)
    assert md.partial_isolates_keys and md.partial_isolates_queries
    assert md.isolated_keys is None and md.isolated_queries is None   # any row may be


@pytest.mark.parametrize("mask, want", [
    (M.FullMask(), True),
    (M.LocalMask(2048, 0), True),           # only the first q-blocks see fewer tiles
    (M.CausalMask(), False),                # q-block q visits q + 1 tiles
    (M.StridedMask(4) & M.CausalMask(), False),
    (M.SegmentMask(jnp.zeros((1, 4096), jnp.int32), jnp.zeros((1, 4096), jnp.int32)), False),  # dynamic
], ids=["full", "window", "causal", "strided-causal", "dynamic"])
def test_even_q_work(mask, want):
    assert build_block_metadata(mask, 4096, 4096, 128, 128).even_q_work is want
