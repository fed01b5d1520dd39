"""Backend-neutral FlashAttention custom VJP.

Every kernel backend (Triton today, Mosaic GPU next) implements the same two calls

    backend.forward(static, q, k, v, bias, metas, operands)         -> (out, lse)
    backend.backward(static, q, k, v, bias, out, lse, dout, delta,
                     metas, operands, parts=("dq", "dkdv", "dbias")) -> (dq, dk, dv, dbias)

(`parts` asks for the dQ and/or the dK/dV half alone, and for the bias gradient or not;
what was not asked for is None. dbias is asked for only when the bias is differentiated.)

where `metas` maps the names of `static.config.metadata_tiles()` (e.g. "forward",
"dkdv", "dq") to the BlockMetadata built for that kernel's tile shape

on unpadded BTNH arrays, and this module wires them into one `jax.custom_vjp`. The
metadata (pallas_kernels/metadata.py) and the mask operands travel as ordinary,
non-differentiable inputs, so a traced SegmentMask works under jit and grad.

Backward identities (FlashAttention-2, Algorithm 2), with P = softmax(S) and
D_i = Σ_j dO_ij · O_ij = rowsum(dO ∘ O):
    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − D),   dQ = scale · dS K,   dK = scale · dSᵀ Q.
A cotangent on the lse output adds P ∘ dlse to dS, i.e. D ← D − dlse, so attention
built from merged partial results (ring attention) differentiates exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels.metadata import BlockMetadata


@dataclasses.dataclass(frozen=True)
class FlashStatic:
    """Everything static about one attention call (hashable: part of the jit key)."""

    backend: Any                       # module/object with forward() and backward()
    scale: float
    logits_soft_cap: float | None
    mask_fn: Callable | None           # TileMask.fn, or None when no tile is partial
    operand_kinds: tuple               # ((kind, layout_block), ...) matching `operands`
    config: Any                        # backend config (tile sizes, warps, stages)
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(static: FlashStatic, q, k, v, bias, metas: dict[str, BlockMetadata],
                    operands: tuple):
    """(out [B, T, N, H], lse [B, N, T] float32 natural log; -inf on empty rows).
    bias: None or additive logits [Bb, Hb, T|1, S|1] (Bb in {1, B}, Hb in {1, N})."""
    return static.backend.forward(static, q, k, v, bias, metas, operands)


def _fwd(static, *primals):
    # symbolic_zeros=True: each array input arrives as CustomVJPPrimal(value, perturbed),
    # which tells whether the bias is differentiated (a constant bias needs no dbias).
    is_primal = lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal)  # noqa: E731
    q, k, v, bias, metas, operands = jax.tree_util.tree_map(lambda x: x.value, primals,
                                                            is_leaf=is_primal)
    want_dbias = bias is not None and any(
        x.perturbed for x in jax.tree_util.tree_leaves(primals[3], is_leaf=is_primal))
    out, lse = static.backend.forward(static, q, k, v, bias, metas, operands)
    # The flag travels as pytree structure (() vs None), residuals being arrays only.
    return (out, lse), (q, k, v, bias, out, lse, metas, operands, () if want_dbias else None)


def backward_lse(lse):
    """The lse the backward kernels read: +inf instead of -inf on rows with no allowed
    key, so P = exp(S − lse) is exactly 0 there even where S = −inf (a −inf bias)."""
    return jnp.where(jnp.isneginf(lse), jnp.inf, lse)


def _bwd(static, residuals, cotangents):
    q, k, v, bias, out, lse, metas, operands, want_dbias = residuals
    dout, dlse = cotangents
    if isinstance(dout, jax.custom_derivatives.SymbolicZero):  # only the lse is used
        dout = jnp.zeros(out.shape, out.dtype)
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    # D = rowsum(dO ∘ O) − dlse, laid out like lse: [B, N, T].
    delta = jnp.einsum("btnh,btnh->bnt", dout.astype(acc), out.astype(acc))
    if dlse is not None and not isinstance(dlse, jax.custom_derivatives.SymbolicZero):
        delta = delta - dlse.astype(acc)
    parts = ("dq", "dkdv") + (("dbias",) if want_dbias is not None else ())
    # dbias stays None for a bias that is not differentiated (a zero cotangent).
    dq, dk, dv, dbias = static.backend.backward(static, q, k, v, bias, out, backward_lse(lse),
                                                dout, delta, metas, operands, parts=parts)
    # Metadata and mask operands are integer data: no cotangent.
    return (dq, dk, dv, dbias, None, None)


flash_attention.defvjp(_fwd, _bwd, symbolic_zeros=True)
