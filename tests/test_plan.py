"""The planner without kernels: class coordinates, parts, the permutation, the merge,
explain() and when a plan is chosen (numpy and the jnp reference only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import jaxattn
from jaxattn import masks as M
from jaxattn.masks.block_metadata import dense_tile_states
from jaxattn.masks.complement import NotMask
from jaxattn.masks.plan import EMPTY_MASK, Residue, explain, plan_mask, to_class_coords
from jaxattn.planned import _from_classes, _to_classes, merge_partials, plan_for, planning
from pallas_kernels.metadata import EMPTY, FULL

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
N32K = 32768


def leaves():
    small, offsets = st.integers(0, 12), st.integers(-9, 9)
    return st.one_of(
        st.just(M.FullMask()),
        st.builds(M.CausalMask, offsets),
        st.builds(M.LocalMask, st.none() | small, st.none() | small, offsets),
        st.builds(M.StridedMask, st.sampled_from([2, 3, 4, 6, 8]), offsets),
        st.builds(M.GlobalMask, st.integers(0, 5)),
    )


MASKS = st.recursive(leaves(), lambda sub: st.tuples(sub, sub, st.booleans()).map(
    lambda t: t[0] & t[1] if t[2] else t[0] | t[1]), max_leaves=4)


@SETTINGS
@given(MASKS, st.sampled_from([2, 3, 4, 8]), st.sampled_from([1, 1, 2, 4]), st.integers(-5, 5),
       st.integers(1, 40), st.integers(1, 40))
def test_class_coordinates_match_the_dense_mask(mask, stride, times, offset, q_len, kv_len):
    """On the pairs of each residue class, the natural mask equals the class mask; also
    for a layout whose stride divides the strided mask's (times > 1: the class mask is
    strided itself)."""
    layout = Residue(stride, (-offset) % stride)
    term = M.StridedMask(stride * times, offset) & mask
    got = to_class_coords(term, layout)
    assume(got is not None)
    natural = term.to_dense(q_len, kv_len)
    tq, tk = layout.class_lengths(q_len, kv_len)
    cls = np.zeros((tq, tk), bool) if got is EMPTY_MASK else got.to_dense(tq, tk)
    for r in range(stride):
        i = np.arange(tq)[:, None] * stride + r
        j = np.arange(tk)[None, :] * stride + r - layout.pre
        real = (i < q_len) & (j >= 0) & (j < kv_len)
        want = natural[np.clip(i, 0, q_len - 1), np.clip(j, 0, kv_len - 1)]
        np.testing.assert_array_equal(np.where(real, cls, False), np.where(real, want, False))
    # The term has no pair outside its classes.
    i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    assert not natural[(i - (j + layout.pre)) % stride != 0].any()


@SETTINGS
@given(MASKS, st.integers(1, 70), st.integers(1, 70), st.sampled_from([4, 8, 16]), st.sampled_from([4, 8, 16]))
def test_parts_partition_the_mask(mask, q_len, kv_len, bq, bk):
    """Each allowed pair is in exactly one part, and a chosen plan visits fewer tiles."""
    plan = plan_mask(mask, q_len, kv_len, bq, bk)
    if not plan.planned:
        return
    assert plan.tiles < plan.plain_tiles
    count = sum(p.mask.to_dense(q_len, kv_len).astype(int) for p in plan.parts)
    np.testing.assert_array_equal(count, mask.to_dense(q_len, kv_len).astype(int))


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 30), st.integers(1, 3), st.sampled_from([1, 2, 3, 5, 8]),
       st.integers(0, 7), st.booleans())
def test_residue_permutation_and_its_inverse(b, length, k, stride, front, heads):
    front %= stride
    heads = heads and front == 0 and length % stride == 0
    classes = -(-(length + front) // stride)
    x = np.arange(b * length * k, dtype=np.float32).reshape(b, length, k, 1) + 1
    y = np.asarray(_to_classes(x, stride, classes, front, heads))
    y = y.reshape(b, classes, stride, k) if heads else y.reshape(b, stride, classes, k).transpose(0, 2, 1, 3)
    # Row p of class r holds position p·stride + r - front (0 = padding).
    pos = np.arange(classes)[:, None] * stride + np.arange(stride)[None, :] - front
    real = (pos >= 0) & (pos < length)
    want = np.where(real[None, :, :, None], np.asarray(x)[..., 0][:, np.clip(pos, 0, length - 1)], 0)
    np.testing.assert_array_equal(y, want)
    if front == 0:  # the inverse, for an output [B, T, N, H] and its lse [B, N, T]
        lse_cls = np.swapaxes(_to_classes(x, stride, classes, 0, heads)[..., 0], 1, 2)
        out, lse = _from_classes(_to_classes(x, stride, classes, 0, heads), lse_cls, b, stride, length, heads)
        np.testing.assert_array_equal(out, x)
        np.testing.assert_array_equal(lse, np.swapaxes(x[..., 0], 1, 2))


@jax.jit
def _whole_and_merged(q, k, v, allowed, split):
    """Reference attention under `allowed` and the merge of its parts split[p] & allowed
    (split: an int per pair naming its part); values and gradients of both."""
    def attend(q, k, v, m):
        return jaxattn.dot_product_attention(q, k, v, mask=M.DenseMask(m), implementation="reference",
                                             return_residuals=True)

    def loss(q, k, v, merged):
        if merged:
            out, lse = merge_partials([attend(q, k, v, allowed & (split == p)) for p in range(3)])
        else:
            out, lse = attend(q, k, v, allowed)
        return jnp.sum(out * jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0)), (out, lse)
    return [jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, merged)
            for merged in (False, True)]


@settings(SETTINGS, max_examples=15)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.1, 0.6]))
def test_merging_a_split_equals_the_whole(seed, empty_rows):
    """A mask split into three disjoint parts (some rows empty in some parts or in all)
    merges to exactly the whole: output, lse and gradients, never NaN."""
    rng = np.random.default_rng(seed)
    allowed = (rng.random((1, 2, 12, 10)) < 0.5) & (rng.random((1, 1, 12, 1)) >= empty_rows)
    split = rng.integers(0, 3, (1, 2, 12, 10))
    ks = jax.random.split(jax.random.key(seed % 1000), 3)
    q = jax.random.normal(ks[0], (1, 12, 2, 8))
    k, v = (jax.random.normal(x, (1, 10, 1, 8)) for x in ks[1:])
    (whole, g_whole), (merged, g_merged) = _whole_and_merged(q, k, v, jnp.asarray(allowed), jnp.asarray(split))
    for a, b in zip(jax.tree_util.tree_leaves((whole, g_whole)), jax.tree_util.tree_leaves((merged, g_merged))):
        assert not jnp.isnan(b).any()
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_not_mask_tile_states_hold_for_the_dense_matrix():
    inner = (M.LocalMask(5, 2) | M.GlobalMask(3)) & M.CausalMask()
    mask = NotMask(inner)
    dense = mask.to_dense(41, 37)
    np.testing.assert_array_equal(dense, ~inner.to_dense(41, 37))
    got = np.asarray(mask.tile_state(41, 37, 8, 8))
    want = dense_tile_states(dense, 8, 8)
    assert np.all((got == want) | (got == 1))  # exact, or PARTIAL (conservative)
    assert np.all(got[want == FULL] != EMPTY) and np.all(got[want == EMPTY] != FULL)


@pytest.mark.parametrize("mask, plain, planned", [
    (M.StridedMask(256) & M.CausalMask(), 33024, 512),
    ((M.LocalMask(256, 0) | M.StridedMask(256)) & M.CausalMask(), 33534, 2042),
    (M.LocalMask(2048, 0) & M.StridedMask(4), 8432, 2480),
    (M.LocalMask(256, 0) & M.CausalMask(), 1530, None),  # already banded: no plan
])
def test_issue_table_plans(mask, plain, planned):
    plan = plan_mask(mask, N32K, N32K, 128, 64)
    assert plan.plain_tiles == plain
    assert (plan.tiles if plan.planned else None) == planned


def test_plan_is_chosen_only_when_it_visits_fewer_tiles():
    # 64 classes of one tile each against a 2x2 causal tile walk: the walk wins.
    assert not plan_mask(M.StridedMask(64) & M.CausalMask(), 64, 64, 32, 32).planned
    assert plan_mask(M.StridedMask(4) & M.CausalMask(), 256, 256, 32, 32).planned
    mask = M.StridedMask(8) & M.CausalMask()
    x = jax.ShapeDtypeStruct((1, 512, 2, 16), jnp.float32)
    assert plan_for(mask, x, x, "pallas_triton") is not None
    for impl in ("reference", "xla", "cudnn", None):  # None is the reference on a CPU
        assert plan_for(mask, x, x, impl) is None
    with planning(False):
        assert plan_for(mask, x, x, "pallas_triton") is None
    assert plan_for(M.LocalMask(8, 0) & M.CausalMask(), x, x, "pallas_triton") is None


def test_explain_shows_layouts_parts_and_tiles():
    e = explain((M.LocalMask(256, 0) | M.StridedMask(256)) & M.CausalMask(), N32K)
    text = str(e)
    assert e.allowed_pairs == sum(e.part_pairs) == 10436736
    for line in ("plain tile walk: 33534 tiles visited", "plan: 2 part(s), 2042 tiles visited",
                 "natural order; 1530 tiles", "residue mod 256: 256 classes of T=128 S=128",
                 "merged by log-sum-exp", "density 0.972%"):
        assert line in text, text
    # StridedMask(256)'s classes at 4k are 16 rows: mod 64 they are 64 rows, strided by 4
    longer = str(explain(M.LocalMask(256, 256) | M.StridedMask(256), 4096))
    assert "residue mod 64: 64 classes of T=64 S=64" in longer and "372 tiles visited" in longer, longer
    small = explain(M.StridedMask(3, offset=1) & M.LocalMask(20, 4), 70, 61, block_q=8, block_kv=8)
    assert small.plan.planned and "keys shifted by 2" in str(small)
    assert small.allowed_pairs == int(small.plan.mask.to_dense(70, 61).sum())
    assert "no layout visits fewer tiles" in str(explain(M.CausalMask(), 64))
    with pytest.raises(ValueError, match="static jaxattn.masks.Mask"):
        explain(M.SegmentMask(jnp.zeros((1, 8), jnp.int32)), 8)
