"""Flax layers: the attention_fn adapter against Flax's own attention (values and
gradients), jaxattn's nnx and linen layers, the per-layer-mask decoder, and the example.

Small shapes, test bodies under jit, the reference implementation (one small test runs
pallas_triton when it is registered)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxattn
from jaxattn import masks
from jaxattn.layers import (Decoder, LinenMultiHeadAttention, MultiHeadAttention, apply_rope,
                            attention_fn, interleaved_pattern)
from helpers import load_example

B, T, D, N = 2, 12, 16, 4
TOL = dict(rtol=2e-5, atol=2e-5)


def _x(seed=0, shape=(B, T, D)):
    # numpy, not jax.random: eager jax.random compiles a kernel per shape (seconds in total)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _random_mask(seed=1, shape=(B, 1, T, T)):
    """A random dense mask whose every row attends somewhere (Flax and jaxattn differ on
    empty rows by design: the mean of the values there, zeros here)."""
    m = np.random.default_rng(seed).random(shape) < 0.6
    return jnp.asarray(m | np.eye(shape[-2], shape[-1], dtype=bool))


def _flax_nnx_mha(fn, num_kv_heads=None, **kw):
    return nnx.MultiHeadAttention(num_heads=N, in_features=D, num_kv_heads=num_kv_heads, decode=False,
                                  use_bias=False, attention_fn=fn, rngs=nnx.Rngs(0), **kw)


def _values_and_grads_nnx(layer, x, **call_kw):
    """Output and d(sum(out·w))/d(params, x), in one jit."""
    w = _x(7, (B, T, D))

    @nnx.jit
    def f(layer, x):
        def loss(layer, x):
            out = layer(x, **call_kw)
            return jnp.sum(out * w), out
        (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
        return out, grads
    return f(layer, x)


def _assert_tree_close(a, b, **tol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


# ------------------------------------------------------------------------------------------
# attention_fn inside Flax's own layers
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mha_dense_mask", "gqa_dense_mask_and_is_causal"])
def test_attention_fn_in_nnx_mha_matches_flax_default(case):
    kv = 2 if case.startswith("gqa") else None
    ours = _flax_nnx_mha(attention_fn(implementation="reference"), kv)
    theirs = _flax_nnx_mha(nnx.dot_product_attention, kv)
    x = _x()
    call = dict(mask=_random_mask(shape=(B, N, T, T)))
    if kv:
        call["is_causal"] = True
    out_a, grads_a = _values_and_grads_nnx(ours, x, **call)
    out_b, grads_b = _values_and_grads_nnx(theirs, x, **call)
    np.testing.assert_allclose(out_a, out_b, **TOL)
    assert float(jnp.abs(out_a).max()) > 0.1
    _assert_tree_close(grads_a, grads_b, **TOL)


def test_structured_mask_in_adapter_equals_flax_with_dense_equivalent():
    mask = masks.longformer_mask(2, 3, causal=True)
    dense = jnp.asarray(mask.to_dense(T, T))[None, None]
    ours = _flax_nnx_mha(attention_fn(mask, implementation="reference"))
    theirs = _flax_nnx_mha(nnx.dot_product_attention)
    x = _x(3)
    out_a, grads_a = _values_and_grads_nnx(ours, x)
    out_b, grads_b = _values_and_grads_nnx(theirs, x, mask=jnp.broadcast_to(dense, (B, N, T, T)))
    np.testing.assert_allclose(out_a, out_b, **TOL)
    _assert_tree_close(grads_a, grads_b, **TOL)
    # and the structure is really applied: without it the result differs
    assert not np.allclose(out_a, _flax_nnx_mha(attention_fn())(x), atol=1e-3)


def test_attention_fn_in_linen_mha_matches_flax_default():
    # linen passes only keywords named in the attention_fn's signature: a **kwargs-only
    # adapter would silently lose the mask, which this test would catch.
    ours = nn.MultiHeadDotProductAttention(num_heads=N, attention_fn=attention_fn(implementation="reference"))
    theirs = nn.MultiHeadDotProductAttention(num_heads=N)
    x, mask, w = _x(4), _random_mask(5), _x(6)
    params = jax.jit(theirs.init)(jax.random.key(0), x)

    @jax.jit
    def f(params, x):
        def loss(module, params, x):
            out = module.apply(params, x, mask=mask)
            return jnp.sum(out * w), out
        res = [jax.value_and_grad(functools.partial(loss, m), argnums=(0, 1), has_aux=True)(params, x)
               for m in (ours, theirs)]
        return [(out, g) for (_, out), g in res]

    (out_a, g_a), (out_b, g_b) = f(params, x)
    np.testing.assert_allclose(out_a, out_b, **TOL)
    _assert_tree_close(g_a, g_b, **TOL)
    assert not np.allclose(out_a, ours.apply(params, x), atol=1e-3)  # the mask mattered


def test_attention_fn_batch_dims_bias_and_rope_match_flax():
    q, kk, v = (_x(20 + i, (2, 3, T, N, 8)) for i in range(3))  # two batch dims
    mask = _random_mask(23, (1, 3, N, T, T))
    bias = _x(24, (2, 1, 1, T, T))
    ours, rope = attention_fn(implementation="reference"), nnx.RoPE()

    @jax.jit
    def both(q, kk, v, bias, mask):
        # Flax flattens the batch dims of mask and bias without broadcasting them: give it full ones
        full_mask, full_bias = jnp.broadcast_to(mask, (2, 3, N, T, T)), jnp.broadcast_to(bias, (2, 3, 1, T, T))
        q0, k0, v0 = q[0, 0], kk[0, 0], v[0, 0]  # no batch dim at all
        return ((ours(q, kk, v, bias, mask=mask), nnx.dot_product_attention(q, kk, v, full_bias, full_mask)),
                (ours(q0, k0, v0), nnx.dot_product_attention(q0, k0, v0)),
                (attention_fn(rope=rope)(q[0], kk[0], v[0], is_causal=True),
                 nnx.dot_product_attention_with_rope(q[0], kk[0], v[0], rope=rope, is_causal=True)))

    for got, want in both(q, kk, v, bias, mask):
        np.testing.assert_allclose(got, want, **TOL)


def test_attention_fn_refuses_what_it_cannot_honour():
    x = _x()
    q = jnp.ones((B, T, N, 4))
    fn = attention_fn()
    # Dropout, precision and sown weights are served (tests/test_api_parity.py); a named
    # implementation that has no dropout declines it rather than ignoring it.
    with pytest.raises(NotImplementedError, match="has no attention dropout"):
        _flax_nnx_mha(attention_fn(implementation="xla"), dropout_rate=0.1)(x, deterministic=False)
    # dropout configured but deterministic: allowed, equals the dropout-free layer
    np.testing.assert_allclose(_flax_nnx_mha(fn, dropout_rate=0.1)(x, deterministic=True),
                               _flax_nnx_mha(fn)(x), **TOL)
    np.testing.assert_allclose(fn(q, q, q, precision=jax.lax.Precision.HIGHEST), fn(q, q, q), **TOL)
    attention_fn(ignore_precision=True)(q, q, q, precision=jax.lax.Precision.HIGHEST)
    with pytest.raises(NotImplementedError, match="rope=nnx.RoPE"):
        fn(q, q, q, input_positions=jnp.arange(T))
    with pytest.raises(NotImplementedError, match=r"\['sinks'\]"):
        fn(q, q, q, sinks=jnp.ones(N))
    with pytest.raises(ValueError, match="structure goes here"):
        attention_fn(np.ones((T, T), bool))
    with pytest.raises(ValueError, match="mask holding jax arrays"):
        attention_fn(masks.SegmentMask(jnp.zeros((B, T), jnp.int32)))


# ------------------------------------------------------------------------------------------
# jaxattn's own layers
# ------------------------------------------------------------------------------------------
def test_nnx_layer_equals_flax_mha_with_same_params_and_dense_mask():
    """Our layer (GQA, local & causal mask) == Flax's MultiHeadAttention with the dense
    equivalent mask, once Flax's parameters are copied in (same names and shapes)."""
    local = masks.LocalMask(3, 0)
    ours = MultiHeadAttention(N, D, num_kv_heads=2, mask=local, is_causal=True,
                              implementation="reference", rngs=nnx.Rngs(1))
    theirs = _flax_nnx_mha(nnx.dot_product_attention, num_kv_heads=2)
    nnx.update(ours, nnx.state(theirs, nnx.Param))
    dense = jnp.asarray((local & masks.CausalMask()).to_dense(T, T))
    x = _x(9)
    out_a, (ga, gxa) = _values_and_grads_nnx(ours, x)
    out_b, (gb, gxb) = _values_and_grads_nnx(theirs, x, mask=jnp.broadcast_to(dense, (B, N, T, T)))
    np.testing.assert_allclose(out_a, out_b, **TOL)
    np.testing.assert_allclose(gxa, gxb, **TOL)
    _assert_tree_close(nnx.state(ga, nnx.Param), nnx.state(gb, nnx.Param), **TOL)


def test_apply_rope_matches_flax_rope_and_is_relative():
    x, k = _x(10, (B, T, N, 8)), _x(11, (B, 1, N, 8))

    @jax.jit
    def f(x, k):
        flax_rope = jnp.swapaxes(nnx.RoPE()(jnp.swapaxes(x, 1, 2)), 1, 2)  # Flax rotates [..., T, H]
        dots = [jnp.sum(apply_rope(x[:, :1], jnp.array([5 + c])) * apply_rope(k, jnp.array([2 + c])), -1)
                for c in (0, 7)]
        return apply_rope(x, jnp.arange(T)), flax_rope, dots

    ours, theirs, dots = f(x, k)
    np.testing.assert_allclose(ours, theirs, **TOL)
    # q·k depends on positions only through their difference
    np.testing.assert_allclose(dots[0], dots[1], rtol=1e-4, atol=1e-4)
    assert not np.allclose(ours, x, atol=1e-3)


def test_linen_twin_equals_nnx_layer():
    kw = dict(num_kv_heads=1, rope=True, is_causal=True, mask=masks.LocalMask(4, 1) | masks.GlobalMask(2),
              logits_soft_cap=5.0, implementation="reference")
    ours = MultiHeadAttention(N, D, rngs=nnx.Rngs(2), **kw)
    twin = LinenMultiHeadAttention(N, **kw)
    params = {"params": jax.tree.map(lambda v: v[...], nnx.to_pure_dict(nnx.state(ours, nnx.Param)))}
    shapes = jax.tree.map(jnp.shape, jax.eval_shape(twin.init, jax.random.key(0), _x()))
    assert jax.tree.map(jnp.shape, params) == shapes
    x, seg = _x(12), jnp.repeat(jnp.array([[0, 1], [0, 0]]), T // 2, axis=1)
    want = ours(x, mask=masks.SegmentMask(seg))
    got = jax.jit(lambda p, x, s: twin.apply(p, x, mask=masks.SegmentMask(s)))(params, x, seg)
    np.testing.assert_allclose(got, want, **TOL)


def test_nnx_layer_under_jit_grad_and_vmap():
    layer = MultiHeadAttention(N, D, num_kv_heads=2, rope=True, is_causal=True,
                               mask=masks.LocalMask(5, 0), implementation="reference", rngs=nnx.Rngs(3))
    x = _x(13, (3, B, T, D))  # an extra leading axis for vmap
    graphdef, params = nnx.split(layer)
    loss = lambda m, x: jnp.sum(m(x) ** 2)  # noqa: E731

    @nnx.jit
    def f(layer, params, x):
        batched = jax.vmap(lambda xi: nnx.merge(graphdef, params)(xi))(x)
        looped = jnp.stack([layer(x[i]) for i in range(3)])
        grads = nnx.grad(loss)(layer, x[0])  # nnx.grad on the module
        want = jax.grad(lambda p: loss(nnx.merge(graphdef, p), x[0]))(params)  # the functional form
        return batched, looped, nnx.state(grads, nnx.Param), nnx.state(want, nnx.Param)

    batched, looped, grads, want = f(layer, params, x)
    np.testing.assert_allclose(batched, looped, **TOL)
    _assert_tree_close(grads, want, **TOL)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_decoder_layer_masks_and_segments_limit_what_each_token_sees():
    vocab, t = 20, 24
    tokens = jnp.asarray(np.random.default_rng(14).integers(0, vocab, (1, t)), jnp.int32)
    changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % vocab)  # token 0 changed

    def delta(pattern, segment_ids):
        """How much each position's logits move when token 0 changes, per segment layout."""
        model = Decoder(vocab, 16, 2, num_kv_heads=1, layer_masks=pattern,
                        implementation="reference", rngs=nnx.Rngs(4))
        out = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(
            model, jnp.concatenate([tokens, changed] * len(segment_ids)), jnp.repeat(segment_ids, 2, axis=0))
        return np.asarray(jnp.abs(out[0::2] - out[1::2]).max(-1))

    one_doc = jnp.zeros((1, t), jnp.int32)
    two_docs = jnp.repeat(jnp.array([[0, 1]]), t // 2, axis=1)
    # two local layers of window 3: token 0 reaches positions <= 6 and no further
    (d,) = delta([masks.LocalMask(3, 0)] * 2, one_doc)
    assert d[6] > 1e-6 and d[7:].max() == 0.0
    # one full layer in the pattern lets it reach the end, but not across documents
    mixed = interleaved_pattern(2, local=masks.LocalMask(3, 0), every=2)
    assert mixed == [masks.LocalMask(3, 0), None]
    d_one, d_two = delta(mixed, jnp.concatenate([one_doc, two_docs]))
    assert d_one[-1] > 1e-6
    assert d_two[t // 2 - 1] > 1e-6 and d_two[t // 2:].max() == 0.0


@pytest.mark.skipif("pallas_triton" not in jaxattn.available_implementations(),
                    reason="pallas_triton is not registered")
def test_layer_with_pallas_triton_matches_reference():
    mask = masks.LocalMask(4, 0) | masks.GlobalMask(2)
    layers = [MultiHeadAttention(N, D, num_kv_heads=2, rope=True, is_causal=True, mask=mask,
                                 implementation=impl, rngs=nnx.Rngs(5)) for impl in ("pallas_triton", "reference")]
    x = _x(15)
    (oa, ga), (ob, gb) = (_values_and_grads_nnx(layer, x) for layer in layers)
    np.testing.assert_allclose(oa, ob, rtol=1e-4, atol=1e-4)
    _assert_tree_close(nnx.state(ga[0], nnx.Param), nnx.state(gb[0], nnx.Param), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# The example
# ------------------------------------------------------------------------------------------
def _example():
    return load_example("long_range_lm")


def test_example_task_is_long_range():
    ex = _example()
    t, p, w, nk, nv, nn_ = 64, 4, 8, 8, 5, 3
    batch = jax.jit(functools.partial(ex.recall_batch, batch=3, seq_len=t, num_pairs=p, num_keys=nk,
                                      num_values=nv, num_noise=nn_))
    tokens, targets, weights = map(np.asarray, batch(jax.random.key(0)))
    assert tokens.max() < ex.vocab_size(nk, nv, nn_)
    for row in range(3):
        fact = tokens[row, :p] - (nk + nv + nn_)           # key * nv + value
        table = dict(zip(fact // nv, nk + fact % nv))
        asked = np.nonzero(weights[row])[0]
        assert len(asked) == p and sorted(tokens[row, asked]) == sorted(table)
        for i in asked:
            assert targets[row, i] == table[tokens[row, i]]
        gap = tokens[row, p:t - 2 * p]
        assert ((gap >= nk + nv) & (gap < nk + nv + nn_)).all()  # the gap is noise only
    # two local layers of window w cannot connect the first query to any fact...
    assert asked.min() - 2 * w > p - 1
    local = ex.layer_masks("local", 2, seq_len=t, window=w, num_pairs=p, block=8)
    reach = (local[0] & masks.CausalMask()).to_dense(t, t).astype(int)
    assert not (reach @ reach)[asked.min(), :p].any()
    # ...local | global can, and costs fewer tiles than full attention
    lg = ex.layer_masks("local_global", 2, seq_len=t, window=w, num_pairs=p, block=8)
    assert (lg[0] & masks.CausalMask()).to_dense(t, t)[asked][:, :p].all()
    assert ex.tile_share(local, t, 8) < ex.tile_share(lg, t, 8) < ex.tile_share([None, None], t, 8) == 1.0


def test_example_training_reduces_loss():
    ex = _example()
    args = ex.parse_args(["--steps", "30", "--seq-len", "32", "--window", "4", "--pairs", "4",
                          "--keys", "8", "--values", "4", "--noise", "4", "--d-model", "32",
                          "--batch", "16", "--lr", "1e-2", "--eval-batches", "0", "--log-every", "0",
                          "--attention", "full"])
    result = ex.run_choice(args, "full", log=lambda *a: None)
    assert result["final_loss"] < result["first_loss"] - 0.5, result
    assert result["accuracy"] is None and result["step_ms"] > 0 and result["compiled_step_mb"] > 0


def test_learnable_sinks_in_nnx_and_linen_layers_get_gradients():
    """sinks=True: a zero-initialised [N] param whose gradient is nonzero; the linen twin
    has the same param and computes the same (with a score_mod too)."""
    kw = dict(num_kv_heads=2, is_causal=True, sinks=True, implementation="reference",
              score_mod=jaxattn.alibi(jnp.asarray(jaxattn.alibi_slopes(N))))
    ours = MultiHeadAttention(N, D, rngs=nnx.Rngs(4), **kw)
    assert ours.sinks[...].shape == (N,) and not np.any(np.asarray(ours.sinks[...]))
    twin = LinenMultiHeadAttention(N, **kw)
    params = {"params": jax.tree.map(lambda v: v[...], nnx.to_pure_dict(nnx.state(ours, nnx.Param)))}
    x = _x(21)

    @nnx.jit
    def f(layer, params, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
        linen_grads = jax.grad(lambda p: jnp.sum(twin.apply(p, x) ** 2))(params)
        return layer(x), twin.apply(params, x), grads, linen_grads

    out, linen_out, grads, linen_grads = f(ours, params, x)
    np.testing.assert_allclose(linen_out, out, **TOL)
    plain = nnx.clone(ours)
    plain.score_mod = nnx.data(None)
    assert not np.allclose(plain(x), out, atol=1e-3)    # the score_mod was applied
    g = np.asarray(grads.sinks[...])
    assert g.shape == (N,) and np.all(np.abs(g) > 0)
    np.testing.assert_allclose(linen_grads["params"]["sinks"], g, **TOL)


def test_attention_fn_passes_score_mod_and_sinks():
    q, k, v = (_x(s, (B, T, N, D // N)) for s in (22, 23, 24))
    sinks, slopes = jnp.array([0.5, -1.0, 0.0, 2.0]), jaxattn.alibi_slopes(N)
    fn = attention_fn(implementation="reference", is_causal=True, score_mod=jaxattn.alibi(slopes), sinks=sinks)
    want = jaxattn.dot_product_attention(q, k, v, is_causal=True, score_mod=jaxattn.alibi(slopes), sinks=sinks,
                                         implementation="reference")
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), want, **TOL)


def test_example_sinks_flag_builds_learnable_sinks_the_optimizer_updates():
    """--sinks gives every layer a sinks param, which the optimizer trains (wrt=nnx.Param);
    training itself is test_example_training_reduces_loss's code path."""
    ex = _example()
    argv = ["--seq-len", "32", "--window", "4", "--pairs", "4", "--keys", "8", "--values", "4",
            "--noise", "4", "--d-model", "32", "--attention", "local"]
    model, opt, _ = ex.build(ex.parse_args(argv + ["--sinks"]), "local", 0)
    assert all(b.attn.sinks[...].shape == (4,) for b in model.blocks)
    assert any("sinks" in str(path) for path, _ in nnx.to_flat_state(nnx.state(opt, nnx.OptState)))
    plain, _, _ = ex.build(ex.parse_args(argv), "local", 0)
    assert all(b.attn.sinks is None for b in plain.blocks)
