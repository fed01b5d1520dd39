"""Decode mode of the Flax layers: a prefill plus token-by-token (or chunked) steps through
the KV cache gives what one causal call over the whole sequence gives, with RoPE, GQA,
windows and prompts of different lengths; the example LM's greedy tokens from the cache
equal the tokens from recomputing the full sequence each step."""


import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import jaxattn
from jaxattn import masks as M
from jaxattn.layers import Decoder, LinenMultiHeadAttention, MultiHeadAttention
from helpers import load_example

D, N, K = 16, 4, 2


def _x(t, b=2, seed=1):
    return np.random.default_rng(seed).standard_normal((b, t, D)).astype(np.float32)


def _nnx_layer(impl, **kw):
    return MultiHeadAttention(N, D, num_kv_heads=K, rope=True, is_causal=True, mask=M.LocalMask(4, 0),
                              logits_soft_cap=20.0, implementation=impl, rngs=nnx.Rngs(0), **kw)


@nnx.jit(static_argnames=("chunks",))
def _nnx_prefill_then_steps(layer, x, prompt_lengths, chunks):
    """Prefill x[:, :P] (row b's prompt is its first prompt_lengths[b] tokens), then feed
    the following tokens of every row in `chunks` (sizes). Returns each row's outputs in
    sequence order."""
    p = x.shape[1] - sum(chunks)
    outs = [layer(x[:, :p], decode=True, prefill_lengths=prompt_lengths)]
    # Row b continues from its own length: gather its next tokens.
    pos = prompt_lengths[:, None] + jnp.arange(sum(chunks))[None, :]
    rest = jnp.take_along_axis(x, pos[:, :, None], axis=1)
    start = 0
    for c in chunks:
        outs.append(layer(rest[:, start:start + c], decode=True))
        start += c
    return outs[0], jnp.concatenate(outs[1:], axis=1)


def test_nnx_decode_equals_one_causal_call():
    """Through the kernels (interpret mode): the flash forward for the prefill, the decode
    kernel for one token, then a chunk of two (Tq = 2)."""
    x = _x(8)
    layer = _nnx_layer("pallas_triton")
    full = layer(x)                                   # one causal call over all 8 tokens
    prompt_lengths = jnp.array([5, 3], jnp.int32)     # ragged prompts, right-padded to 5
    layer.init_cache((2, 12))
    chunks = (1, 2)
    prefill, steps = _nnx_prefill_then_steps(layer, x[:, :5 + sum(chunks)], prompt_lengths, chunks)
    for row, p in enumerate([5, 3]):
        np.testing.assert_allclose(prefill[row, :p], full[row, :p], atol=1e-5)
        np.testing.assert_allclose(steps[row], full[row, p:p + sum(chunks)], atol=1e-5)
    np.testing.assert_array_equal(layer.cache_lengths[...], np.array([5, 3]) + sum(chunks))


def test_nnx_decode_with_score_mod_equals_one_causal_call():
    """A score_mod sees the same positions in the prefill, in the cached steps and in one
    call over the whole sequence (the slots the tokens take), and its head index is the
    query head in GQA (the flash and decode kernels; the linen test below: the reference)."""
    x = _x(8)
    score_mod = jaxattn.alibi(jnp.asarray(jaxattn.alibi_slopes(N)) * 4.0)   # steep: positions matter
    layer = _nnx_layer("pallas_triton", score_mod=score_mod)
    full = layer(x)
    prompt_lengths = jnp.array([5, 3], jnp.int32)
    layer.init_cache((2, 12))
    prefill, steps = _nnx_prefill_then_steps(layer, x[:, :7], prompt_lengths, (1, 1))
    for row, p in enumerate([5, 3]):
        np.testing.assert_allclose(prefill[row, :p], full[row, :p], atol=1e-5)
        np.testing.assert_allclose(steps[row], full[row, p:p + 2], atol=1e-5)


def test_linen_decode_equals_one_causal_call():
    x = _x(8)
    layer = LinenMultiHeadAttention(N, num_kv_heads=K, rope=True, is_causal=True, mask=M.LocalMask(4, 0),
                                    implementation="reference",
                                    score_mod=jaxattn.alibi(jnp.asarray(jaxattn.alibi_slopes(N))))
    params = layer.init(jax.random.key(0), x)
    full = layer.apply(params, x)
    cache = layer.init(jax.random.key(0), jnp.zeros((2, 10, D)), decode=True)["cache"]
    assert cache["cached_key"].shape == (2, 10, K, D // N)

    @jax.jit
    def run(cache):
        out, upd = layer.apply({**params, "cache": cache}, x[:, :5], decode=True, prefill_lengths=5,
                               mutable=["cache"])
        outs = [out]
        for i in range(5, 8):
            out, upd = layer.apply({**params, **upd}, x[:, i:i + 1], decode=True, mutable=["cache"])
            outs.append(out)
        return jnp.concatenate(outs, axis=1), upd["cache"]["cache_lengths"]

    got, lengths = run(cache)
    np.testing.assert_allclose(got, full, atol=1e-5)
    np.testing.assert_array_equal(lengths, [8, 8])


def test_decode_errors():
    layer = _nnx_layer("reference")
    with pytest.raises(ValueError, match=r"the KV cache is not initialised. Call layer.init_cache"):
        layer(_x(1), decode=True)
    layer.init_cache((2, 4))
    with pytest.raises(ValueError, match=r"decode inputs: expected batch 2 and at most 4 tokens"):
        layer(_x(5), decode=True, prefill_lengths=5)
    with pytest.raises(ValueError, match=r"decode=True: expected self-attention without positions"):
        layer(_x(1), decode=True, positions=jnp.arange(1))


def _example():
    return load_example("long_range_lm")


def test_example_greedy_tokens_from_the_cache_equal_recomputing():
    ex = _example()
    model = Decoder(40, 32, 4, num_kv_heads=2, layer_masks=[M.LocalMask(6, 0), None],
                    implementation="reference", rngs=nnx.Rngs(3))
    prompt = np.random.default_rng(0).integers(0, 40, (2, 11)).astype(np.int32)
    cached = ex.generate(model, prompt, 4)
    recomputed = ex.generate_by_recomputing(model, prompt, 4)
    assert cached.shape == (2, 4)
    np.testing.assert_array_equal(cached, recomputed)
    # the flag reaches the generation report
    assert ex.parse_args(["--generate", "3"]).generate == 3
