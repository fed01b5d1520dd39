"""Backend-neutral FlashAttention custom VJP.

Every kernel backend (pallas_kernels/backend.py) implements the same two calls

    backend.forward(static, q, k, v, bias, metas, operands)         -> (out, lse)
    backend.backward(static, q, k, v, bias, out, lse, dout, delta,
                     metas, operands, parts=("dq", "dkdv", "dbias")) -> (dq, dk, dv, dbias)

(with attention dropout, static.dropout_rate > 0, both also get `dropout_seed=`, a
uint32 [4] array, pallas_kernels.dropout.seed_array; only backends whose supports()
accepts dropout are called so)

on unpadded BTNH arrays, where `metas` maps the names of
`static.config.metadata_tiles()` ("forward", "dkdv", "dq") to the BlockMetadata built
for that kernel's tile shape; this module wires them into one `jax.custom_vjp`. `parts`
asks for the dQ and/or the dK/dV half alone, and for the bias gradient or not (dbias is
asked for only when the bias is differentiated); what was not asked for is None. The
metadata (pallas_kernels/metadata.py) and the mask operands travel as ordinary,
non-differentiable inputs, so a traced SegmentMask works under jit and grad.

Backward identities (FlashAttention-2, Algorithm 2), with P = softmax(S) and
D_i = Σ_j dO_ij · O_ij = rowsum(dO ∘ O):
    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − D),   dQ = scale · dS K,   dK = scale · dSᵀ Q.
A cotangent on the lse output adds P ∘ dlse to dS, i.e. D ← D − dlse, so attention
built from merged partial results (ring attention) differentiates exactly.

Attention dropout (pallas_kernels/dropout.py) keeps m, l and the lse those of the
undropped P and makes O = (P ∘ Z) V with Z = keep / (1 − rate). Then dV = (P ∘ Z)ᵀ dO
and dP = (dO Vᵀ) ∘ Z, while D_i = Σ_j P_ij dP_ij = Σ_j P_ij Z_ij (dO_i · V_j) = dO_i · O_i
is still rowsum(dO ∘ O): the identities above hold with those two substitutions.

With a score function (FlashStatic.score_mod) the logits are fn(S) and dS above is the
gradient with respect to fn's output; the kernels pull it back through fn with jax's own
derivative of fn (pallas_kernels/score_mod.py). Its operands (`score_operands`) are
differentiable inputs: then `forward` takes ``score_operands=`` and `backward` takes
``score_operands=`` and ``score_grads`` (which operands want a gradient) and returns a
fifth result, the tuple of operand gradients (None where not wanted).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels.common import DeltaOfOutput, backward_lse
from pallas_kernels.metadata import BlockMetadata


@dataclasses.dataclass(frozen=True)
class FlashStatic:
    """Everything static about one attention call (hashable: part of the jit key).

    backend        the KernelBackend (pallas_kernels/backend.py) running the call
    scale          multiplies q·k
    logits_soft_cap  c of c·tanh(logits / c), or None
    mask_fn        the mask inside a PARTIAL tile, or None for the full mask (then no tile
                   is PARTIAL): ``mask_fn(q_pos, kv_pos, operand_tiles) -> bool`` with
                   q_pos int32 [block_q, 1] and kv_pos int32 [1, block_kv] absolute
                   positions, and operand_tiles one loaded tile per mask operand, in the
                   order of operand_kinds ("q" [block_q, 1], "kv" [1, block_kv], "qkv"
                   [block_q, block_kv], "block" a scalar; pallas_kernels/metadata.py).
                   Built from jnp element-wise ops only, so it lowers in every backend;
                   its result broadcasts to [block_q, block_kv]. The kernel ANDs it with
                   ``kv_pos < kv_len`` (key padding).
    operand_kinds  ((kind, layout_block), ...) matching the `operands` arrays
    config         the backend's config (tile sizes and whatever else it tunes)
    interpret      run the kernels in Pallas interpret mode (CPU)
    dropout_rate   attention dropout's rate (0.0: none); the seed is an array input
    broadcast_dropout  one keep-mask for every batch row and head (batch = head = 0)
    score_mod      None, or ``fn(score, batch, head, q_pos, kv_pos, *operand_views) ->
                   score`` applied after the scale, bias and soft cap and before the mask;
                   element-wise jnp, reading its operands only by indexing the views
                   (pallas_kernels/score_mod.py). Hashable.
    score_operand_shapes  the shapes of the score operands (they reach the kernels
                   flattened; the views index them by these shapes)
    """

    backend: Any
    scale: float
    logits_soft_cap: float | None
    mask_fn: Callable | None
    operand_kinds: tuple
    config: Any
    interpret: bool
    dropout_rate: float = 0.0
    broadcast_dropout: bool = False
    score_mod: Callable | None = None
    score_operand_shapes: tuple = ()


def flash_attention(static: FlashStatic, q, k, v, bias, metas: dict[str, BlockMetadata],
                    operands: tuple, dropout_seed=None, score_operands: tuple = ()):
    """(out [B, T, N, H], lse [B, N, T] float32 natural log; -inf on empty rows).
    bias: None or additive logits [Bb, Hb, T|1, S|1] (Bb in {1, B}, Hb in {1, N}).
    dropout_seed: uint32 [4] (pallas_kernels.dropout.seed_array: the seed, batch and head
    offsets) when static.dropout_rate > 0, else None. score_operands: the arrays
    static.score_mod reads (differentiable)."""
    return _flash(static, q, k, v, bias, metas, operands, dropout_seed, tuple(score_operands))


def _score_kwargs(static, score_operands):
    return {} if static.score_mod is None else {"score_operands": score_operands}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, bias, metas, operands, dropout_seed, score_operands):
    return static.backend.forward(static, q, k, v, bias, metas, operands,
                                  **_seed_argument(static, dropout_seed),
                                  **_score_kwargs(static, score_operands))


def _seed_argument(static, dropout_seed):
    """The seed keyword for a call with dropout; nothing otherwise (backends that decline
    dropout never see the keyword)."""
    if not static.dropout_rate:
        return {}
    if dropout_seed is None:
        raise ValueError("flash_attention: expected a uint32 [4] dropout_seed with "
                         f"dropout_rate={static.dropout_rate}, got None. Pass "
                         "pallas_kernels.dropout.seed_array(seed).")
    return {"dropout_seed": dropout_seed}


def _fwd(static, *primals):
    # symbolic_zeros=True: each array input arrives as CustomVJPPrimal(value, perturbed),
    # which tells whether the bias is differentiated (a constant bias needs no dbias).
    is_primal = lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal)  # noqa: E731
    q, k, v, bias, metas, operands, seed, score_operands = jax.tree_util.tree_map(
        lambda x: x.value, primals, is_leaf=is_primal)
    want_dbias = bias is not None and any(
        x.perturbed for x in jax.tree_util.tree_leaves(primals[3], is_leaf=is_primal))
    # Which score operands are differentiated (floating ones only).
    score_grads = tuple(bool(p.perturbed) and jnp.issubdtype(p.value.dtype, jnp.floating)
                        for p in primals[7])
    out, lse = static.backend.forward(static, q, k, v, bias, metas, operands,
                                      **_seed_argument(static, seed),
                                      **_score_kwargs(static, score_operands))
    # The flags travel as pytree structure (() vs None), residuals being arrays only.
    flags = (() if want_dbias else None, tuple(() if w else None for w in score_grads))
    return (out, lse), (q, k, v, bias, out, lse, metas, operands, seed, score_operands, flags)


def _bwd(static, residuals, cotangents):
    q, k, v, bias, out, lse, metas, operands, seed, score_operands, flags = residuals
    want_dbias, score_flags = flags
    dout, dlse = cotangents
    if isinstance(dout, jax.custom_derivatives.SymbolicZero):  # only the lse is used
        dout = jnp.zeros(out.shape, out.dtype)
    # D = rowsum(dO ∘ O) − dlse, laid out like lse: [B, N, T]. Left to the backend, which
    # may form it in its own kernels (pallas_kernels.common.DeltaOfOutput).
    if dlse is None or isinstance(dlse, jax.custom_derivatives.SymbolicZero):
        dlse = None
    delta = DeltaOfOutput(dlse)
    parts = ("dq", "dkdv") + (("dbias",) if want_dbias is not None else ())
    # dbias stays None for a bias that is not differentiated (a zero cotangent).
    seed_kw = _seed_argument(static, seed)
    if static.score_mod is None:
        dq, dk, dv, dbias = static.backend.backward(static, q, k, v, bias, out, backward_lse(lse),
                                                    dout, delta, metas, operands, parts=parts,
                                                    **seed_kw)
        dscore = (None,) * len(score_operands)
    else:
        score_grads = tuple(f is not None for f in score_flags)
        dq, dk, dv, dbias, dscore = static.backend.backward(
            static, q, k, v, bias, out, backward_lse(lse), dout, delta, metas, operands,
            parts=parts, score_operands=score_operands, score_grads=score_grads, **seed_kw)
    # Metadata, mask operands and the seed are integer data: no cotangent.
    return (dq, dk, dv, dbias, None, None, None, tuple(dscore))


_flash.defvjp(_fwd, _bwd, symbolic_zeros=True)
