"""ring_attention: the public entry, and the ring as one custom VJP.

`ring_attention` validates, pads T and S to a multiple of the zigzag chunk count, places
the arrays on the mesh and runs `_ring_body` under shard_map: the zigzag permutation
(jaxattn.parallel.layout) around the ring core, whose forward and backward live in
jaxattn.parallel.forward and jaxattn.parallel.backward. A score function's operands are
differentiable inputs of that custom VJP; which of them are differentiated comes from
jax (symbolic zeros), so an operand only read (a fixed bucket table) never asks a kernel
for a gradient it cannot give.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxattn.api import available_implementations, dot_product_attention, validate_inputs
from jaxattn.masks import canonical_mask
from jaxattn.parallel.backward import ring_backward
from jaxattn.parallel.forward import ring_forward
from jaxattn.parallel.layout import zigzag
from jaxattn.parallel.plan import RingConfig
from jaxattn.parallel.scores import step_offsets, step_score_mod
from jaxattn.score_mod import as_score_mod
from jaxattn.sinks import check_sinks
from pallas_kernels.common import acc_dtype

_LAYOUTS = ("contiguous", "zigzag")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_core(cfg: RingConfig, q, k, v, leaves, sinks, score_operands):
    return ring_forward(cfg, q, k, v, leaves, sinks, score_operands)[0]


def ring_core_fwd(cfg, *primals):
    # symbolic_zeros=True: each input arrives as CustomVJPPrimal(value, perturbed).
    is_primal = lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal)  # noqa: E731
    q, k, v, leaves, sinks, score_operands = jax.tree_util.tree_map(
        lambda x: x.value, primals, is_leaf=is_primal)
    # () for a differentiated floating operand, None otherwise (pytree structure, not data).
    flags = tuple(() if x.perturbed and jnp.issubdtype(x.value.dtype, jnp.floating) else None
                  for x in primals[5])
    out, lse = ring_forward(cfg, q, k, v, leaves, sinks, score_operands)
    return out, (q, k, v, leaves, sinks, score_operands, flags, out, lse)


def ring_core_bwd(cfg, residuals, dout):
    if isinstance(dout, jax.custom_derivatives.SymbolicZero):   # the output is not used
        out = residuals[-2]
        dout = jnp.zeros(out.shape, out.dtype)
    return ring_backward(cfg, residuals, dout)


ring_core.defvjp(ring_core_fwd, ring_core_bwd, symbolic_zeros=True)


def _ring_body(cfg: RingConfig, zigzag_inside: bool, q, k, v, leaves, sinks, score_operands):
    if cfg.num_shards == 1:  # one device on the axis: plain attention, no ring
        score = None
        if cfg.score_fn is not None:   # positions are global already; the batch may be split
            shard = ((0, q.shape[1]),), ((0, k.shape[1]),)
            score = step_score_mod(cfg, *shard, (tuple(score_operands),
                                                 step_offsets(cfg, jnp.int32(0), jnp.int32(0), q.shape[0])))
        return dot_product_attention(q, k, v, mask=jax.tree_util.tree_unflatten(cfg.mask_treedef, leaves),
                                     scale=cfg.scale, score_mod=score, sinks=sinks,
                                     implementation=cfg.implementation)
    axis, p = cfg.axis_name, cfg.num_shards
    if zigzag_inside:  # one permute of [q | k | v] stacked on the head axis
        if q.shape[1] == k.shape[1]:
            q, k, v = zigzag((q, k, v), axis, p, False)
        else:
            (q,), (k, v) = zigzag((q,), axis, p, False), zigzag((k, v), axis, p, False)
    out = ring_core(cfg, q, k, v, leaves, sinks, score_operands)
    return zigzag((out,), axis, p, True)[0] if zigzag_inside else out


# ---------------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------------
def _place(x, mesh, spec):
    """Put x on `spec` when the mesh has Explicit axes (shard_map requires it there);
    Auto meshes let shard_map reshard on its own."""
    explicit = jax.sharding.AxisType.Explicit
    if any(t == explicit for t in getattr(mesh, "axis_types", ())):
        return jax.reshard(x, NamedSharding(mesh, spec))
    return x


def _mesh_for(mesh, *arrays):
    """The mesh to run on. On a mesh with Explicit axes (jax.make_mesh's default) the
    output's type carries the mesh, and a `jax.grad` taken outside `jit` then fails in
    JAX unless the caller is inside `jax.set_mesh` (the loss's cotangent is built on the
    mesh without one). Inputs whose types carry no mesh, outside any mesh context, so run
    on the same devices with Auto axes: the same shards, a result typed like its inputs."""
    explicit = jax.sharding.AxisType.Explicit
    if (not isinstance(mesh, jax.sharding.Mesh) or explicit not in mesh.axis_types
            or not jax.sharding.get_abstract_mesh().empty
            or any(not jax.typeof(x).sharding.mesh.empty for x in arrays)):
        return mesh
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def ring_attention(query, key, value, mask=None, *, mesh, axis_name, is_causal=False,
                   scale=None, score_mod=None, sinks=None, implementation=None,
                   sequence_layout="contiguous", batch_axis_name=None):
    """`dot_product_attention` with the sequence axis (axis 1) sharded over `axis_name`.

    Args:
      query [B, T, N, H], key/value [B, S, K, H] (N a multiple of K), any sharding: they
        are placed with T and S split over `axis_name` of `mesh` (and B over
        `batch_axis_name`, if given; other mesh axes see replicated work).
      mask: None, a bool array broadcastable to [B, N, T, S], or a `jaxattn.masks.Mask`,
        always in absolute (natural-order) positions; `is_causal` is AND-ed in.
      scale: defaults to 1/sqrt(H). implementation: as in `dot_product_attention`,
        used for every per-step block (it must differentiate its lse output).
      score_mod: None, a `jaxattn.ScoreMod(fn, *operands)` or a plain callable, as in
        `dot_product_attention`: fn sees the global batch row, query head and the global
        (natural-order) positions q_pos and kv_pos in every ring step, whatever the
        layout. Differentiable like the single-device call: dq/dk/dv through fn, and the
        gradients of its floating operands (summed over steps and devices) wherever the
        per-step implementation gives them (the kernels: operands read at scalar
        indices, such as learned ALiBi slopes).
      sinks: None or float [N]: attention sinks as in `dot_product_attention` (the ring's
        merge starts from them; differentiable).
      sequence_layout: "contiguous" (default: permuted to zigzag order inside and back)
        or "zigzag" (query/key/value are already `x[:, zigzag_permutation(T, P)]`, the
        output comes back in that order; needs T and S multiples of 2P).

    T or S not a multiple of 2P: padded inside (padding keys are never attended, padded
    rows are dropped). Returns [B, T, N, H] in the query's dtype. There is no attention
    dropout here (no dropout arguments): a dropout layer needs `dot_product_attention`.

    Meshes with Explicit axes (`jax.make_mesh`'s default): inputs already placed on the
    mesh, or a call inside `jax.set_mesh`, run on it as given; host arrays called outside
    any mesh context run on the same devices with Auto axes, so `jax.grad` of the result
    works outside `jit` too.
    """
    validate_inputs(query, key, value, None, scale=scale, logits_soft_cap=None)
    if implementation is not None and implementation not in available_implementations():
        raise ValueError(f"implementation: expected None or one of {sorted(available_implementations())}, "
                         f"got {implementation!r}. Leave it None to pick the best available.")
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name: expected one of the mesh axes {tuple(mesh.shape)}, got "
                         f"{axis_name!r}. Pass the mesh axis the sequence is sharded over.")
    if batch_axis_name is not None and (batch_axis_name not in mesh.shape or batch_axis_name == axis_name):
        raise ValueError(f"batch_axis_name: expected None or a mesh axis other than {axis_name!r}, "
                         f"got {batch_axis_name!r}; mesh axes are {tuple(mesh.shape)}.")
    if sequence_layout not in _LAYOUTS:
        raise ValueError(f"sequence_layout: expected one of {_LAYOUTS}, got {sequence_layout!r}.")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal: expected a bool, got {is_causal!r}.")
    b, t, n, h = query.shape
    s = key.shape[1]
    canonical = canonical_mask(mask, is_causal=bool(is_causal))
    canonical.validate(t, s, b, n)
    scale = float(1.0 / math.sqrt(h)) if scale is None else float(scale)
    sinks = check_sinks(sinks, n)
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod.check(acc_dtype(query.dtype))
    p = int(mesh.shape[axis_name])
    if batch_axis_name is not None and b % mesh.shape[batch_axis_name]:
        raise ValueError(f"batch size {b} must be a multiple of the {batch_axis_name!r} axis size "
                         f"{mesh.shape[batch_axis_name]} to shard the batch over it.")
    if sequence_layout == "zigzag" and (t % (2 * p) or s % (2 * p)):
        raise ValueError(f"sequence_layout='zigzag' needs T and S multiples of 2 * {p} (the "
                         f"number of zigzag chunks), got T={t}, S={s}. Use 'contiguous' to pad inside.")
    mesh = _mesh_for(mesh, query, key, value, *jax.tree_util.tree_leaves(canonical))
    return _ring_jit(query, key, value, canonical, sinks, score_mod, mesh=mesh, axis_name=axis_name,
                     scale=scale,
                     implementation=implementation, zigzag_inside=sequence_layout == "contiguous",
                     batch_axis_name=batch_axis_name)


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "scale", "implementation",
                                             "zigzag_inside", "batch_axis_name"))
def _ring_jit(query, key, value, mask, sinks, score_mod, *, mesh, axis_name, scale, implementation,
              zigzag_inside, batch_axis_name):
    b, t = query.shape[:2]
    s = key.shape[1]
    p = int(mesh.shape[axis_name])
    chunks = 2 * p if p > 1 else 1
    tp, sp = -(-t // chunks) * chunks, -(-s // chunks) * chunks
    pad = lambda x, L: jnp.pad(x, [(0, 0), (0, L - x.shape[1]), (0, 0), (0, 0)])  # noqa: E731
    padded = tp != t or sp != s
    if padded:  # (Explicit meshes cannot pad a sharded axis in place: gather it first)
        query, key, value = (_place(x, mesh, PartitionSpec(batch_axis_name)) for x in (query, key, value))
        query, key, value = pad(query, tp), pad(key, sp), pad(value, sp)
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    cfg = RingConfig(axis_name, p, tp // chunks, sp // chunks, t, s, scale, implementation, treedef,
                     score_fn=None if score_mod is None else score_mod.fn,
                     batch_axis_name=batch_axis_name)
    # The score function's operands are small (slopes, tables): replicated on every device.
    score_operands = () if score_mod is None else tuple(
        _place(jnp.asarray(x), mesh, PartitionSpec()) for x in score_mod.operands)
    seq = PartitionSpec(batch_axis_name, axis_name)
    def leaf_spec(x):  # mask data is small next to K/V: replicated, batch-split if B-sized
        x = jnp.asarray(x)
        return PartitionSpec(batch_axis_name) if batch_axis_name and x.ndim and x.shape[0] == b > 1 else PartitionSpec()
    leaf_specs = [leaf_spec(x) for x in leaves]
    query, key, value = (_place(x, mesh, seq) for x in (query, key, value))
    leaves = [_place(jnp.asarray(x), mesh, sp_) for x, sp_ in zip(leaves, leaf_specs)]
    if sinks is not None:
        sinks = _place(sinks, mesh, PartitionSpec())
    out = jax.shard_map(functools.partial(_ring_body, cfg, zigzag_inside), mesh=mesh,
                        in_specs=(seq, seq, seq, leaf_specs, PartitionSpec(),
                                  tuple(PartitionSpec() for _ in score_operands)),
                        out_specs=seq, check_vma=False)(query, key, value, leaves, sinks, score_operands)
    return _place(out, mesh, PartitionSpec(batch_axis_name))[:, :t] if padded else out
