"""Glue between masks and kernel backends: canonical Mask → block metadata + mask
operands → the backend-neutral custom VJP (pallas_kernels/flash_vjp.py).

Backends are known only by name, through pallas_kernels/registry.py: each call asks the
backend whether it `supports` the request (a reason becomes NotImplementedError, so
`implementation=None` falls back) and for its `default_config`. A new backend plugs in
with no change here or in the masks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backend import KernelRequest
from pallas_kernels.common import acc_dtype, backward_lse
from pallas_kernels.dropout import seed_array, with_offsets
from pallas_kernels.flash_vjp import FlashStatic, flash_attention
from pallas_kernels.metadata import BlockMetadata
from pallas_kernels.registry import get_backend
from jaxattn.masks import FullMask, Mask, build_block_metadata


def _as_jnp(meta: BlockMetadata) -> BlockMetadata:
    return jax.tree_util.tree_map(jnp.asarray, meta)


def default_interpret() -> bool:
    """Run kernels in Pallas interpret mode when there is no GPU (CPU tests, CI)."""
    return jax.default_backend() != "gpu"


def kernel_request(query, key, bias, mask: Mask, logits_soft_cap, dropout_rate=0.0,
                   score_mod=None) -> KernelRequest:
    """The request a backend's supports() and default_config() see (bias already 4-d)."""
    b, t, n, h = query.shape
    s, kh = key.shape[1], key.shape[2]
    devices = jax.devices()
    return KernelRequest(
        dtype=query.dtype, batch=b, q_len=t, kv_len=s, num_heads=n, num_kv_heads=kh, head_dim=h,
        has_bias=bias is not None, bias_shape=None if bias is None else tuple(bias.shape),
        operand_kinds=tuple((o.kind, o.layout_block) for o in mask.operands()),
        has_partial_tiles=not isinstance(mask, FullMask), logits_soft_cap=logits_soft_cap,
        dropout_rate=float(dropout_rate), has_score_mod=score_mod is not None,
        platform=jax.default_backend(), device_kind=devices[0].device_kind if devices else None)


def _served(backend_name: str, request: KernelRequest, config, interpret):
    """(backend, config) for the call, or NotImplementedError with the backend's reason."""
    backend = get_backend(backend_name)
    reason = backend.supports(request, interpret=interpret)
    if reason is not None:
        raise NotImplementedError(f"{backend_name} cannot serve this call: {reason}")
    return backend, config if config is not None else backend.default_config(request, interpret=interpret)


def decline_reason(backend_name: str, query, key, mask: Mask, *, scale, logits_soft_cap):
    """Why kernel backend `backend_name` would decline pallas_attention(query, key, ...,
    mask) without a bias (its supports() or its block metadata check), or None when it
    serves the call. No kernel runs; a mask holding arrays builds its block metadata
    (jnp operations, dead code under jit)."""
    interpret = default_interpret()
    request = kernel_request(query, key, None, mask, logits_soft_cap)
    try:
        _, config = _served(backend_name, request, None, interpret)
        prepare_call(backend_name, mask, query.shape[1], key.shape[1], scale=scale,
                     logits_soft_cap=logits_soft_cap, config=config, interpret=interpret)
    except NotImplementedError as e:
        return str(e)
    return None


def explicitly_sharded(query, key, value) -> bool:
    """Whether the inputs carry an explicit sharding over batch or heads (pallas_attention
    then runs the kernels per shard under shard_map)."""
    return _explicit_sharding_plan(query, key, value) is not None


def pallas_attention(backend_name: str, query, key, value, bias, mask: Mask, *, scale,
                     logits_soft_cap, return_residuals, dropout_rate=0.0, dropout_seed=None,
                     broadcast_dropout=False, config=None, interpret=None, score_mod=None):
    """Implementation entry point (see jaxattn.api's dispatch contract). `config` and
    `interpret` default to the backend's default config and to interpret mode exactly
    when there is no GPU. Attention dropout (jaxattn.dropout's keep-mask, regenerated in
    the kernels): `dropout_rate` in [0, 1), `dropout_seed` an integer scalar (traced is
    fine) taken as uint32, `broadcast_dropout` one mask for every batch row and head.
    `score_mod` is a jaxattn.ScoreMod or None."""
    if interpret is None:
        interpret = default_interpret()
    if bias is not None:
        bias = jnp.reshape(bias, (1,) * (4 - bias.ndim) + tuple(bias.shape))
    dropout_rate = float(dropout_rate)
    request = kernel_request(query, key, bias, mask, logits_soft_cap, dropout_rate, score_mod)
    _, config = _served(backend_name, request, config, interpret)
    seed = seed_array(dropout_seed) if dropout_rate else None
    call = functools.partial(_pallas_jit, backend_name=backend_name, scale=scale,
                             logits_soft_cap=logits_soft_cap, return_residuals=return_residuals,
                             dropout_rate=dropout_rate, broadcast_dropout=bool(broadcast_dropout),
                             config=config, interpret=interpret)
    plan = _explicit_sharding_plan(query, key, value)
    if plan is None:
        return call(query, key, value, bias, mask, seed, score_mod)
    if score_mod is not None:
        raise NotImplementedError("score_mod with explicitly sharded inputs is not wired yet; "
                                  "run it under shard_map or use implementation='reference'")
    return _sharded_call(call, plan, query, key, value, bias, mask, seed, return_residuals)


# ---------------------------------------------------------------------------------
# Explicit sharding (jax.make_mesh's default axis type): a kernel sees whole arrays, so
# inputs sharded over batch and/or heads run the kernel per shard under shard_map. Every
# (batch row, head) is independent, so this is exact; the mask's arrays follow the batch
# and head axes they carry; attention dropout's seed operand gets each shard's first
# batch row and head, so the shards draw the whole call's keep-mask. Sequence-sharded
# inputs need jaxattn.ring_attention.
# ---------------------------------------------------------------------------------
def _spec4(x):
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 - not a jax value with a sharding
        return None, None
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or spec is None or getattr(mesh, "empty", True):
        return None, None
    return mesh, tuple(spec) + (None,) * (4 - len(spec))


def _explicit_sharding_plan(query, key, value):
    mesh, qspec = _spec4(query)
    if mesh is None or all(a is None for a in qspec):
        return None
    _, kspec = _spec4(key)
    _, vspec = _spec4(value)
    if qspec[1] is not None or qspec[3] is not None or kspec[1] is not None or kspec[3] is not None:
        raise NotImplementedError("inputs sharded along the sequence or head dim: use "
                                  "jaxattn.ring_attention for sequence (context) parallelism")
    if kspec != vspec or kspec[0] != qspec[0] or (qspec[2] is not None and kspec[2] != qspec[2]):
        raise NotImplementedError("query, key and value must share their batch sharding, and "
                                  "key/value heads must be sharded like query heads")
    return mesh, qspec[0], qspec[2]


def _leaf_spec(leaf, batch, heads, b_axis, h_axis):
    dims = [None] * leaf.ndim
    if leaf.ndim >= 1 and batch > 1 and leaf.shape[0] == batch:
        dims[0] = b_axis
    if leaf.ndim == 4 and heads > 1 and leaf.shape[1] == heads:
        dims[1] = h_axis
    return jax.sharding.PartitionSpec(*dims)


def _sharded_call(call, plan, query, key, value, bias, mask, seed, return_residuals):
    mesh, b_axis, h_axis = plan
    P = jax.sharding.PartitionSpec
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    b, n = query.shape[0], query.shape[2]
    leaf_specs = tuple(_leaf_spec(x, b, n, b_axis, h_axis) for x in leaves)
    qkv_spec = P(b_axis, None, h_axis, None)
    out_specs = (qkv_spec, P(b_axis, h_axis, None)) if return_residuals else qkv_spec

    bias_spec = None if bias is None else _leaf_spec(bias, b, n, b_axis, h_axis)

    def local(q, k, v, bias, leaves, seed):
        if seed is not None:   # dropout: this shard's first batch row and query head
            seed = with_offsets(seed, _shard_index(b_axis) * q.shape[0],
                                _shard_index(h_axis) * q.shape[2])
        local_mask = jax.tree_util.tree_unflatten(treedef, leaves)
        # A mask's jax arrays arrive sharded like the inputs; its static (numpy) data does
        # not, and per-row or per-head static data would be read at the wrong rows.
        bm, hm = local_mask.batch_heads()
        if bm not in (1, q.shape[0]) or hm not in (1, q.shape[2]):
            raise NotImplementedError(
                f"the mask holds static (numpy) data per batch row or head ([{bm}, {hm}, ...]) "
                f"and the inputs are sharded over those ([{q.shape[0]}, {q.shape[2]}] per shard): "
                "pass that data as a jax array (e.g. DenseMask(jnp.asarray(allowed))) so each "
                "shard receives its own rows")
        return call(q, k, v, bias, local_mask, seed, None)

    seed_spec = None if seed is None else P()
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(qkv_spec, qkv_spec, qkv_spec, bias_spec, leaf_specs, seed_spec),
                         out_specs=out_specs, check_vma=False)(query, key, value, bias, tuple(leaves),
                                                               seed)


def _shard_index(axis):
    """Index of this shard along a sharded dim's mesh axis (or axes); 0 when unsharded."""
    return 0 if axis is None else jax.lax.axis_index(axis)


def prepare_call(backend_name: str, mask: Mask, q_len: int, kv_len: int, *, scale,
                 logits_soft_cap, config, interpret, dropout_rate=0.0, broadcast_dropout=False,
                 score_mod=None):
    """The static description, per-kernel block metadata and mask operands of one call,
    or NotImplementedError where the backend's metadata_reason refuses the metadata."""
    static, metas, operands = build_call(backend_name, mask, q_len, kv_len, scale=scale,
                                         logits_soft_cap=logits_soft_cap, config=config,
                                         interpret=interpret, dropout_rate=dropout_rate,
                                         broadcast_dropout=broadcast_dropout, score_mod=score_mod)
    metadata_reason = getattr(static.backend, "metadata_reason", None)
    reason = None if metadata_reason is None else metadata_reason(static, metas)
    if reason is not None:
        raise NotImplementedError(f"{backend_name} cannot serve this call: {reason}")
    return static, metas, operands


def build_call(backend_name: str, mask: Mask, q_len: int, kv_len: int, *, scale,
               logits_soft_cap, config, interpret, dropout_rate=0.0, broadcast_dropout=False,
               score_mod=None):
    """prepare_call without the metadata check (kernel tests drive kernels directly)."""
    metas = {name: _as_jnp(build_block_metadata(mask, q_len, kv_len, bq, bk))
             for name, (bq, bk) in config.metadata_tiles().items()}
    operands = mask.operands()
    static = FlashStatic(
        backend=get_backend(backend_name), scale=scale, logits_soft_cap=logits_soft_cap,
        mask_fn=None if isinstance(mask, FullMask) else mask.evaluate,
        operand_kinds=tuple((o.kind, o.layout_block) for o in operands),
        config=config, interpret=interpret, dropout_rate=dropout_rate,
        broadcast_dropout=broadcast_dropout,
        score_mod=None if score_mod is None else score_mod.fn,
        score_operand_shapes=() if score_mod is None else tuple(
            tuple(x.shape) for x in score_mod.operands))
    return static, metas, tuple(jnp.asarray(o.array) for o in operands)


@functools.partial(jax.jit, static_argnames=("backend_name", "scale", "logits_soft_cap",
                                             "return_residuals", "dropout_rate",
                                             "broadcast_dropout", "config", "interpret"))
def _pallas_jit(query, key, value, bias, mask, seed, score_mod, *, backend_name, scale,
                logits_soft_cap, return_residuals, dropout_rate, broadcast_dropout, config,
                interpret):
    static, metas, operands = prepare_call(
        backend_name, mask, query.shape[1], key.shape[1], scale=scale,
        logits_soft_cap=logits_soft_cap, config=config, interpret=interpret,
        dropout_rate=dropout_rate, broadcast_dropout=broadcast_dropout, score_mod=score_mod)
    score_operands = () if score_mod is None else tuple(jnp.asarray(x) for x in score_mod.operands)
    out, lse = flash_attention(static, query, key, value, bias, metas, operands, seed, score_operands)
    if return_residuals:
        return out, lse.astype(acc_dtype(query.dtype))
    return out


def pallas_backward(backend_name: str, q, k, v, out, lse, dout, delta, mask: Mask, *, scale,
                    logits_soft_cap=None, config=None, interpret=None, parts=("dq", "dkdv"),
                    score_mod=None, score_grads=()):
    """The kernels' backward alone, from given residuals: (dq, dk, dv) for
    D = `delta` (rowsum(dO ∘ O) − dlse, [B, N, T]). Used where out/lse come from a merge
    of several calls (ring attention), so no forward is recomputed. `parts` as in the
    backends' backward: ("dkdv",) runs the dK/dV kernel alone (dq comes back None).
    With a `score_mod` (jaxattn.ScoreMod) the result has a fourth member: the gradients
    of its operands flagged in `score_grads` (None for the others)."""
    if interpret is None:
        interpret = default_interpret()
    request = kernel_request(q, k, None, mask, logits_soft_cap, score_mod=score_mod)
    backend, config = _served(backend_name, request, config, interpret)
    static, metas, operands = prepare_call(
        backend_name, mask, q.shape[1], k.shape[1], scale=scale,
        logits_soft_cap=logits_soft_cap, config=config, interpret=interpret, score_mod=score_mod)
    acc = acc_dtype(q.dtype)
    score = {} if score_mod is None else {
        "score_operands": tuple(jnp.asarray(x) for x in score_mod.operands),
        "score_grads": tuple(score_grads) + (False,) * (len(score_mod.operands) - len(score_grads))}
    dq, dk, dv, _, *dscore = backend.backward(
        static, q, k, v, None, out, backward_lse(lse.astype(acc)), dout.astype(q.dtype),
        delta.astype(acc), metas, operands, parts=tuple(parts), **score)
    return (dq, dk, dv) if score_mod is None else (dq, dk, dv, dscore[0])
