"""The plan of a ring: which attention call each device makes at each ring step.

Masks speak ABSOLUTE positions; a device computing its query chunks against a remote
K/V shard needs the mask at shifted, and (zigzag) piecewise, positions. The device index
and ring step are traced inside shard_map, but the ring loop is unrolled, so the step s
is static, and for every device d (a Python loop at trace time) the pair (d, src) and
every global offset are static ints. For each (d, s), `jaxattn.parallel.masks.localize`
turns the global mask into an exact mask in the local coordinates of the call (see
there); under zigzag causal attention every local problem is CausalMask() or FullMask().

Statically empty (device, step) pairs compute nothing; masks holding traced data get a
``lax.cond`` on their chunk-level tile states (`maybe_skip`). Devices whose local
problems have the same static structure share one ``lax.switch`` branch (`dispatch`;
their traced mask data is selected by device index), so a causal ring compiles two or
three distinct kernel calls per step, not P.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp

from pallas_kernels.metadata import EMPTY
from jaxattn.masks import Mask
from jaxattn.parallel.masks import localize, merge_pieces, shift

@dataclasses.dataclass(frozen=True)
class RingConfig:
    axis_name: str
    num_shards: int
    chunk_q: int
    chunk_kv: int
    q_len: int            # unpadded T
    kv_len: int           # unpadded S
    scale: float
    implementation: str | None
    mask_treedef: object
    score_fn: object = None               # the ScoreMod's fn (jaxattn.parallel.scores), or None
    batch_axis_name: str | None = None    # the mesh axis the batch is split over, or None


@dataclasses.dataclass(frozen=True)
class Call:
    """One dot_product_attention call: local rows and columns as (local_start, length)
    slices of the device's shards, and the mask in the call's coordinates."""
    q_slices: tuple
    kv_slices: tuple
    mask: Mask


def _slices(pieces_with_local):
    out = []
    for local, n in pieces_with_local:
        if out and out[-1][0] + out[-1][1] == local:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((local, n))
    return tuple(out)


def device_call(cfg: RingConfig, mask: Mask, d: int, src: int):
    """The call device d makes with the K/V shard of device src, or None."""
    p, cq, ck = cfg.num_shards, cfg.chunk_q, cfg.chunk_kv
    def chunks(dev, c, length):  # (local slot start, global start, valid length)
        return [(slot * c, g * c, max(0, min(c, length - g * c)))
                for slot, g in enumerate((dev, 2 * p - 1 - dev))]
    qs, ks = chunks(d, cq, cfg.q_len), chunks(src, ck, cfg.kv_len)
    live = [[qn > 0 and kn > 0 and shift(mask, qg, qn, kg, kn) is not None
             for (_, kg, kn) in ks] for (_, qg, qn) in qs]
    live_rows = [i for i in range(2) if any(live[i])]
    live_cols = [j for j in range(2) if any(live[i][j] for i in range(2))]
    if not live_rows:
        return None
    qp = merge_pieces([qs[i][1:] for i in live_rows])
    kp = merge_pieces([ks[j][1:] for j in live_cols])
    local = localize(mask, qp, kp)
    if local is None:
        return None
    return Call(_slices([(qs[i][0], qs[i][2]) for i in live_rows]),
                _slices([(ks[j][0], ks[j][2]) for j in live_cols]), local)


def rows(x, slices, axis=1):
    """The rows of x (along `axis`) named by a call's (start, length) slices."""
    parts = [jax.lax.slice_in_dim(x, s, s + n, axis=axis) for s, n in slices]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def update_rows(x, new, slices, axis=1):
    """x with the rows named by `slices` replaced by `new` (as returned by `rows`)."""
    off = 0
    for s, n in slices:
        x = jax.lax.dynamic_update_slice_in_dim(
            x, jax.lax.slice_in_dim(new, off, off + n, axis=axis), s, axis=axis)
        off += n
    return x


def dispatch(calls, device, body, carry, *args):
    """Run body(call, carry, *args) with this device's call (calls: one per device, None
    = nothing to do). Devices whose calls have the same static structure share one
    lax.switch branch; their traced mask data (leaves) are stacked and picked by device."""
    def key(c):
        return None if c is None else (c.q_slices, c.kv_slices, jax.tree_util.tree_structure(c.mask))
    keys = list(dict.fromkeys(key(c) for c in calls))
    table = np.array([keys.index(key(c)) for c in calls], np.int32)
    reps = [next(c for c in calls if key(c) == k) for k in keys]
    leaves = []
    for g, rep in enumerate(reps):
        if rep is None or not jax.tree_util.tree_leaves(rep.mask):
            leaves.append(())
            continue
        per_device = [jax.tree_util.tree_leaves((c if table[d] == g else rep).mask)
                      for d, c in enumerate(calls)]
        leaves.append(tuple(jnp.stack(xs)[device] for xs in zip(*per_device)))

    def branch(g):
        def run(carry, args, leaves):
            if reps[g] is None:
                return carry
            call = reps[g]
            if leaves[g]:
                call = dataclasses.replace(call, mask=jax.tree_util.tree_unflatten(keys[g][2], leaves[g]))
            return body(call, carry, *args)
        return run

    if len(keys) == 1:
        return branch(0)(carry, args, leaves)
    return jax.lax.switch(jnp.asarray(table)[device], [branch(g) for g in range(len(keys))],
                          carry, args, leaves)


def maybe_skip(call: Call, cfg: RingConfig, compute, carry):
    """Masks with traced data: skip the call when every chunk-sized tile is EMPTY."""
    if not call.mask.is_dynamic:
        return compute(carry)
    lq, lk = sum(n for _, n in call.q_slices), sum(n for _, n in call.kv_slices)
    state = call.mask.tile_state(lq, lk, min(cfg.chunk_q, lq), min(cfg.chunk_kv, lk))
    return jax.lax.cond(jnp.any(jnp.asarray(state) != EMPTY), compute, lambda c: c, carry)
