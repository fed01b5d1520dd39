"""The jnp reference (jaxattn/reference.py) against jax.nn.dot_product_attention (xla),
a hand-written numpy formula, float64 gradient checks, and empty rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxattn
from jaxattn import masks as M


def qkv(seed, b=2, t=5, s=7, n=4, k=2, h=8, dtype=jnp.float32):
    """query [B, T, N, H], key and value [B, S, K, H] (numpy RNG: no compile per shape)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
                 for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))


ref = functools.partial(jaxattn.dot_product_attention, implementation="reference")


def xla(q, k, v, *args, **kw):
    """The baseline: jax.nn's XLA attention (supports GQA natively)."""
    return jax.nn.dot_product_attention(q, k, v, *args, implementation="xla", **kw)


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------
# Reference vs jax.nn.dot_product_attention(implementation="xla").
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("t,s", [(5, 7), (9, 3)])
def test_full_and_causal_vs_xla(t, s):
    heads = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
    inputs = [qkv(i, t=t, s=s, n=n, k=k) for i, (n, k) in enumerate(heads)]

    @jax.jit
    def run(inputs):
        got, want = [], []
        for i, (q, k, v) in enumerate(inputs):
            got.append(ref(q, k, v))
            want.append(xla(q, k, v))
            if t <= s:  # jax.nn's causal mask is top-left aligned (j <= i), as ours
                causal = dict(is_causal=True) if i % 2 else dict(mask=M.CausalMask())
                got.append(ref(q, k, v, **causal))
                want.append(xla(q, k, v, is_causal=True))
        return got, want

    got, want = run(inputs)
    assert len(got) == (6 if t <= s else 3)
    for a, b in zip(got, want):
        close(a, b)


def test_bool_mask_and_bias_vs_xla():
    q, k, v = qkv(1, n=4, k=2)
    rng = np.random.default_rng(0)
    mask = rng.random((2, 4, 5, 7)) < 0.5
    mask[..., 0] = True  # no empty rows: jax.nn gives garbage there by design
    bias = jnp.asarray(rng.normal(size=(1, 4, 5, 7)), jnp.float32)

    @jax.jit
    def run(q, k, v, bias, jmask):
        return [
            (ref(q, k, v, mask=mask), xla(q, k, v, mask=mask)),
            (ref(q, k, v, mask=jmask), xla(q, k, v, mask=mask)),  # traced mask array
            (ref(q, k, v, bias), xla(q, k, v, bias)),
            (ref(q, k, v, bias, mask[:, :1]), xla(q, k, v, bias, mask[:, :1])),
            (ref(q, k, v, bias[0, 0], scale=0.3), xla(q, k, v, bias[0, 0], scale=0.3)),
        ]

    for a, b in run(q, k, v, bias, jnp.asarray(mask)):
        close(a, b)


def test_local_window_vs_xla():
    q, k, v = qkv(2, t=9, s=9)
    windows = [(2, 1), (3, 0), 1]

    @jax.jit
    def run(q, k, v):
        out = []
        for w in windows:
            out.append((ref(q, k, v, local_window_size=w), xla(q, k, v, local_window_size=w)))
            out.append((ref(q, k, v, is_causal=True, local_window_size=w),
                        xla(q, k, v, is_causal=True, local_window_size=w)))
            if isinstance(w, tuple):
                out.append((ref(q, k, v, mask=M.LocalMask(*w)), xla(q, k, v, local_window_size=w)))
        return out

    for a, b in run(q, k, v):
        close(a, b)


@jax.jit
def _lse_case(q, k, v):
    return (ref(q, k, v, is_causal=True, return_residuals=True),
            xla(q, k, v, is_causal=True, return_residual=True))


def test_lse_vs_xla():
    (out, lse), (x_out, x_lse) = _lse_case(*qkv(3, n=4, k=2, t=6, s=6))
    assert lse.shape == (2, 4, 6) and lse.dtype == jnp.float32
    close(out, x_out)
    close(lse, jnp.swapaxes(x_lse, 1, 2))


def test_mask_objects_equal_their_dense_arrays():
    q, k, v = qkv(4, b=2, t=8, s=8)
    ids = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2, 2, 2]])
    m = M.causal_document_mask(ids) & M.LocalMask(3, 0) | M.GlobalMask(1)
    dense = np.asarray(m.to_dense(8, 8))[:, None]  # [B, 1, T, S]
    got, want = jax.jit(lambda q, k, v, m: (ref(q, k, v, mask=m), xla(q, k, v, mask=dense)))(q, k, v, m)
    close(got, want)


def test_bfloat16_computes_in_float32():
    q, k, v = qkv(5, dtype=jnp.bfloat16)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    out, want = jax.jit(lambda q, k, v: (ref(q, k, v, is_causal=True),
                                         xla(f32(q), f32(k), f32(v), is_causal=True)))(q, k, v)
    assert out.dtype == jnp.bfloat16
    close(out, want, tol=1e-2)  # only the final rounding to bfloat16


# ---------------------------------------------------------------------------------
# Softcap against the hand formula (numpy float64).
# ---------------------------------------------------------------------------------
def numpy_attention(q, k, v, *, scale, cap=None, allowed=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    if allowed is not None:
        logits = np.where(allowed, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def test_softcap_matches_formula():
    q, k, v = qkv(6, n=4, k=2)
    q = q * 4.0  # logits of order 10: a cap of 2 changes the result a lot
    want = numpy_attention(q, k, v, scale=0.5, cap=2.0)
    close(ref(q, k, v, scale=0.5, logits_soft_cap=2.0), want)
    uncapped = numpy_attention(q, k, v, scale=0.5)
    assert np.abs(want - uncapped).max() > 0.1  # the cap matters in this case
    allowed = np.tril(np.ones((5, 7), bool))
    close(ref(q, k, v, is_causal=True, scale=0.5, logits_soft_cap=2.0),
          numpy_attention(q, k, v, scale=0.5, cap=2.0, allowed=allowed))


# ---------------------------------------------------------------------------------
# float64 gradient checks.
# ---------------------------------------------------------------------------------
GRAD_CASES = [
    dict(),
    dict(is_causal=True, logits_soft_cap=3.0),
    dict(mask=M.LocalMask(2, 1) | M.GlobalMask(1), scale=0.7),
    dict(mask=M.CausalMask(offset=-2)),  # rows 0 and 1 are empty
]


@pytest.mark.usefixtures("enable_x64")
def test_check_grads_float64():
    # float64 for this test only: the enable_x64 fixture restores the setting after.
    q, k, v = (x.astype(jnp.float64) for x in qkv(7, b=1, t=5, s=6, n=2, k=1, h=4))
    bias = jnp.asarray(np.random.default_rng(8).standard_normal((1, 2, 5, 6)), jnp.float64)

    @jax.jit
    def f(q, k, v, bias):
        # Every case in one function: one compile of the forward and one of its VJP.
        outs = []
        for kw in GRAD_CASES:
            out, lse = ref(q, k, v, bias, return_residuals=True, **kw)
            outs += [out, jnp.where(jnp.isfinite(lse), lse, 0.0)]
        return outs

    assert all(o.dtype == jnp.float64 for o in f(q, k, v, bias))
    check_grads(f, (q, k, v, bias), order=1, modes=("rev",))


# ---------------------------------------------------------------------------------
# Empty rows: output exactly 0, lse -inf, zero and finite gradients.
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_empty_rows(softcap):
    q, k, v = qkv(9, b=2, t=5, s=7, n=4, k=2)
    mask = np.ones((2, 4, 5, 7), bool)
    mask[0, :, 2] = False          # one row empty in every head of batch 0
    mask[1, 3] = False             # every row of one head of batch 1
    bias = jnp.zeros((2, 4, 5, 7)).at[0, :, 2].set(1e4)  # large logits under the mask
    w = jnp.asarray(np.random.default_rng(10).standard_normal(q.shape), jnp.float32)

    def attn(q, k, v, bias):
        return ref(q, k, v, bias, mask, logits_soft_cap=softcap, return_residuals=True)

    def loss(q, k, v, bias):
        o, lse = attn(q, k, v, bias)
        return jnp.sum(o * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    def empty_only(q, k, v, bias):
        # Only the empty row's output is in the loss: every gradient must be exactly 0.
        return jnp.sum(attn(q, k, v, bias)[0][0, 2] * w[0, 2])

    @jax.jit
    def run(q, k, v, bias):
        return (attn(q, k, v, bias), jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias),
                jax.grad(empty_only, argnums=(0, 1, 2, 3))(q, k, v, bias))

    (out, lse), grads, empty_grads = jax.tree.map(np.asarray, run(q, k, v, bias))
    assert (out[0, 2] == 0).all() and (out[1, :, 3] == 0).all()
    assert np.isneginf(lse[0, :, 2]).all() and np.isneginf(lse[1, 3]).all()
    assert np.isfinite(lse[0, :, :2]).all() and np.isfinite(lse[1, :3]).all()
    assert np.abs(out[0, :2]).max() > 0.1
    for g in grads:
        assert np.isfinite(g).all()
    dq, dk, _, dbias = grads
    assert (dq[0, 2] == 0).all() and (dq[1, :, 3] == 0).all()
    assert np.abs(dq[0, :2]).max() > 0 and np.abs(dk).max() > 0  # not vacuously zero
    assert (dbias[~mask] == 0).all()
    for g in empty_grads:
        assert (g == 0).all()


def test_all_masked_is_zero_not_nan():
    q, k, v = qkv(11, b=1, t=3, s=4, n=2, k=2)
    out = ref(q, k, v, mask=np.zeros((3, 4), bool))
    assert (np.asarray(out) == 0).all()


# ---------------------------------------------------------------------------------------
# Regressions found in review: the jax.nn wrappers keep the empty-row contract, DenseMask
# owns its data, low-rank masks broadcast, return_residuals must be a bool.
# ---------------------------------------------------------------------------------------
def test_xla_structured_window_empty_rows_are_zero():
    ks = jax.random.split(jax.random.key(7), 2)
    q = jax.random.normal(ks[0], (1, 8, 2, 16))
    k = jax.random.normal(ks[1], (1, 4, 2, 16))
    out, lse = jaxattn.dot_product_attention(q, k, k, local_window_size=(1, 0), implementation="xla",
                                             return_residuals=True)
    ref, ref_lse = jaxattn.dot_product_attention(q, k, k, local_window_size=(1, 0),
                                                 implementation="reference", return_residuals=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.all(np.asarray(out)[:, 5:] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, 5:]))
    np.testing.assert_allclose(np.asarray(lse)[:, :, :5], np.asarray(ref_lse)[:, :, :5], atol=1e-5)


def test_dense_mask_copies_numpy_data():
    arr = np.tril(np.ones((8, 8), bool))
    m = M.DenseMask(arr)
    arr[:] = True
    assert not m.to_dense(8, 8).all()


def test_rank1_bool_mask_broadcasts():
    ks = jax.random.split(jax.random.key(8), 2)
    q = jax.random.normal(ks[0], (1, 5, 1, 16))
    k = jax.random.normal(ks[1], (1, 6, 1, 16))
    keep = np.array([True, False, True, True, False, True])
    out = jaxattn.dot_product_attention(q, k, k, mask=keep, implementation="reference")
    want = jaxattn.dot_product_attention(q, k, k, mask=np.broadcast_to(keep, (5, 6)), implementation="reference")
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_return_residuals_must_be_bool():
    q = jnp.zeros((1, 2, 1, 8))
    with pytest.raises(ValueError, match=r"return_residuals: expected a bool, got 'no'"):
        jaxattn.dot_product_attention(q, q, q, return_residuals="no")


def test_all_minus_inf_bias_row_is_empty_not_nan():
    ks = jax.random.split(jax.random.key(9), 2)
    q = jax.random.normal(ks[0], (1, 4, 1, 8))
    k = jax.random.normal(ks[1], (1, 5, 1, 8))
    bias = jnp.zeros((1, 1, 4, 5)).at[:, :, 2].set(-jnp.inf)

    def f(q, k):
        return jnp.sum(jaxattn.dot_product_attention(q, k, k, bias, implementation="reference") ** 2)
    out = jaxattn.dot_product_attention(q, k, k, bias, implementation="reference")
    grads = jax.grad(f, argnums=(0, 1))(q, k)
    assert np.all(np.asarray(out)[:, 2] == 0) and not np.isnan(np.asarray(out)).any()
    assert not any(np.isnan(np.asarray(g)).any() for g in grads)
