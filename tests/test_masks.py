"""Masks against their formulas (the table in README.md's "Masks"), on the literal 4×6 matrices that
the docstrings in jaxattn/masks/structured.py and data.py show, and on sweeps of
T ≠ S and offsets; the algebra, identity (hash/eq, jit static args) and recipes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import masks as M
from jaxattn.masks.block_metadata import build_block_metadata


def lit(text: str) -> np.ndarray:
    """A literal 0/1 matrix written one row per line."""
    return np.array([[int(c) for c in row.split()] for row in text.strip().splitlines()], bool)


def dense(mask, t=4, s=6):
    return np.asarray(mask.to_dense(t, s))


# ---------------------------------------------------------------------------------
# The docstrings' 4×6 matrices, pinned literally (T=4 query rows, S=6 key columns).
# ---------------------------------------------------------------------------------
LITERALS = {
    "full": (M.FullMask(), """
        1 1 1 1 1 1
        1 1 1 1 1 1
        1 1 1 1 1 1
        1 1 1 1 1 1"""),
    "causal": (M.CausalMask(), """
        1 0 0 0 0 0
        1 1 0 0 0 0
        1 1 1 0 0 0
        1 1 1 1 0 0"""),
    # "offset=2 (a 4-token query block at the end of 6 keys): row i sees keys 0..i+2."
    "causal_offset2": (M.CausalMask(offset=2), """
        1 1 1 0 0 0
        1 1 1 1 0 0
        1 1 1 1 1 0
        1 1 1 1 1 1"""),
    # "A row whose i + offset < 0 attends to nothing."
    "causal_offset-1": (M.CausalMask(offset=-1), """
        0 0 0 0 0 0
        1 0 0 0 0 0
        1 1 0 0 0 0
        1 1 1 0 0 0"""),
    "local_1_0": (M.LocalMask(left=1, right=0), """
        1 0 0 0 0 0
        1 1 0 0 0 0
        0 1 1 0 0 0
        0 0 1 1 0 0"""),
    "local_1_1": (M.LocalMask(left=1, right=1), """
        1 1 0 0 0 0
        1 1 1 0 0 0
        0 1 1 1 0 0
        0 0 1 1 1 0"""),
    "local_0_None_offset1": (M.LocalMask(left=0, right=None, offset=1), """
        0 1 1 1 1 1
        0 0 1 1 1 1
        0 0 0 1 1 1
        0 0 0 0 1 1"""),
    "strided_2": (M.StridedMask(2), """
        1 0 1 0 1 0
        0 1 0 1 0 1
        1 0 1 0 1 0
        0 1 0 1 0 1"""),
    "strided_3_offset1": (M.StridedMask(3, offset=1), """
        0 1 0 0 1 0
        0 0 1 0 0 1
        1 0 0 1 0 0
        0 1 0 0 1 0"""),
    "global_1": (M.GlobalMask(1), """
        1 1 1 1 1 1
        1 0 0 0 0 0
        1 0 0 0 0 0
        1 0 0 0 0 0"""),
    "prefix_3": (M.PrefixLMMask(3), """
        1 1 1 0 0 0
        1 1 1 0 0 0
        1 1 1 0 0 0
        1 1 1 1 0 0"""),
    "block_sparse": (M.BlockSparseMask(np.array([[1, 0, 1], [0, 1, 0]], bool), 2, 2), """
        1 1 0 0 1 1
        1 1 0 0 1 1
        0 0 1 1 0 0
        0 0 1 1 0 0"""),
    "dense": (M.DenseMask(np.array([[1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1],
                                    [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)), """
        1 0 1 0 1 0
        0 1 0 1 0 1
        1 1 1 1 1 1
        0 0 0 0 0 0"""),
}


@pytest.mark.parametrize("name", sorted(LITERALS))
def test_docstring_matrix(name):
    mask, text = LITERALS[name]
    got = dense(mask)
    assert isinstance(got, np.ndarray) and got.dtype == np.bool_ and got.shape == (4, 6)
    np.testing.assert_array_equal(got, lit(text))


def test_segment_docstring_matrix():
    m = M.SegmentMask(jnp.array([[0, 0, 1, 1]]), jnp.array([[0, 0, 0, 1, 1, 2]]))
    got = np.asarray(m.to_dense(4, 6))
    assert got.shape == (1, 4, 6)  # [B, T, S] when a SegmentMask is involved
    np.testing.assert_array_equal(got[0], lit("""
        1 1 1 0 0 0
        1 1 1 0 0 0
        0 0 0 1 1 0
        0 0 0 1 1 0"""))


def test_causal_query_longer_than_keys():
    # T > S: positions are absolute, so the causal mask is top-left aligned (tril).
    np.testing.assert_array_equal(dense(M.CausalMask(), 6, 4), np.tril(np.ones((6, 4), bool)))
    np.testing.assert_array_equal(dense(M.CausalMask(offset=-2), 6, 4),
                                  np.tril(np.ones((6, 4), bool), k=-2))


# ---------------------------------------------------------------------------------
# Each mask against its formula on sweeps of T ≠ S, offsets and parameters.
# ---------------------------------------------------------------------------------
SHAPES = [(1, 1), (4, 6), (6, 4), (7, 13), (16, 5)]


def _ij(t, s):
    return np.arange(t)[:, None], np.arange(s)[None, :]


def _formula_cases():
    for o in (-3, 0, 2):
        yield M.CausalMask(o), lambda i, j, o=o: j <= i + o
    for left, right, o in itertools.product((None, 0, 2), (None, 0, 3), (-1, 0, 2)):
        def f(i, j, left=left, right=right, o=o):
            ok = np.ones(np.broadcast_shapes(i.shape, j.shape), bool)
            if left is not None:
                ok &= i + o - left <= j
            if right is not None:
                ok &= j <= i + o + right
            return ok
        yield M.LocalMask(left, right, o), f
    for stride, o in itertools.product((1, 2, 3, 5), (-4, 0, 1)):
        yield M.StridedMask(stride, o), lambda i, j, s=stride, o=o: (i + o - j) % s == 0
    for g in (0, 1, 3, 20):
        yield M.GlobalMask(g), lambda i, j, g=g: (i < g) | (j < g)
    for p in (0, 2, 5, 20):
        yield M.PrefixLMMask(p), lambda i, j, p=p: (j < p) | (j <= i)


FORMULA_CASES = list(_formula_cases())


@pytest.mark.parametrize("mask,formula", FORMULA_CASES, ids=[repr(m) for m, _ in FORMULA_CASES])
def test_structured_mask_formula(mask, formula):
    for t, s in SHAPES:
        i, j = _ij(t, s)
        np.testing.assert_array_equal(dense(mask, t, s), np.broadcast_to(formula(i, j), (t, s)),
                                      err_msg=f"{mask!r} T={t} S={s}")


@pytest.mark.parametrize("stride", [128, 1000, 4096])
def test_strided_mask_large_stride(stride):
    # Regression: evaluate() used to add stride * 2**24 to the positions, overflowing
    # int32 for any stride >= 128 (numpy and jnp both raised OverflowError).
    i, j = _ij(3, 2 * stride + 3)
    want = (i + 5 - j) % stride == 0
    m = M.StridedMask(stride, offset=5)
    np.testing.assert_array_equal(dense(m, 3, 2 * stride + 3), want)
    from jaxattn.reference import allowed_pairs
    np.testing.assert_array_equal(np.asarray(allowed_pairs(m, 3, 2 * stride + 3))[0, 0], want)


def test_block_sparse_formula_and_layout_larger_than_needed():
    rng = np.random.default_rng(0)
    layout = rng.random((5, 4)) < 0.5
    m = M.BlockSparseMask(layout, 3, 2)
    i, j = _ij(11, 7)  # needs 4 x 4 blocks; the layout has more rows (allowed)
    np.testing.assert_array_equal(dense(m, 11, 7), layout[i // 3, j // 2])
    # 0/1 integer layouts are accepted and mean the same.
    assert M.BlockSparseMask(layout.astype(np.int32), 3, 2) == m


def test_dense_mask_broadcasting():
    rng = np.random.default_rng(1)
    per_head = rng.random((2, 3, 4, 6)) < 0.5
    m = M.DenseMask(per_head)
    assert m.batch_heads() == (2, 3)
    np.testing.assert_array_equal(np.asarray(m.to_dense(4, 6)), per_head)
    row = rng.random((1, 6)) < 0.5  # [1, S]: the same keys for every query row
    np.testing.assert_array_equal(dense(M.DenseMask(row)), np.broadcast_to(row, (4, 6)))


# ---------------------------------------------------------------------------------
# Algebra.
# ---------------------------------------------------------------------------------
def test_and_or_match_elementwise_logic():
    a, b, c = M.CausalMask(), M.LocalMask(2, None), M.GlobalMask(1)
    for t, s in SHAPES:
        da, db, dc = dense(a, t, s), dense(b, t, s), dense(c, t, s)
        np.testing.assert_array_equal(dense(a & b, t, s), da & db)
        np.testing.assert_array_equal(dense(a | c, t, s), da | dc)
        np.testing.assert_array_equal(dense((a & b) | c, t, s), (da & db) | dc)
        np.testing.assert_array_equal(dense(a & (b | c), t, s), da & (db | dc))


def test_composites_flatten_and_keep_order():
    a, b, c = M.CausalMask(), M.LocalMask(2, 0), M.GlobalMask(1)
    assert isinstance(a & b & c, M.AndMask) and (a & b & c).parts == (a, b, c)
    assert (a | (b | c)).parts == (a, b, c)
    assert isinstance((a & b) | c, M.OrMask) and ((a & b) | c).parts == (a & b, c)


def test_and_with_non_mask_raises():
    with pytest.raises(TypeError, match="DenseMask"):
        M.CausalMask() & np.ones((4, 6), bool)
    with pytest.raises(TypeError, match="DenseMask"):
        M.CausalMask() | 1


def test_mask_has_no_truth_value():
    m = M.CausalMask()
    with pytest.raises(TypeError, match="`&` and `\\|`"):
        bool(m)
    with pytest.raises(TypeError):
        m and M.FullMask()  # noqa: B018
    with pytest.raises(TypeError):
        bool(m & M.LocalMask(1, 0))


# ---------------------------------------------------------------------------------
# Identity: equal parameters ⇒ equal and same hash; usable as jit static arguments.
# ---------------------------------------------------------------------------------
def test_equality_and_hash():
    layout = np.array([[1, 0], [1, 1]], bool)
    equal_pairs = [
        (M.FullMask(), M.FullMask()),
        (M.CausalMask(2), M.CausalMask(np.int64(2))),
        (M.LocalMask(3, 0), M.LocalMask(3, 0)),
        (M.StridedMask(4, 1), M.StridedMask(4, 1)),
        (M.BlockSparseMask(layout, 2, 2), M.BlockSparseMask(layout.copy(), 2, 2)),
        (M.DenseMask(np.eye(3, dtype=bool)), M.DenseMask(np.eye(3, dtype=bool))),
        (M.CausalMask() & M.LocalMask(1, 0), M.CausalMask() & M.LocalMask(1, 0)),
    ]
    for a, b in equal_pairs:
        assert a is not b and a == b and hash(a) == hash(b), (a, b)
    different = [M.FullMask(), M.CausalMask(0), M.CausalMask(1), M.LocalMask(3, 0),
                 M.LocalMask(0, 3), M.LocalMask(3, 0, 1), M.StridedMask(4), M.GlobalMask(4),
                 M.PrefixLMMask(4), M.BlockSparseMask(layout, 2, 2),
                 M.BlockSparseMask(layout, 2, 4), M.BlockSparseMask(~layout, 2, 2),
                 M.DenseMask(np.eye(3, dtype=bool)), M.DenseMask(~np.eye(3, dtype=bool)),
                 M.CausalMask() & M.LocalMask(1, 0), M.CausalMask() | M.LocalMask(1, 0),
                 M.LocalMask(1, 0) & M.CausalMask()]
    for a, b in itertools.combinations(different, 2):
        assert a != b, (a, b)
    assert len(set(different)) == len(different)


def test_static_mask_is_a_jit_static_argument():
    traces = []

    def f(x, mask):
        traces.append(mask)
        return jnp.where(mask.to_dense(4, 6), x, 0.0).sum()

    jf = jax.jit(f, static_argnums=1)
    x = jnp.ones((4, 6))
    assert float(jf(x, M.CausalMask())) == 10.0
    assert float(jf(x, M.CausalMask())) == 10.0  # a new but equal instance: cache hit
    assert len(traces) == 1
    assert float(jf(x, M.CausalMask(1))) == 14.0
    assert float(jf(x, M.CausalMask() & M.GlobalMask(1))) == 4.0
    assert len(traces) == 3


def test_static_mask_passes_jit_as_a_leafless_pytree():
    m = M.LocalMask(1, 1) & M.BlockSparseMask(np.ones((2, 3), bool), 2, 2)
    assert jax.tree_util.tree_leaves(m) == []
    got = jax.jit(lambda mask: jnp.asarray(mask.to_dense(4, 6)))(m)
    np.testing.assert_array_equal(np.asarray(got), dense(M.LocalMask(1, 1)))


def test_segment_mask_under_jit_does_not_recompile():
    traces = []

    @jax.jit
    def f(mask):
        traces.append(1)
        return mask.to_dense(4, 6)

    a = M.SegmentMask(jnp.array([[0, 0, 1, 1]]), jnp.array([[0, 0, 0, 1, 1, 2]]))
    b = M.SegmentMask(jnp.array([[5, 7, 7, 7]]), jnp.array([[5, 5, 7, 7, 8, 8]]))
    np.testing.assert_array_equal(np.asarray(f(a)), np.asarray(a.to_dense(4, 6)))
    got_b = np.asarray(f(b))[0]
    assert len(traces) == 1  # new ids are new leaf values, not a new trace
    np.testing.assert_array_equal(got_b, lit("""
        1 1 0 0 0 0
        0 0 1 1 0 0
        0 0 1 1 0 0
        0 0 1 1 0 0"""))


def test_segment_mask_built_from_traced_ids():
    traces = []

    @jax.jit
    def f(q_ids, kv_ids):
        traces.append(1)
        m = M.CausalMask() & M.SegmentMask(q_ids, kv_ids)
        return m.to_dense(4, 4), build_block_metadata(m, 4, 4, 2, 2).partial_count

    ids1 = jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    ids2 = jnp.array([[0, 0, 0, 0], [3, 3, 4, 4]])
    for ids in (ids1, ids2):
        d, _ = f(ids, ids)
        want = np.tril(np.ones((4, 4), bool)) & (np.asarray(ids)[:, :, None] == np.asarray(ids)[:, None, :])
        np.testing.assert_array_equal(np.asarray(d), want)
    assert len(traces) == 1


# ---------------------------------------------------------------------------------
# Recipes vs their definitions.
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_longformer_definition(causal):
    t = 13
    i, j = _ij(t, t)
    w, g = 2, 2
    local = (j >= i - w) & (j <= i + (0 if causal else w))
    want = local | (i < g) | (j < g)
    if causal:
        want &= j <= i
    np.testing.assert_array_equal(dense(M.longformer_mask(w, g, causal=causal), t, t), want)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_definition(causal):
    t, bs, w, g, r = 40, 4, 1, 2, 2
    m = M.bigbird_mask(t, window=w, num_global=g, num_random_blocks=r, block_size=bs,
                       causal=causal, seed=3)
    # Recover the random layout from the mask itself and check its shape of choices.
    (sparse,) = [p for p in (m.parts[0].parts if causal else m.parts)
                 if isinstance(p, M.BlockSparseMask)]
    layout = sparse.layout
    n = -(-t // bs)
    assert layout.shape == (n, n)
    for row in range(n):
        allowed_blocks = row + 1 if causal else n
        assert layout[row].sum() == min(r, allowed_blocks)
        if causal:
            assert not layout[row, row + 1:].any()
    i, j = _ij(t, t)
    want = ((j >= i - w) & (j <= i + (0 if causal else w))) | (i < g) | (j < g) \
        | layout[i // bs, j // bs]
    if causal:
        want &= j <= i
    np.testing.assert_array_equal(dense(m, t, t), want)
    same = M.bigbird_mask(t, window=w, num_global=g, num_random_blocks=r, block_size=bs,
                          causal=causal, seed=3)
    other = M.bigbird_mask(t, window=w, num_global=g, num_random_blocks=r, block_size=bs,
                           causal=causal, seed=4)
    assert same == m and hash(same) == hash(m)
    assert other != m  # 10 rows of random choices: a different seed differs


def test_causal_document_definition():
    ids = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    got = np.asarray(M.causal_document_mask(ids).to_dense(8, 8))
    a = np.asarray(ids)
    want = np.tril(np.ones((8, 8), bool))[None] & (a[:, :, None] == a[:, None, :])
    np.testing.assert_array_equal(got, want)
    assert got[0, 3, 2] == 0 and got[0, 4, 3] == 1  # a new document starts fresh


# ---------------------------------------------------------------------------------
# Constructor checks.
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: M.LocalMask(-1, 0), "LocalMask left must be >= 0, got -1"),
    (lambda: M.LocalMask(1.5, 0), "LocalMask left must be an int or None, got 1.5"),
    (lambda: M.CausalMask(True), "CausalMask offset must be an int, got True"),
    (lambda: M.StridedMask(0), "StridedMask stride must be >= 1, got 0"),
    (lambda: M.GlobalMask(-2), "GlobalMask num_global must be >= 0"),
    (lambda: M.PrefixLMMask("3"), "PrefixLMMask prefix_len must be an int"),
    (lambda: M.BlockSparseMask(np.ones(4, bool), 2, 2), "layout must be 2-D"),
    (lambda: M.BlockSparseMask(np.full((2, 2), 2), 2, 2), "layout must be boolean"),
    (lambda: M.BlockSparseMask(np.ones((2, 2), bool), 0, 2), "block_q must be >= 1"),
    (lambda: M.DenseMask(np.ones((1, 1, 1, 6, 6), bool)), "at most 4 dims"),
    (lambda: M.DenseMask(np.ones((4, 6), np.int32)), "must be boolean"),
])
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
