"""Attention computed by one implementation when only its value is used, and by another
(value and gradient) when it is differentiated.

On an H200 the Hopper forward kernel ran long causal and full attention as fast as
cuDNN's forward or faster (D128 S16k causal: 557–576 against 478–528 TFLOP/s in three
processes; full 606 against 595), while cuDNN's fused backward makes a long training step
faster than the two deterministic Hopper backward kernels (causal 16k 509–523 against
462–480; full from 8k). Shorter self-attention runs on the Hopper kernels alone
(jaxattn.implementations.default_order). `mosaic_forward_cudnn_training` serves both: a
custom VJP whose primal is the Hopper forward and whose forward rule, the one JAX runs
under `jax.grad` / `jax.vjp`, is cuDNN's forward with cuDNN's own VJP. Inference and
prefill get the faster forward, training steps keep cuDNN's pair, and the two are each
exact attention (their outputs differ by rounding only).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.registry import backend_names, get_backend
from jaxattn.flash import decline_reason as hopper_decline_reason
from jaxattn.flash import kernel_request, pallas_attention
from jaxattn.jax_nn import cudnn_reason, jax_nn_attention, jax_nn_mask_arguments
from jaxattn.masks import Mask

HOPPER_KERNELS = "pallas_mosaic_gpu"


def split_by_use(forward: Callable, trained: Callable) -> Callable:
    """f(q, k, v) that evaluates forward(q, k, v) when its result is only used, and
    trained(q, k, v) with trained's VJP when it is differentiated. JAX calls a custom
    VJP's forward rule, never its primal, under reverse-mode differentiation, so a
    gradient never mixes the two: value and gradient both come from `trained`.
    Forward-mode (jax.jvp) is not defined, as for any custom VJP. `forward` and `trained`
    must not close over traced values (a custom VJP's rules cannot see them): pass
    arrays as arguments."""

    @jax.custom_vjp
    def attend(q, k, v):
        return forward(q, k, v)

    def attend_fwd(q, k, v):
        return jax.vjp(trained, q, k, v)   # (value, the VJP closure as residuals)

    def attend_bwd(vjp, g):
        return vjp(g)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def decline_reason(query, key, bias, mask: Mask, *, logits_soft_cap, return_residuals) -> str | None:
    """Why mosaic_forward_cudnn_training cannot serve this call (each half must serve
    it), or None."""
    if bias is not None:
        return "it takes no bias (the Hopper forward's bias gradient runs on other kernels)"
    if return_residuals:
        return "it returns no lse (the two halves would give different ones)"
    if logits_soft_cap is not None:
        return "cuDNN has no logits soft cap"
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention takes bfloat16/float16, not {query.dtype}"
    # Checked here, not left to the halves: under jax.grad of a jit, a checkpoint or a scan
    # the cuDNN half is traced after dispatch, where a refusal can fall back to nothing.
    # Up to 128 the Hopper forward also takes every mask (its finite-input check is on);
    # above, only masks its block metadata shows safe (checked last, below).
    h = query.shape[-1]
    if h % 8 or h > 256:
        return (f"it runs head dims that are multiples of 8 up to 256 (cuDNN's multiples of 8; "
                f"the Hopper forward's up to 256), got {h}")
    if jax_nn_mask_arguments(mask) is None:
        return "jax.nn has no structured argument for this mask (cuDNN would need it dense)"
    reason = cudnn_reason(mask, query.shape[1], key.shape[1])
    if reason is not None:
        return reason
    if jax.default_backend() != "gpu":
        return "cuDNN and the Hopper kernels need a CUDA GPU"
    if HOPPER_KERNELS not in backend_names():
        return f"the {HOPPER_KERNELS} backend is not registered"
    if h <= 128:
        request = kernel_request(query, key, None, mask, None)
        reason = get_backend(HOPPER_KERNELS).supports(request, interpret=False)
        return None if reason is None else f"{HOPPER_KERNELS}: {reason}"
    # Above 128 the Hopper forward has no finite-input check: it refuses a mask whose
    # block metadata may leave unattended keys inside a tile (built as the call builds it).
    return hopper_decline_reason(HOPPER_KERNELS, query, key, mask, scale=1.0,
                                 logits_soft_cap=None)


def mosaic_forward_cudnn_training(query, key, value, bias, mask: Mask, *, scale,
                                  logits_soft_cap, return_residuals, score_mod=None):
    """Implementation entry point (jaxattn.implementations' contract): the Hopper
    forward for values, cuDNN for values that are differentiated (split_by_use)."""
    if score_mod is not None:
        raise NotImplementedError("mosaic_forward_cudnn_training cannot serve this call: "
                                  "cuDNN has no score_mod")
    reason = decline_reason(query, key, bias, mask, logits_soft_cap=logits_soft_cap,
                            return_residuals=return_residuals)
    if reason is not None:
        raise NotImplementedError(f"mosaic_forward_cudnn_training cannot serve this call: {reason}")

    def forward(q, k, v):
        return pallas_attention(HOPPER_KERNELS, q, k, v, None, mask, scale=scale,
                                logits_soft_cap=None, return_residuals=False)

    def trained(q, k, v):
        return jax_nn_attention("cudnn", q, k, v, None, mask, scale=scale, logits_soft_cap=None,
                                return_residuals=False)

    return split_by_use(forward, trained)(query, key, value)
