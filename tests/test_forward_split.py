"""jaxattn/forward_split.py: a value computed by one implementation, its gradient (and
the value it goes with) by another; and the implementation built on it, which declines
what either half cannot serve."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.forward_split import decline_reason, split_by_use
from jaxattn.masks import CausalMask, LocalMask, StridedMask
from jaxattn.reference import reference_attention

NAME = "mosaic_forward_cudnn_training"


def _attention(q, k, v):
    return reference_attention(q, k, v, None, CausalMask(), scale=q.shape[-1] ** -0.5)


def _trained(q, k, v):
    """Twice the attention: a value and gradient told apart from the forward's."""
    return 2.0 * _attention(q, k, v)


def _inputs(t=33, s=33, h=16, n=4, kh=2):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2, t, n, h), jnp.float32)
    k, v = (jax.random.normal(x, (2, s, kh, h), jnp.float32) for x in ks[1:3])
    w = jax.random.normal(ks[3], (2, t, n, h), jnp.float32)
    return q, k, v, w


def test_value_alone_comes_from_the_forward_and_a_gradient_from_the_trained_pair():
    q, k, v, w = _inputs()
    f = split_by_use(_attention, _trained)
    np.testing.assert_allclose(jax.jit(f)(q, k, v), _attention(q, k, v), rtol=1e-6, atol=1e-6)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    value, grads = jax.jit(jax.value_and_grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
    want_value, want_grads = jax.value_and_grad(loss(_trained), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for g, want in zip(grads, want_grads):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


def test_split_works_under_vmap_and_checkpoint():
    q, k, v, w = _inputs()
    f = split_by_use(_attention, _trained)
    stacked = [jnp.stack([x, 0.5 * x]) for x in (q, k, v)]     # a vmapped axis ahead of B
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(*stacked), jax.vmap(_attention)(*stacked),
                               rtol=1e-6, atol=1e-6)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jax.checkpoint(fn)(q, k, v) * w)
    grads = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_trained), argnums=(0, 1, 2))(q, k, v)
    for g, ww in zip(grads, want):
        np.testing.assert_allclose(g, ww, rtol=1e-5, atol=1e-5)


def test_registered_and_declines_off_a_gpu_with_its_reason():
    assert NAME in jaxattn.available_implementations()
    q, k, v, _ = _inputs()
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    if jax.default_backend() == "gpu":
        pytest.skip("this checks the CPU decline")
    with pytest.raises(NotImplementedError, match=f"{NAME} cannot serve this call: .*CUDA GPU"):
        jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=NAME)


@pytest.mark.parametrize("kwargs, mask, expected", [
    (dict(bias=True), CausalMask(), "no bias"),
    (dict(return_residuals=True), CausalMask(), "no lse"),
    (dict(logits_soft_cap=30.0), CausalMask(), "soft cap"),
    ({}, StridedMask(4) & CausalMask(), "structured argument"),
    ({}, LocalMask(8, 4), "past the query"),
    (dict(h=36), CausalMask(), "multiples of 8 up to 256"),
    (dict(h=264), CausalMask(), "multiples of 8 up to 256"),
])
def test_declines_what_either_half_cannot_serve(kwargs, mask, expected):
    q, k, v, _ = _inputs(h=kwargs.get("h", 16))
    q = q.astype(jnp.bfloat16)
    bias = jnp.zeros((1, 1, 33, 33), jnp.bfloat16) if kwargs.get("bias") else None
    reason = decline_reason(q, k, bias, mask, logits_soft_cap=kwargs.get("logits_soft_cap"),
                            return_residuals=kwargs.get("return_residuals", False))
    assert expected in reason


def test_above_head_dim_128_the_hopper_forwards_metadata_decides(monkeypatch):
    """At head dim 256 the Hopper forward has no finite-input check: the split serves a
    mask only where that forward's block metadata leaves no unattended key in a tile
    (causal self-attention and aligned windows do; a window of 100 keys cuts tiles of 64
    keys, leaving keys no row of a tile attends), and says why not. The GPU is
    pretended: the platform, and the backend's supports()."""
    from pallas_kernels import mosaic_gpu
    from jaxattn.masks import canonical_mask
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(mosaic_gpu, "supports", lambda request, interpret=False: None)

    def reason(mask, h):
        q, k, _, _ = _inputs(t=512, s=512, h=h)
        return decline_reason(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), None,
                              canonical_mask(mask), logits_soft_cap=None, return_residuals=False)
    assert reason(CausalMask(), 256) is None
    assert reason(LocalMask(128, 0), 256) is None        # 128 keys back: whole tiles
    cut = reason(LocalMask(99, 0), 256)
    assert "pallas_mosaic_gpu cannot serve this call" in cut and "head dim 256" in cut
    # up to 128 the forward checks its inputs instead (a Triton fallback for NaN/Inf):
    # no metadata is consulted, and the same mask is served
    from jaxattn import forward_split

    def consulted(*args, **kwargs):
        raise AssertionError("the block metadata was consulted at head dim 128")
    monkeypatch.setattr(forward_split, "hopper_decline_reason", consulted)
    assert reason(LocalMask(99, 0), 128) is None
