"""Masks that leave unreached rows in PARTIAL tiles: the Mosaic kernels when the inputs
are finite, the Triton kernels (on the same block metadata) when they are not.

The Mosaic kernels select masked scores away (P and, in the backward, dS are exactly 0
for a pair the mask rules out) but do not zero the K/V rows of keys that no query row
of a PARTIAL tile attends, nor Q rows that attend no key of the tile: a wgmma then
multiplies such a row by exact zeros. With finite inputs that contributes exactly
nothing. Only a NaN or Inf held there (padding, unwritten cache slots, a poisoned
document) would reach results, through 0 · NaN = NaN: V in the forward (P·V), K in the
dQ pass (dQ += dS·K; in the fused backward, which adds dQ in the dK/dV pass, K at the
keys its tiles leave unattended) and Q in the dK/dV pass (dK += dSᵀ·Q). A key some row of
the tile attends is multiplied unzeroed by both kernels; neither lets V, D or the soft
cap's tanh into dS where P is 0 (Mosaic selects dS where P is 0, Triton where the mask
rules a pair out: they differ only where an attended pair's P underflows to 0 in a row
whose D is already NaN); and both rule the query tile's padding rows out of PARTIAL tiles.

So where the block metadata says such rows may exist (BlockMetadata.partial_isolates_*:
every mask holding traced data, such as segment ids and sequence lengths, and static masks
whose edges cut tiles), a call first checks those inputs. All finite, the common case:
the Mosaic kernels. Otherwise: the Triton kernels, which zero those rows, with tiles
equal to the Mosaic ones so that the same metadata drives them. Both paths are
compiled. Masks that provably leave no such rows (causal with T = S, aligned windows,
BigBird's block patterns) never pay for the check.

For static masks the metadata also lists where those rows are (BlockMetadata.
isolated_keys / isolated_queries): the forward tiles' unattended keys for V, the dQ
tiles' unattended keys for K (and the dK/dV tiles' too, fused) and the dK/dV tiles'
unattended queries for Q. The check then gathers those rows alone: a strided plan's
`Causal & ~Local(1, 0)` part on 128-row residue classes leaves the last two keys and the
first two queries of each class unattended, and reads 1/64 of V, K and Q instead of all
of them. Dynamic masks (segment ids, lengths) and long lists check every row.
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


def backward_needs_check(metas, parts, fused: bool = False) -> bool:
    """`fused`: the fused backward runs this call (dQ added inside the dK/dV tiles)."""
    return (("dq" in parts and metas["dq"].partial_isolates_keys)
            or ("dkdv" in parts and metas["dkdv"].partial_isolates_queries)
            or (fused and metas["dkdv"].partial_isolates_keys))


def fused_backward(static, parts) -> bool:
    """Whether the fused Mosaic backward (MosaicBackwardConfig.fused) serves this call."""
    return bool(getattr(static.config.backward, "fused", False)) and {"dq", "dkdv"} <= set(parts)


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
    """(out, lse) of the Mosaic forward, or of the Triton forward when V holds NaN/Inf at
    a key a forward tile leaves unattended."""
    triton_static = _triton_static(static)
    keys = _isolated(metas, "forward", "isolated_keys")
    return lax.cond(_all_finite(_rows(v, keys)),
                    lambda: mosaic_forward(static, q, k, v, bias, metas, operands),
                    lambda: _triton.forward(triton_static, q, k, v, bias, metas, operands))


def guarded_backward(mosaic_backward, static, q, k, v, bias, out, lse, dout, delta, metas,
                     operands, parts):
    """(dq, dk, dv, dbias) of the Mosaic backward, or of the Triton backward when K holds
    NaN/Inf at a key a dQ tile leaves unattended (a dK/dV tile too, fused) or Q at a query
    a dK/dV tile does."""
    triton_static = _triton_static(static)
    templates = (q, k, v, bias)

    def mosaic():
        return _like(mosaic_backward(static, q, k, v, bias, out, lse, dout, delta, metas,
                                     operands, parts=parts), templates)

    def triton():
        return _like(_triton.backward(triton_static, q, k, v, bias, out, lse, dout, delta, metas,
                                      operands, parts=parts), templates)

    keys = _isolated(metas, "dq", "isolated_keys", wanted="dq" in parts)
    if fused_backward(static, parts):   # dQ += dS·K inside the dK/dV tiles as well
        fused_keys = _isolated(metas, "dkdv", "isolated_keys")
        keys = None if keys is None or fused_keys is None else np.union1d(keys, fused_keys)
    queries = _isolated(metas, "dkdv", "isolated_queries", wanted="dkdv" in parts)
    return lax.cond(_all_finite(_rows(q, queries), _rows(k, keys)), mosaic, triton)
