"""GPU tier (skipped without a CUDA GPU): `implementation=None` against the float32
reference, row by row, forward and gradients, over the masks and shapes where dispatch
hands work to different implementations (cuDNN for the masks jax.nn expresses, the
Hopper or Triton kernels for the rest, T ≠ S both ways, head dims 64 / 128 / 96).
Whatever dispatch picks must be right: two wrong-or-crashing cuDNN calls (a window
ending at the query without is_causal; a window with T > S) reached users this way.

Run it on a GPU machine with `JAX_PLATFORMS=cuda python -m pytest tests -m gpu`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.masks import CausalMask, FullMask, LocalMask, StridedMask, canonical_mask
from jaxattn.reference import reference_attention

pytestmark = pytest.mark.gpu

MASKS = {
    "full": FullMask(),
    "causal": CausalMask(),
    "causal_offset": CausalMask(offset=-50),
    "window_ending_at_query": LocalMask(100, 0),
    "causal_and_window": CausalMask() & LocalMask(100, 30),
    "symmetric_window": LocalMask(100, 30),
    "strided_causal": StridedMask(16) & CausalMask(),
}
SHAPES = [(384, 384), (256, 512), (512, 256)]


def _inputs(t, s, h, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (1, t, 4, h), jnp.float32).astype(jnp.bfloat16)
    k, v = (jax.random.normal(kk, (1, s, 2, h), jnp.float32).astype(jnp.bfloat16) for kk in ks[1:3])
    do = jax.random.normal(ks[3], (1, t, 4, h), jnp.float32).astype(jnp.bfloat16)
    return q, k, v, do


def _worst_row(got, want) -> float:
    """max over rows of |got − want| / max(|want|, 5 % of the rms row norm)."""
    got = np.asarray(got, np.float32).reshape(-1, got.shape[-1])
    want = np.asarray(want, np.float32).reshape(-1, want.shape[-1])
    norm = np.linalg.norm(want, axis=-1)
    floor = 0.05 * np.sqrt(np.mean(norm ** 2)) + 1e-6
    return float(np.max(np.linalg.norm(got - want, axis=-1) / np.maximum(norm, floor)))


def _check_default_dispatch(mask, t, s, h):
    """implementation=None's output and gradients against the reference, row by row;
    returns the lowered text of (forward, gradient) programs (their custom calls name
    the kernels that run)."""
    q, k, v, do = _inputs(t, s, h)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * f32(do))

    ours = lambda q, k, v: jaxattn.dot_product_attention(q, k, v, mask=mask)  # noqa: E731
    ref = lambda q, k, v: reference_attention(q, k, v, None, canonical_mask(mask),  # noqa: E731
                                              scale=h ** -0.5)
    forward, gradient = jax.jit(ours), jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))
    out, grads = forward(q, k, v), gradient(q, k, v)
    # one jitted program for the reference (op by op it spends most of a test compiling)
    reference = jax.jit(lambda q, k, v: (ref(q, k, v), jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)))
    want_out, want_grads = reference(f32(q), f32(k), f32(v))
    assert _worst_row(out, want_out) < 0.02, "output"
    for label, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert bool(jnp.all(jnp.isfinite(g))), label
        # looser than the output: the kernels take D = rowsum(dO∘O) from the bf16 O,
        # which alone moves rows with near-zero gradient by up to ~9 %; a mask applied
        # wrongly moves rows by O(1)
        assert _worst_row(g, w) < 0.15, label
    return forward.lower(q, k, v).as_text(), gradient.lower(q, k, v).as_text()


@pytest.mark.parametrize("h", [64, 128, 96])
@pytest.mark.parametrize("t, s", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("name", list(MASKS))
def test_default_dispatch_matches_the_reference(name, t, s, h):
    _check_default_dispatch(MASKS[name], t, s, h)


# Unions the planner runs as two parts (a window in natural order, the strided rest in
# residue classes) merged through the log-sum-exp; the backward runs each part's kernels
# on the merged residuals (jaxattn/planned.py). T != S and lengths that are not whole
# classes fold the classes into the batch, padded.
PLANNED_UNIONS = {
    "window_or_strided_causal": (LocalMask(16, 0) | StridedMask(16)) & CausalMask(),
    "symmetric_window_or_shifted_strided": LocalMask(8, 8) | StridedMask(32, offset=5),
}


@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("t, s", [(1024, 1024), (1000, 1100), (1100, 1000)], ids=lambda x: str(x))
@pytest.mark.parametrize("name", list(PLANNED_UNIONS))
def test_planned_union_matches_the_reference(name, t, s, h, monkeypatch):
    from jaxattn import planned
    mask = PLANNED_UNIONS[name]
    q, k, _, _ = _inputs(t, s, h)
    found = planned.plan_for(mask, q, k, None)
    assert found is not None and len(found[0].parts) == 2, "the planner runs it as two parts"
    backward_calls = []
    run_backward = planned.pallas_backward
    monkeypatch.setattr(planned, "pallas_backward",
                        lambda *a, **kw: backward_calls.append(a[0]) or run_backward(*a, **kw))
    _check_default_dispatch(mask, t, s, h)
    assert len(backward_calls) >= 2, "each part's backward kernels ran on the merged residuals"


# Where dispatch puts the Hopper kernels first for masks cuDNN runs natively (head dim
# 128, >= 1024 queries): (mask, tokens, kernels the forward runs, kernels the gradient
# runs). Causal masks up to 8192 tokens and the full mask up to 4096 run on them in
# training too; longer, the split (Hopper forward, cuDNN's gradient).
MEASURED_ROUTES = {
    "causal": (CausalMask(), 1024, "mosaic_gpu", "mosaic_gpu"),
    "full": (FullMask(), 4096, "mosaic_gpu", "mosaic_gpu"),
    "window_2047": (LocalMask(2047, 0), 1024, "mosaic_gpu", "mosaic_gpu"),
    "causal_past_8192": (CausalMask(), 8320, "mosaic_gpu", "cudnn"),
    "full_past_4096": (FullMask(), 4224, "mosaic_gpu", "cudnn"),
}


@pytest.mark.parametrize("name", list(MEASURED_ROUTES))
def test_default_dispatch_where_the_hopper_kernels_come_first(name):
    """At the sizes dispatch routes by (D128, >= 1024 queries): right values and
    gradients, and the kernels it promises (the split: Hopper forward, cuDNN's gradient)."""
    mask, tokens, forward_kernel, gradient_kernel = MEASURED_ROUTES[name]
    forward_text, gradient_text = _check_default_dispatch(mask, tokens, tokens, 128)
    assert forward_kernel in forward_text and gradient_kernel in gradient_text
    if gradient_kernel == "cudnn":
        assert "mosaic_gpu" not in gradient_text, "a differentiated split runs cuDNN alone"
    else:
        assert "cudnn" not in forward_text + gradient_text, "the Hopper kernels alone"


def test_default_dispatch_at_head_dim_256():
    """Head dim 256, causal self-attention of 4096 tokens: the split (the Hopper forward
    for values, cuDNN's gradient), right values and gradients."""
    forward_text, gradient_text = _check_default_dispatch(CausalMask(), 4096, 4096, 256)
    assert "mosaic_gpu" in forward_text and "cudnn" not in forward_text
    assert "cudnn" in gradient_text and "mosaic_gpu" not in gradient_text


SPLIT_MASKS = ("causal", "window_ending_at_query", "causal_and_window")


@pytest.mark.parametrize("t, s", SHAPES[:2], ids=lambda x: str(x))
@pytest.mark.parametrize("name, h", [*((m, h) for m in SPLIT_MASKS for h in (64, 128)),
                                     ("causal", 256)])
def test_hopper_forward_with_cudnn_training(name, t, s, h):
    """mosaic_forward_cudnn_training: the value alone is the Hopper forward's (bitwise),
    a differentiated call cuDNN's gradient; both against the reference row by row."""
    mask = MASKS[name]
    q, k, v, do = _inputs(t, s, h)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def attend(implementation):
        return lambda q, k, v: jaxattn.dot_product_attention(q, k, v, mask=mask,
                                                             implementation=implementation)

    def grads_of(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * f32(do))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    split = attend("mosaic_forward_cudnn_training")
    out = jax.jit(split)(q, k, v)
    assert bool(jnp.array_equal(out, jax.jit(attend("pallas_mosaic_gpu"))(q, k, v)))
    ref = lambda q, k, v: reference_attention(q, k, v, None, canonical_mask(mask),  # noqa: E731
                                              scale=h ** -0.5)
    assert _worst_row(out, ref(f32(q), f32(k), f32(v))) < 0.02, "output"
    grads, cudnn_grads = grads_of(split), grads_of(attend("cudnn"))
    want = jax.grad(lambda q, k, v: jnp.sum(ref(q, k, v) * f32(do)), argnums=(0, 1, 2))(
        f32(q), f32(k), f32(v))
    for label, g, c, w in zip(("dq", "dk", "dv"), grads, cudnn_grads, want):
        assert _worst_row(g, c) < 1e-2, label + " vs cuDNN"
        assert _worst_row(g, w) < 0.15, label + " vs the reference"
