"""score_mod and sinks outside the kernel suite: their definition in the reference (sinks
against an explicit extra column, recipes against the bias= path), the recipes, and the
errors. The kernels are held to the reference in tests/kernel_suite.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks as M
from jaxattn.score_recipes import relative_position_bucket


def qkv(seed, b=2, t=9, s=13, n=4, k=2, h=8, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
                 for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))


def explicit_sink_column(q, k, v, allowed, sinks):
    """Attention with the sink appended as one more key column (logit sinks[n], value 0),
    the definition written out in float64 numpy. allowed: bool [T, S]."""
    q, k, v, sinks = (np.asarray(x, np.float64) for x in (q, k, v, sinks))
    b, t, n, h = q.shape
    g = n // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    logits = np.where(allowed, logits, -np.inf)
    sink_col = np.broadcast_to(sinks[None, :, None, None], (b, n, t, 1))
    full = np.concatenate([logits, sink_col], axis=-1)
    lse = np.log(np.sum(np.exp(full - full.max(-1, keepdims=True)), -1)) + full.max(-1)
    p = np.exp(full - lse[..., None])[..., :-1]
    return np.einsum("bnts,bsnh->btnh", p, v), lse


def test_sinks_equal_an_explicit_sink_column_with_masks_gqa_and_empty_rows():
    q, k, v = qkv(0)
    allowed = np.random.default_rng(1).random((9, 13)) < 0.4
    allowed[[0, 5]] = False                       # rows with no key: only the sink
    sinks = jnp.array([0.0, 2.0, -1.0, 0.5])
    out, lse = jaxattn.dot_product_attention(q, k, v, mask=M.DenseMask(allowed), sinks=sinks,
                                             implementation="reference", return_residuals=True)
    want_out, want_lse = explicit_sink_column(q, k, v, allowed, sinks)
    np.testing.assert_allclose(out, want_out, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, atol=2e-6)
    assert np.all(np.asarray(out)[:, [0, 5]] == 0)


def test_sink_gradient_equals_the_explicit_column_gradient():
    q, k, v = qkv(2, t=6, s=6)
    causal = np.tril(np.ones((6, 6), bool))
    do = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)

    def ours(sinks):
        out = jaxattn.dot_product_attention(q, k, v, is_causal=True, sinks=sinks, implementation="reference")
        return jnp.sum(out * do)

    def explicit(sinks):   # the same in jnp, sink as a column of the softmax
        g = 2
        kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        logits = jnp.einsum("btnh,bsnh->bnts", q, kk) / jnp.sqrt(8.0)
        logits = jnp.where(causal, logits, -jnp.inf)
        full = jnp.concatenate([logits, jnp.broadcast_to(sinks[None, :, None, None], (2, 4, 6, 1))], -1)
        p = jax.nn.softmax(full, axis=-1)[..., :-1]
        return jnp.sum(jnp.einsum("bnts,bsnh->btnh", p, vv) * do)

    sinks = jnp.array([0.1, -0.3, 1.2, 0.0])
    got, want = jax.jit(lambda s: (jax.grad(ours)(s), jax.grad(explicit)(s)))(sinks)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sinks_validation_and_jax_nn_declines():
    q, k, v = qkv(0)
    with pytest.raises(ValueError, match=r"sinks: expected shape \[N\] = \[4\]"):
        jaxattn.dot_product_attention(q, k, v, sinks=jnp.zeros((2,)))
    with pytest.raises(ValueError, match="float array"):
        jaxattn.dot_product_attention(q, k, v, sinks=jnp.zeros((4,), jnp.int32))
    with pytest.raises(NotImplementedError, match="no gradient"):
        jaxattn.dot_product_attention(q, k, v, sinks=jnp.zeros((4,)), implementation="xla")
    with pytest.raises(NotImplementedError, match="score_mod"):
        jaxattn.dot_product_attention(q, k, v, score_mod=jaxattn.soft_cap(5.0), implementation="xla")


def _both(q, k, v, mask, **kw):
    """Reference and Triton kernels (interpret mode) on one call, in one jit."""
    @jax.jit
    def f(q, k, v):
        return tuple(jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl, **kw)
                     for impl in ("reference", "pallas_triton"))
    return f(q, k, v)


def test_soft_cap_recipe_equals_logits_soft_cap():
    q, k, v = qkv(4, t=40, s=40)
    q = q * 4.0   # logits well into the cap's curved range

    @jax.jit
    def f(q, k, v):
        return [[jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl, **kw)
                 for impl in ("reference", "pallas_triton")]
                for kw in (dict(score_mod=jaxattn.soft_cap(2.0)), dict(logits_soft_cap=2.0))]
    got, want = f(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-6)


def test_alibi_and_relative_buckets_equal_the_bias_path():
    b, t, s, n = 2, 37, 45, 4
    q, k, v = qkv(5, b=b, t=t, s=s, n=n)
    i, j = np.arange(t)[:, None], np.arange(s)[None]
    slopes = jaxattn.alibi_slopes(n)
    table = np.random.default_rng(6).standard_normal((n, 8)).astype(np.float32)
    buckets = np.asarray(relative_position_bucket(j - i, num_buckets=8, max_distance=20))
    cases = [   # (alibi's symmetric form differs only in its formula: tested on the reference below)
        (jaxattn.alibi(slopes), slopes[:, None, None] * (j - i)),
        (jaxattn.relative_position_buckets(table, max_distance=20), table[:, buckets]),
    ]
    mask = M.LocalMask(9, 4)
    for score_mod, bias in cases:
        got = _both(q, k, v, mask, score_mod=score_mod)
        want = jaxattn.dot_product_attention(q, k, v, jnp.asarray(bias[None], jnp.float32), mask=mask,
                                             implementation="reference")
        for x in got:
            np.testing.assert_allclose(x, want, atol=2e-6)


def test_symmetric_alibi_is_minus_slope_times_distance():
    q, k, v = qkv(9)
    i, j = np.arange(9)[:, None], np.arange(13)[None]
    slopes = jaxattn.alibi_slopes(4)
    got = jaxattn.dot_product_attention(q, k, v, score_mod=jaxattn.alibi(slopes, symmetric=True),
                                        implementation="reference")
    bias = jnp.asarray((-slopes[:, None, None] * np.abs(i - j))[None], jnp.float32)
    np.testing.assert_allclose(got, jaxattn.dot_product_attention(q, k, v, bias, implementation="reference"),
                               atol=2e-6)


def test_relative_position_bucket_matches_t5_values():
    # T5 (32 buckets, max distance 128, bidirectional): 16 buckets per direction, exact up to 8.
    rel = jnp.array([0, -1, -7, -8, -20, -127, -1000, 1, 8, 1000])
    got = relative_position_bucket(rel, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(got, [0, 1, 7, 8, 10, 15, 15, 17, 24, 31])


def test_alibi_slopes_are_the_papers():
    np.testing.assert_allclose(jaxattn.alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-6)
    assert jaxattn.alibi_slopes(12).shape == (12,)


def test_plain_callable_recipes_hash_and_pytree():
    q, k, v = qkv(7)
    fn = lambda s, b, h, i, j: s * 0.5  # noqa: E731
    a = jaxattn.dot_product_attention(q, k, v, score_mod=fn, implementation="reference")
    want = jaxattn.dot_product_attention(q, k, v, scale=0.5 / np.sqrt(8), implementation="reference")
    np.testing.assert_allclose(a, want, atol=1e-6)
    assert jaxattn.soft_cap(3.0) == jaxattn.soft_cap(3.0)
    assert hash(jaxattn.alibi(np.ones(4, np.float32))) == hash(jaxattn.alibi(np.ones(4, np.float32)))
    leaves, tree = jax.tree_util.tree_flatten(jaxattn.alibi(np.ones(4, np.float32)))
    assert len(leaves) == 1 and jax.tree_util.tree_unflatten(tree, leaves).fn == jaxattn.alibi(leaves[0]).fn
    with pytest.raises(TypeError, match="no truth value"):
        bool(jaxattn.soft_cap(3.0))


def test_impure_or_malformed_score_functions_get_clear_errors():
    q, k, v = qkv(8)

    @jax.jit
    def closes_over_tracer(q, k, v, temperature):
        return jaxattn.dot_product_attention(q, k, v, score_mod=lambda s, b, h, i, j: s * temperature)
    with pytest.raises(ValueError, match="reads a traced value by closure"):
        closes_over_tracer(q, k, v, jnp.float32(2.0))

    table = jnp.ones((4,))
    with pytest.raises(ValueError, match="by closure; the kernels cannot capture arrays"):
        jaxattn.dot_product_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + table[h])
    two = jnp.asarray(2.0)
    with pytest.raises(ValueError, match="or use a Python number"):   # a 0-d array too
        jaxattn.dot_product_attention(q, k, v, score_mod=lambda s, b, h, i, j: s * two)
    with pytest.raises(ValueError, match="one floating score per element"):
        jaxattn.dot_product_attention(q, k, v, score_mod=lambda s, b, h, i, j: (s, s))
    with pytest.raises(ValueError, match="expected 1 indices"):
        jaxattn.dot_product_attention(q, k, v, score_mod=jaxattn.ScoreMod(lambda s, b, h, i, j, x: s + x[h, 0],
                                                                          table))
    with pytest.raises(ValueError, match="callable"):
        jaxattn.ScoreMod(3.0)
    with pytest.raises(ValueError, match="expected an array"):
        jaxattn.ScoreMod(lambda s, *_: s, 3.0)
    with pytest.raises(ValueError, match="soft_cap"):
        jaxattn.soft_cap(-1.0)
