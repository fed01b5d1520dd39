"""Masks that leave unreached rows in PARTIAL tiles: the Mosaic kernels when the inputs
are finite, the Triton kernels (on the same block metadata) when they are not.

The Mosaic kernels select masked scores away but do not zero the K/V rows of keys that
no query row of a PARTIAL tile attends (nor, in the dK/dV kernel, Q rows that attend no
key of the tile): a wgmma then multiplies such a row by exact zeros. With finite inputs
that contributes exactly nothing. Only a NaN or Inf held there (padding, unwritten
cache slots, a poisoned document) would reach results, through 0 · NaN = NaN.

So where the block metadata says such rows may exist (BlockMetadata.partial_isolates_*:
every mask holding traced data, such as segment ids and sequence lengths, and static masks
whose edges cut tiles), a call first checks its inputs: V in the forward (P·V is the
only product there that meets an unattended key unselected), Q, K and V in the backward
(dP = dO·Vᵀ, dQ += dS·K, dK += dSᵀ·Q). All finite, the common case: the Mosaic kernels.
Otherwise: the Triton kernels, which zero those rows, with tiles equal to the Mosaic
ones so that the same metadata drives them. Both paths are compiled. Masks that
provably leave no such rows (causal with T = S, aligned windows, BigBird's block
patterns) never pay for the check.

The check reads only the rows where the two kernels can differ: a NaN in a key that
every PARTIAL tile holding it has some row attend reaches the same rows in both
(0 · NaN inside that tile's product, Triton zeroes only unattended rows). For static
masks the metadata lists those positions (BlockMetadata.isolated_keys /
isolated_queries), the same facts that decide whether a check runs: V at the forward
tiles' unattended keys; K and V at the dQ tiles' unattended keys and Q at the dK/dV
tiles' unattended queries in the backward. The check gathers those rows alone: a
strided plan's `Causal & ~Local(1, 0)` part on 128-row residue classes leaves the last
two keys and the first two queries of each class unattended, and reads 1/64 of the
tensors instead of all of them. Dynamic masks (segment ids, lengths) and long lists
check every row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import triton as _triton
from pallas_kernels.metadata import decode_positions
from pallas_kernels.triton.config import TritonConfig


def fallback_config(config) -> TritonConfig:
    """The Triton kernels at the tiles of a MosaicConfig (forward) and its
    MosaicBackwardConfig (dQ, dK/dV), so they walk the metadata built for Mosaic."""
    tiles = config.metadata_tiles()
    (bq, bk), (bq_dkv, bk_dkv), (bq_dq, bk_dq) = tiles["forward"], tiles["dkdv"], tiles["dq"]
    return TritonConfig(block_q=bq, block_kv=bk, num_warps=8, num_stages=2,
                        block_q_dkv=bq_dkv, block_kv_dkv=bk_dkv, block_q_dq=bq_dq,
                        block_kv_dq=bk_dq, num_warps_bwd=8, num_stages_bwd=2)


def _triton_static(static):
    """The call's static description for the Triton kernels at the Mosaic tiles."""
    return dataclasses.replace(static, backend=_triton, config=fallback_config(static.config))


def forward_needs_check(metas) -> bool:
    return bool(metas["forward"].partial_isolates_keys)


def backward_needs_check(metas, parts) -> bool:
    return (("dq" in parts and metas["dq"].partial_isolates_keys)
            or ("dkdv" in parts and metas["dkdv"].partial_isolates_queries))


def _isolated(metas, name, field, wanted=True):
    """`field` (isolated_keys or isolated_queries) of kernel `name`'s metadata as int32
    positions: none when that kernel does not run (or is not `wanted`), None when the
    metadata does not list them (every position may be isolated)."""
    if not wanted or name not in metas:
        return np.zeros(0, np.int32)
    raw = getattr(metas[name], field)
    return None if raw is None else decode_positions(raw)


def _rows(x, positions):
    """The rows of x [B, L, N, H] at these sequence positions (all of x for None)."""
    return x if positions is None else jnp.take(x, jnp.asarray(positions), axis=1)


@jax.custom_batching.custom_vmap
def _all_finite(*xs):
    finite = jnp.bool_(True)
    for x in xs:
        finite = finite & jnp.all(jnp.isfinite(x))
    return finite


@_all_finite.def_vmap
def _all_finite_over_the_batch(axis_size, in_batched, *xs):
    """Under vmap one flag for the whole batch, not one per example: a batched predicate
    would turn the cond into a select that runs both kernels on every call. A single
    non-finite example sends the whole batch to the Triton kernels (right for every
    example, only slower)."""
    del axis_size, in_batched
    return _all_finite(*xs), False


def _like(results, templates):
    """Cast each result to its template's dtype (None stays None), so both branches of
    the cond return the same types."""
    return tuple(None if r is None else r.astype(t.dtype) for r, t in zip(results, templates))


def guarded_forward(mosaic_forward, static, q, k, v, bias, metas, operands):
    """(out, lse) of the Mosaic forward, or of the Triton forward when V holds NaN/Inf."""
    triton_static = _triton_static(static)
    keys = _isolated(metas, "forward", "isolated_keys")
    return lax.cond(_all_finite(_rows(v, keys)),
                    lambda: mosaic_forward(static, q, k, v, bias, metas, operands),
                    lambda: _triton.forward(triton_static, q, k, v, bias, metas, operands))


def guarded_backward(mosaic_backward, static, q, k, v, bias, out, lse, dout, delta, metas,
                     operands, parts):
    """(dq, dk, dv, dbias) of the Mosaic backward, or of the Triton backward when Q, K or
    V hold NaN/Inf."""
    triton_static = _triton_static(static)
    templates = (q, k, v, bias)

    def mosaic():
        return _like(mosaic_backward(static, q, k, v, bias, out, lse, dout, delta, metas,
                                     operands, parts=parts), templates)

    def triton():
        return _like(_triton.backward(triton_static, q, k, v, bias, out, lse, dout, delta, metas,
                                      operands, parts=parts), templates)

    keys = _isolated(metas, "dq", "isolated_keys", wanted="dq" in parts)
    queries = _isolated(metas, "dkdv", "isolated_queries", wanted="dkdv" in parts)
    return lax.cond(_all_finite(_rows(q, queries), _rows(k, keys), _rows(v, keys)), mosaic, triton)
