"""GPU tier: the Pallas-Triton kernels at real sizes on a CUDA GPU (skipped on CPU).

Values and gradients against the float32 reference on the same bf16 inputs; the
tolerance is relative (‖got − ref‖ / ‖ref‖), in line with bf16 operands (1e-3 .. 1e-2).
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import masks as M

pytestmark = pytest.mark.gpu

CASES = {
    "full": (M.FullMask(), 1024, 1024),
    "causal": (M.CausalMask(), 2048, 2048),
    "causal_window": (M.CausalMask() & M.LocalMask(256, 0), 2048, 2048),
    "bigbird": (M.bigbird_mask(2048, window=256, num_global=64, num_random_blocks=2,
                               block_size=128, causal=True), 2048, 2048),
    "documents": (M.causal_document_mask(jnp.asarray(np.repeat(np.arange(5), [100, 700, 48, 900, 300])[None])),
                  2048, 2048),
    "ragged_t_ne_s": (M.CausalMask(offset=77), 1000, 1077),
}


def _rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(128, 4, 2), (64, 2, 2), (96, 2, 1)])
def test_values_and_grads_vs_reference(name, head_dim, heads, kv_heads):
    mask, t, s = CASES[name]
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2 if name != "documents" else 1, t, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(ks[1], (q.shape[0], s, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(ks[2], k.shape, jnp.bfloat16)
    do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    _assert_matches_reference(mask, q, k, v, do)


def test_per_head_dense_mask_under_gqa():
    # A per-query-head mask under GQA: the dK/dV kernel reads head g of its group from
    # per-head tile tables and mask tiles (this once failed to lower on a GPU).
    rng = np.random.default_rng(3)
    mask = M.DenseMask(np.tril(rng.random((1, 4, 1024, 1024)) < 0.6))
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (1, 1024, 4, 64), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, 1024, 2, 64), jnp.bfloat16)
    v = jax.random.normal(ks[2], k.shape, jnp.bfloat16)
    _assert_matches_reference(mask, q, k, v, jax.random.normal(ks[3], q.shape, jnp.bfloat16))


def _assert_matches_reference(mask, q, k, v, do):
    def run(impl, q, k, v):
        def loss(q, k, v):
            o = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, o), g = run("pallas_triton", q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, o_ref), g_ref = run("reference", *f32)
    assert not jnp.isnan(o).any()
    assert _rel(o, o_ref) < 1e-2
    for got, want in zip(g, g_ref):
        assert _rel(got, want) < 2e-2


def test_backward_is_bitwise_deterministic():
    mask = M.CausalMask() & M.LocalMask(512, 0)
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (1, 4096, 8, 128), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, 4096, 2, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, 4096, 2, 128), jnp.bfloat16)
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jaxattn.dot_product_attention(
        q, k, v, mask=mask, implementation="pallas_triton").astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
    a, b = f(q, k, v), f(q, k, v)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("bias_shape", [(1, 4, 1024, 1024), (1024, 1024), (1, 1, 1, 1024)])
def test_bias_values_and_grads_vs_reference(bias_shape):
    ks = jax.random.split(jax.random.key(2), 5)
    q = jax.random.normal(ks[0], (1, 1024, 4, 128), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, 1024, 2, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], k.shape, jnp.bfloat16)
    do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    bias = jax.random.normal(ks[4], bias_shape, jnp.float32)

    def run(impl, q, k, v, bias):
        def loss(q, k, v, bias):
            o = jaxattn.dot_product_attention(q, k, v, bias, is_causal=True, implementation=impl)
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)

    (_, o), g = run("pallas_triton", q, k, v, bias)
    (_, o_ref), g_ref = run("reference", *(x.astype(jnp.float32) for x in (q, k, v)), bias)
    assert _rel(o, o_ref) < 1e-2
    for got, want in zip(g, g_ref):
        assert _rel(got, want) < 2e-2
