"""Parity with jax.nn.dot_product_attention and Flax's attention, item by item: masks are
boolean everywhere (a float mask is refused, never flipped), traced scales, empty
sequences, implementation sequences, unbatched inputs and jax.vmap, sequence lengths,
precision, attention weights on request, dropout, and rank-promotion-clean code.

Small shapes; bodies under jit; pallas_triton runs in interpret mode on the CPU."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxattn
from jaxattn import api, masks
from jaxattn.layers import LinenMultiHeadAttention, MultiHeadAttention, attention_fn

B, T, S, N, K, H = 2, 5, 7, 4, 2, 8
TRITON = "pallas_triton"
# np.packbits of jaxattn.dropout.dropout_keep(uint32(7), (1, 2, 4, 8), 0.5): the hash is a
# contract between the reference and the kernels, and a seed must keep meaning one mask.
PINNED_KEEP_BITS = [87, 156, 120, 107, 159, 30, 86, 216]


def _qkv(seed=0, t=T, s=S, dtype=np.float32):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal(shape), dtype)
                 for shape in ((B, t, N, H), (B, s, K, H), (B, s, K, H)))


# --- 1. masks: boolean only; a float (additive) mask is refused, never cast -----------------
def test_additive_float_mask_is_refused_by_the_layers_not_flipped():
    """The newcomer's case: jnp.where(causal, 0, -inf) cast to bool is the anti-causal
    mask (0 -> False, -inf -> True). Every entry point must refuse it and point to bias=."""
    causal = jnp.tril(jnp.ones((T, T), bool))
    additive = jnp.where(causal, 0.0, -jnp.inf)
    x = jnp.ones((B, T, 16))
    layer = MultiHeadAttention(num_heads=4, in_features=16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"mask must be boolean .*got dtype float32.*bias="):
        layer(x, mask=additive)
    linen_layer = LinenMultiHeadAttention(num_heads=4)
    with pytest.raises(ValueError, match=r"mask must be boolean .*bias="):
        linen_layer.init(jax.random.key(0), x, mask=additive)
    q, k, v = _qkv(t=T, s=T)
    with pytest.raises(ValueError, match=r"mask must be boolean .*bias="):
        jaxattn.dot_product_attention(q, k, v, mask=additive)
    with pytest.raises(ValueError, match=r"mask \(with values other than 0 and 1\) must be boolean .*bias="):
        attention_fn()(q, k, v, mask=additive[None, None])
    # The bool mask the user meant, and the additive mask as a bias, agree.
    want = jaxattn.dot_product_attention(q, k, v, mask=causal)
    np.testing.assert_allclose(jaxattn.dot_product_attention(q, k, v, bias=additive), want, atol=1e-6)
    np.testing.assert_allclose(layer(x, mask=causal), layer(x, mask=jnp.asarray(causal)), atol=0)


def test_attention_fn_reads_flax_float_and_int_masks_as_flax_does():
    """Flax's make_attention_mask / combine_masks return float32 0/1 by default: nonzero = attend."""
    q, k, v = _qkv(1, t=T, s=T)
    causal = nnx.make_causal_mask(jnp.ones((B, T)))  # float32 [B, 1, T, T]
    want = jaxattn.dot_product_attention(q, k, v, is_causal=True)
    fn = attention_fn()
    np.testing.assert_allclose(fn(q, k, v, mask=causal), want, atol=1e-6)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v, mask=causal.astype(jnp.int32)), want, atol=1e-6)


# --- 2. scale: a traced scalar works (values and gradients) ---------------------------------
@pytest.mark.parametrize("implementation", ["reference", TRITON])
def test_traced_scale_values_and_gradients(implementation):
    q, k, v = _qkv(2)

    def loss(scale, q, impl):
        out = jaxattn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=impl)
        return jnp.sum(out * out)

    @jax.jit
    def run(scale):
        got = jax.value_and_grad(loss, argnums=(0, 1))(scale, q, implementation)
        want = jax.value_and_grad(loss, argnums=(0, 1))(scale, q, "reference")
        return got, want

    (v_got, (ds_got, dq_got)), (v_want, (ds_want, dq_want)) = run(jnp.float32(0.4))
    np.testing.assert_allclose(v_got, v_want, rtol=1e-5)
    np.testing.assert_allclose(ds_got, ds_want, rtol=1e-4)
    np.testing.assert_allclose(dq_got, dq_want, atol=1e-5)
    static = jaxattn.dot_product_attention(q, k, v, scale=0.4, is_causal=True, implementation="reference")
    np.testing.assert_allclose(jnp.sum(static * static), v_want, rtol=1e-6)
    # A concrete jnp scalar takes the static path.
    np.testing.assert_allclose(jaxattn.dot_product_attention(q, k, v, scale=jnp.float32(0.4), is_causal=True),
                               static, atol=1e-6)


# --- 3. empty sequences ---------------------------------------------------------------------
@pytest.mark.parametrize("t,s", [(0, S), (T, 0), (0, 0)])
def test_empty_sequences_give_empty_results_like_jax_nn(t, s):
    q, k, v = _qkv(3, t=t, s=s)
    out, lse = jaxattn.dot_product_attention(q, k, v, return_residuals=True)
    assert out.shape == (B, t, N, H) and lse.shape == (B, N, t)
    np.testing.assert_array_equal(out, 0)
    assert bool(jnp.all(jnp.isneginf(lse)))
    dq = jax.grad(lambda q: jaxattn.dot_product_attention(q, k, v).sum())(q)
    np.testing.assert_array_equal(dq, 0)
    if t:  # jax.nn agrees on the shape
        assert jax.nn.dot_product_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2)).shape == out.shape


# --- 4. implementation sequences --------------------------------------------------------------
def test_implementation_sequence_tries_in_order_and_reports_each_decline():
    q, k, v = _qkv(4)
    got = jaxattn.dot_product_attention(q, k, v, implementation=("pallas_mosaic_gpu", "reference"))
    np.testing.assert_allclose(got, jaxattn.dot_product_attention(q, k, v), atol=0)
    with pytest.raises(NotImplementedError, match=r"pallas_mosaic_gpu: .*; cudnn: .*CUDA GPU"):
        jaxattn.dot_product_attention(q, k, v, implementation=["pallas_mosaic_gpu", "cudnn"])


# --- 5a. unbatched inputs and jax.vmap --------------------------------------------------------
@pytest.mark.parametrize("implementation", ["reference", TRITON])
def test_unbatched_inputs_and_vmap(implementation):
    q, k, v = _qkv(5)
    mask = jnp.asarray(np.random.default_rng(5).random((T, S)) < 0.7)

    @jax.jit
    def run(q, k, v):
        batched = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=implementation,
                                                return_residuals=True)
        one = jaxattn.dot_product_attention(q[1], k[1], v[1], mask=mask, implementation=implementation,
                                            return_residuals=True)
        mapped = jax.vmap(lambda q, k, v: jaxattn.dot_product_attention(
            q, k, v, mask=mask, implementation=implementation))(q, k, v)
        grads = jax.vmap(jax.grad(lambda q, k, v: jaxattn.dot_product_attention(
            q, k, v, mask=mask, implementation=implementation).sum()))(q, k, v)
        return batched, one, mapped, grads

    (out, lse), (out1, lse1), mapped, grads = run(q, k, v)
    assert out1.shape == (T, N, H) and lse1.shape == (N, T)
    np.testing.assert_allclose(out1, out[1], atol=1e-6)
    np.testing.assert_allclose(lse1, lse[1], atol=1e-6)
    np.testing.assert_allclose(mapped, out, atol=1e-6)
    want = jax.grad(lambda q: jaxattn.dot_product_attention(q, k, v, mask=mask).sum())(q)
    np.testing.assert_allclose(grads, want, atol=1e-5)


# --- 5b. sequence lengths ---------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["reference", TRITON])
def test_sequence_lengths_match_jax_nn(implementation):
    q, k, v = _qkv(6)
    q_lengths, kv_lengths = jnp.array([3, 5], jnp.int32), jnp.array([7, 2], jnp.int32)

    @jax.jit
    def run(q_lengths, kv_lengths):  # traced lengths
        return jaxattn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=q_lengths,
                                             key_value_seq_lengths=kv_lengths, implementation=implementation)

    got = run(q_lengths, kv_lengths)
    want = jax.nn.dot_product_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), is_causal=True,
                                        query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths)
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_array_equal(got[0, 3:], 0)  # padded query rows return 0, as in jax.nn


def test_length_mask_tiles_are_exact_so_padding_is_skipped():
    m = masks.LengthMask(jnp.array([4, 8]), jnp.array([9, 2]), q_len=8, kv_len=12)
    dense = np.asarray(m.to_dense(8, 12))
    i, j = np.arange(8)[:, None], np.arange(12)[None, :]
    np.testing.assert_array_equal(dense[0], (i < 4) & (j < 9))
    np.testing.assert_array_equal(dense[1], (i < 8) & (j < 2))
    meta = masks.build_block_metadata(m, 8, 12, 4, 4)
    # Batch 0: q-block 0 sees kv-blocks 0, 1 (FULL) and 2 (PARTIAL: keys 8..11, 9 real);
    # q-block 1 (rows 4..7, all padding) visits nothing.
    np.testing.assert_array_equal(meta.full_count[0, 0], [2, 0])
    np.testing.assert_array_equal(meta.partial_count[0, 0], [1, 0])
    np.testing.assert_array_equal(meta.full_count[1, 0], [0, 0])
    np.testing.assert_array_equal(meta.partial_count[1, 0], [1, 1])


# --- 5c. rank promotion ---------------------------------------------------------------------
def test_clean_under_rank_promotion_raise():
    q, k, v = _qkv(7)
    mask = jnp.asarray(np.random.default_rng(7).random((B, 1, T, S)) < 0.7)
    with jax.numpy_rank_promotion("raise"):
        want = jaxattn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=(3, 1),
                                             query_seq_lengths=jnp.array([4, 5], jnp.int32))
        got = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=TRITON)
    np.testing.assert_allclose(got, jaxattn.dot_product_attention(q, k, v, mask=mask), atol=2e-6)
    assert want.shape == (B, T, N, H)


# --- 5d. precision --------------------------------------------------------------------------
def test_precision_reaches_the_reference_matmuls_and_gpu_kernels_decline_float32(monkeypatch):
    q, k, v = _qkv(8)
    jaxpr = str(jax.make_jaxpr(lambda q: jaxattn.dot_product_attention(
        q, k, v, precision=jax.lax.Precision.HIGHEST))(q))
    assert jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 2
    want = jaxattn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(jaxattn.dot_product_attention(q, k, v, precision="highest",
                                                             implementation=TRITON), want, atol=2e-6)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    reason = api._decline_reason(TRITON, q, precision=jax.lax.Precision.HIGHEST, dropout_rate=0.0)
    assert "TF32" in reason
    assert api._decline_reason(TRITON, q.astype(jnp.bfloat16), precision=jax.lax.Precision.HIGHEST,
                               dropout_rate=0.0) is None


# --- 5e. attention weights and dropout in Flax's layers ------------------------------------
def test_sow_weights_gives_flax_weights_with_a_memory_warning():
    x = jnp.asarray(np.random.default_rng(9).standard_normal((B, T, 16)), jnp.float32)
    layers = [nnx.MultiHeadAttention(num_heads=4, in_features=16, decode=False, rngs=nnx.Rngs(0),
                                     **kw) for kw in ({}, {"attention_fn": attention_fn()})]
    captured = []
    for layer in layers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, inter = nnx.capture(layer, nnx.Intermediate)(x, sow_weights=True)
        captured.append((out, inter["attention_weights"][0], caught))
    (out_f, w_f, _), (out_j, w_j, caught) = captured
    np.testing.assert_allclose(w_j, w_f, atol=1e-6)
    np.testing.assert_allclose(out_j, out_f, atol=1e-5)
    assert any("O(T·S) memory" in str(w.message) for w in caught)


def test_attention_dropout_is_reproducible_and_the_triton_kernels_compute_it():
    q, k, v = _qkv(10)

    @jax.jit
    def run(seed):
        return [jaxattn.dot_product_attention(q, k, v, dropout_rate=0.4, dropout_seed=seed,
                                              implementation=impl) for impl in ("reference", TRITON)]
    (a, a_kernel), (b, _), (c, _) = run(jnp.uint32(1)), run(jnp.uint32(1)), run(jnp.uint32(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(a_kernel, a, atol=2e-6)   # the same keep-mask
    keep = jaxattn.dropout.dropout_keep(jnp.uint32(1), (8, 8, 64, 64), 0.4)
    assert abs(float(keep.mean()) - 0.6) < 0.01
    # The keep-mask is part of the contract (kernels regenerate it): pinned bits.
    bits = np.packbits(np.asarray(jaxattn.dropout.dropout_keep(jnp.uint32(7), (1, 2, 4, 8), 0.5)))
    assert bits.tolist() == PINNED_KEEP_BITS
    # jax.nn's implementations decline it, saying so (the Mosaic GPU kernels' refusal:
    # tests/test_mosaic_gpu.py).
    with pytest.raises(NotImplementedError, match="jax.nn.dot_product_attention has no attention dropout"):
        jaxattn.dot_product_attention(q, k, v, dropout_rate=0.4, dropout_seed=1, implementation="xla")
    # Flax's linen layer with attention dropout runs through attention_fn, on the kernels
    # as on the reference (the same rng gives the same seed, hence the same output).
    x = jnp.ones((B, T, 16))
    layers = [nn.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.5, deterministic=False,
                                              attention_fn=attention_fn(implementation=impl))
              for impl in ("reference", TRITON)]
    params = layers[0].init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    apply = jax.jit(lambda key: [layer.apply(params, x, rngs={"dropout": key}) for layer in layers])
    (y1, y1_kernel), (y2, _), (y3, _) = (apply(jax.random.key(i)) for i in (2, 2, 3))
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, y3)
    np.testing.assert_allclose(y1_kernel, y1, atol=2e-6)


def test_attention_fn_validates_shapes_before_declining():
    q = jnp.ones((2, 16, 4, 8))
    fn = attention_fn()
    for k_shape, v_shape, words in [((16, 4, 8), (16, 4, 8), "same rank"),
                                    ((3, 16, 4, 8), (3, 16, 4, 8), "batch dims must match"),
                                    ((2, 16, 4, 8), (2, 15, 4, 8), "lengths must match"),
                                    ((2, 16, 4, 7), (2, 16, 4, 8), "depths must match")]:
        with pytest.raises(ValueError, match=words):
            fn(q, jnp.ones(k_shape), jnp.ones(v_shape), dropout_rate=0.1, dropout_rng=jax.random.key(0),
               qk_attn_weights_einsum=object())
    with pytest.raises(ValueError, match="must be a multiple"):
        fn(jnp.ones((1, 4, 5, 8)), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)))
    with pytest.raises(ValueError, match=r"dropout_rate must be in the range \[0, 1\)"):
        fn(q, q, q, dropout_rate=1.0, deterministic=False, dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match="dropout_rng is required"):
        fn(q, q, q, dropout_rate=0.5, deterministic=False)
