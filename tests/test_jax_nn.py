"""The "xla" and "cudnn" implementations (jax.nn.dot_product_attention) held to jaxattn's
masks: the structured arguments a mask becomes (so cuDNN and XLA take their fast paths),
XLA's results for each window form on the CPU, and (GPU tier) cuDNN's, row by row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.jax_nn import jax_nn_mask_arguments
from jaxattn.masks import CausalMask, FullMask, LocalMask, canonical_mask
from jaxattn.reference import reference_attention

WINDOWS = [LocalMask(5, 0), LocalMask(5, 0) & CausalMask(), CausalMask() & LocalMask(5, 2),
           LocalMask(None, 0), LocalMask(5, 2), LocalMask(None, 3)]


@pytest.mark.parametrize("mask, expected", [
    (FullMask(), {}),
    (CausalMask(), {"is_causal": True}),
    # a window that ends at the query is causal: cuDNN needs to be told (see jax_nn.py)
    (LocalMask(64, 0), {"local_window_size": (64, 0), "is_causal": True}),
    (LocalMask(64, 0) & CausalMask(), {"local_window_size": (64, 0), "is_causal": True}),
    (CausalMask() & LocalMask(64, 16), {"is_causal": True, "local_window_size": (64, 16)}),
    (LocalMask(64, 16), {"local_window_size": (64, 16)}),
    (LocalMask(None, 0), {"is_causal": True}),
    (LocalMask(None, 3), None),                 # no jax.nn argument says "up to i + 3"
    (CausalMask(offset=2), None),
])
def test_masks_become_jax_nn_arguments(mask, expected):
    assert jax_nn_mask_arguments(mask) == expected


def _qkv(t, n, h, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (1, t, n, h), jnp.float32).astype(dtype) for k in ks)


@pytest.mark.parametrize("mask", WINDOWS, ids=repr)
def test_xla_windows_match_the_reference(mask):
    q, k, v = _qkv(24, 2, 8, jnp.float32)
    got = jax.jit(lambda q, k, v: jaxattn.dot_product_attention(
        q, k, v, mask=mask, implementation="xla"))(q, k, v)
    want = reference_attention(q, k, v, None, canonical_mask(mask), scale=8 ** -0.5)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask, t, s, declined", [
    (LocalMask(100, 0), 512, 256, True),
    (CausalMask() & LocalMask(100, 30), 512, 256, True),
    (LocalMask(100, 0), 256, 512, False),
    (CausalMask(), 512, 256, False),
    (LocalMask(None, 0), 512, 256, False),
])
def test_cudnn_declines_windows_with_more_queries_than_keys(mask, t, s, declined):
    """cuDNN refuses such a window only when XLA compiles the program (after dispatch
    chose it); the check runs before, so dispatch takes the next implementation."""
    from jaxattn.jax_nn import cudnn_reason
    reason = cudnn_reason(mask, t, s)
    assert (reason is not None) == declined
    if declined:
        assert f"T={t} > S={s}" in reason


@pytest.mark.gpu
@pytest.mark.parametrize("mask", [LocalMask(100, 0), CausalMask() & LocalMask(100, 30)], ids=repr)
def test_default_dispatch_serves_windows_with_more_queries_than_keys(mask):
    q = _qkv(512, 2, 64, jnp.bfloat16)[0]
    _, k, v = _qkv(256, 2, 64, jnp.bfloat16, seed=1)
    with pytest.raises(NotImplementedError, match="T=512 > S=256"):
        jaxattn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    got = jax.jit(lambda q, k, v: jaxattn.dot_product_attention(q, k, v, mask=mask))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = reference_attention(f32(q), f32(k), f32(v), None, canonical_mask(mask), scale=64 ** -0.5)
    np.testing.assert_allclose(np.asarray(f32(got)), np.asarray(want), atol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("t, s", [(512, 512), (256, 512), (512, 256)], ids=lambda x: str(x))
@pytest.mark.parametrize("mask", [CausalMask(), LocalMask(100, 0), LocalMask(100, 0) & CausalMask(),
                                  CausalMask() & LocalMask(100, 30), LocalMask(None, 0)], ids=repr)
def test_cudnn_windows_match_the_reference_per_row(mask, t, s):
    """Worst row of |got − ref| / |ref| (float32 reference on the same bf16 inputs), also
    with T ≠ S (the masks' positions are top-left aligned, as jax.nn's is_causal)."""
    q = _qkv(t, 2, 64, jnp.bfloat16)[0]
    _, k, v = _qkv(s, 2, 64, jnp.bfloat16, seed=1)
    if jax_nn_mask_arguments(canonical_mask(mask)).get("local_window_size") and t > s:
        pytest.skip("declined (test_cudnn_declines_windows_with_more_queries_than_keys)")
    got = jax.jit(lambda q, k, v: jaxattn.dot_product_attention(
        q, k, v, mask=mask, implementation="cudnn"))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = reference_attention(f32(q), f32(k), f32(v), None, canonical_mask(mask), scale=64 ** -0.5)
    got, want = np.asarray(f32(got)).reshape(-1, 64), np.asarray(want).reshape(-1, 64)
    err = np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-3)
    assert float(err.max()) < 0.02


@pytest.mark.gpu
def test_cudnn_declines_a_window_reaching_past_the_query():
    """cuDNN has no right-hand window without a causal mask: not served, never wrong."""
    q, k, v = _qkv(256, 2, 64, jnp.bfloat16)
    with pytest.raises(NotImplementedError):
        jaxattn.dot_product_attention(q, k, v, mask=LocalMask(64, 16), implementation="cudnn")
