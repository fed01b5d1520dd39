"""Context parallelism: ring attention over a sequence sharded on one mesh axis.

Shape legend as in jaxattn.api: query [B, T, N, H], key/value [B, S, K, H]; P devices on
``axis_name``. Each device keeps its query shard, and the K/V shards travel once around
the ring with ``lax.ppermute``: at ring step s device d holds the K/V shard of device
src = (d - s) mod P. Each step's partial result (out_s, lse_s) comes from
``dot_product_attention(..., return_residuals=True)`` of whichever implementation was
asked for, and the partials merge exactly through their log-sum-exp:

    lse = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - lse)·out_a + exp(lse_b - lse)·out_b

with rows whose lse is -inf (nothing allowed yet) given weight 0, never NaN.

Zigzag placement (causal load balance). The sequence is cut into 2P chunks of
c = T/(2P) tokens and device d holds chunks (d, 2P-1-d): one early, one late. Under a
causal mask every (device, step) pair then has the same work (2c² allowed pairs per
step), so no device waits for another. ``ring_attention`` permutes contiguous shards
into this order with two ``ppermute``s (and back); pass ``sequence_layout="zigzag"`` if
the activations already live in that order (see ``zigzag_permutation``).

Masks across shards: static per-(device, step) re-parameterisation.
Masks speak ABSOLUTE positions; a device computing its query chunks against a remote
K/V shard needs the mask at shifted, and (zigzag) piecewise, positions. The device
index and ring step are traced inside shard_map, but the ring loop is unrolled, so the
step s is static, and for every device d (a Python loop at trace time) the pair
(d, src) and every global offset are static ints. For each (d, s),
``jaxattn.parallel_masks.localize`` turns the global mask into an exact mask in the
local coordinates of the call: CausalMask(offset=q_start - kv_start)-style
re-parameterisation for structured masks, gathered ids / rows for SegmentMask and
DenseMask, a re-gridded layout for BlockSparseMask, and a piecewise position view
(kernel-safe, with arithmetic tile states) for anything else. Under zigzag causal
attention every local problem comes out as CausalMask() or FullMask().

Statically empty (device, step) pairs compute nothing (the strongest form of the
per-step skip); masks holding traced data get a ``lax.cond`` on their chunk-level tile
states. Devices whose local problems have the same static structure share one
``lax.switch`` branch (their traced mask data is selected by device index), so a causal
ring compiles two or three distinct kernel calls per step, not P.

Backward (``jax.custom_vjp``): dQ stays home; float32 dK/dV accumulators travel one
step behind their K/V shard, in the same buffer (one collective per hop, see _Packing),
summed in ring order, so the result is deterministic; each step's own share comes out of
the kernels in K/V's dtype, as any single call's gradients do. The last hop home (the
complete sums, in K/V's dtype) is sent once the last dK/dV kernel is done and overlaps the
last dQ kernel. Each step computes the block gradients of global attention from the
GLOBAL residuals (out, lse, D = rowsum(dO ∘ out)): P_s = exp(S_s − lse), no forward
recompute; pallas_triton uses its own backward kernels, the reference and jax.nn's
xla/cudnn (whose lse has no gradient) dense jnp math per block. Other implementations
re-run the step's forward under ``jax.vjp`` with cotangents (w·dO, w·(dO·o_s − D)),
w = exp(lse_s − lse): exact too, if the implementation differentiates its lse output.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from pallas_kernels.metadata import EMPTY
from jaxattn.api import (available_implementations, default_order, dot_product_attention,
                         validate_inputs)
from jaxattn.masks import Mask, canonical_mask
from jaxattn.parallel_masks import localize, merge_pieces, shift
from jaxattn.reference import allowed_pairs

__all__ = ["ring_attention", "zigzag_permutation", "inverse_zigzag_permutation"]

_LAYOUTS = ("contiguous", "zigzag")
_BOTH = ("dq", "dkdv")   # the two halves of a block backward: dQ, and dK with dV


# ---------------------------------------------------------------------------------
# Zigzag placement.
# ---------------------------------------------------------------------------------
def zigzag_permutation(seq_len: int, num_shards: int) -> np.ndarray:
    """Index array `perm` with x_zigzag = x[:, perm]: shard d of x_zigzag holds chunks
    d and 2P-1-d of the 2P equal chunks of the sequence (seq_len % (2P) == 0)."""
    if seq_len % (2 * num_shards):
        raise ValueError(f"seq_len={seq_len} must be a multiple of 2 * num_shards = {2 * num_shards}.")
    c = seq_len // (2 * num_shards)
    chunks = [i for d in range(num_shards) for i in (d, 2 * num_shards - 1 - d)]
    return np.concatenate([np.arange(i * c, (i + 1) * c) for i in chunks])


def inverse_zigzag_permutation(seq_len: int, num_shards: int) -> np.ndarray:
    """x = x_zigzag[:, inverse_zigzag_permutation(...)]."""
    return np.argsort(zigzag_permutation(seq_len, num_shards))


def _to_zigzag(x, axis_name, p):
    """Contiguous shards (chunks 2d, 2d+1 on device d) -> zigzag (chunks d, 2p-1-d), with
    one ppermute per half: chunk k goes to device k (slot 0) if k < p, else to device
    2p-1-k (slot 1). Device e receives an even and an odd chunk; it puts chunk e first."""
    dest = lambda k: k if k < p else 2 * p - 1 - k  # noqa: E731
    half = x.shape[1] // 2
    a = jax.lax.ppermute(x[:, :half], axis_name, [(d, dest(2 * d)) for d in range(p)])
    b = jax.lax.ppermute(x[:, half:], axis_name, [(d, dest(2 * d + 1)) for d in range(p)])
    even = jax.lax.axis_index(axis_name) % 2 == 0
    return jnp.where(even, jnp.concatenate([a, b], 1), jnp.concatenate([b, a], 1))


def _from_zigzag(x, axis_name, p):
    """Inverse of _to_zigzag: the even chunk returns as half 0, the odd one as half 1."""
    dest = lambda k: k // 2  # noqa: E731
    half = x.shape[1] // 2
    even = jax.lax.axis_index(axis_name) % 2 == 0
    ev = jnp.where(even, x[:, :half], x[:, half:])
    od = jnp.where(even, x[:, half:], x[:, :half])
    e_chunk = lambda e: e if e % 2 == 0 else 2 * p - 1 - e  # noqa: E731
    o_chunk = lambda e: 2 * p - 1 - e if e % 2 == 0 else e  # noqa: E731
    a = jax.lax.ppermute(ev, axis_name, [(e, dest(e_chunk(e))) for e in range(p)])
    b = jax.lax.ppermute(od, axis_name, [(e, dest(o_chunk(e))) for e in range(p)])
    return jnp.concatenate([a, b], 1)


def _zigzag_move(xs, axis_name, p, inverse):
    """_to_zigzag (or, with `inverse`, _from_zigzag) of arrays that share the sequence
    axis, moved as one array stacked on the head axis (one pair of ppermutes for all)."""
    y = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=2)
    y = (_from_zigzag if inverse else _to_zigzag)(y, axis_name, p)
    offsets = np.cumsum([0] + [x.shape[2] for x in xs])
    return tuple(jax.lax.slice_in_dim(y, int(a), int(b), axis=2) for a, b in zip(offsets[:-1], offsets[1:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _zigzag(xs, axis_name, p, inverse):
    """The permutation with its inverse as its gradient (a permutation's transpose is
    its inverse): the backward moves cotangents as lean as the forward moves values,
    instead of differentiating the halves' slices, selects and concatenations (pads,
    masked copies and adds of every array)."""
    return _zigzag_move(xs, axis_name, p, inverse)


def _zigzag_fwd(xs, axis_name, p, inverse):
    return _zigzag_move(xs, axis_name, p, inverse), None


def _zigzag_bwd(axis_name, p, inverse, _, cotangents):
    return (_zigzag_move(tuple(cotangents), axis_name, p, not inverse),)


_zigzag.defvjp(_zigzag_fwd, _zigzag_bwd)


# ---------------------------------------------------------------------------------
# The plan: which call each device makes at each ring step.
# ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _RingConfig:
    axis_name: str
    num_shards: int
    chunk_q: int
    chunk_kv: int
    q_len: int            # unpadded T
    kv_len: int           # unpadded S
    scale: float
    implementation: str | None
    mask_treedef: object


@dataclasses.dataclass(frozen=True)
class _Call:
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


def _device_call(cfg: _RingConfig, mask: Mask, d: int, src: int):
    """The call device d makes with the K/V shard of device src, or None."""
    p, cq, ck = cfg.num_shards, cfg.chunk_q, cfg.chunk_kv
    def chunks(dev, c, length):  # (local slot start, global start, valid length)
        return [(slot * c, g * c, max(0, min(c, length - g * c)))
                for slot, g in enumerate((dev, 2 * p - 1 - dev))]
    qs, ks = chunks(d, cq, cfg.q_len), chunks(src, ck, cfg.kv_len)
    live = [[qn > 0 and kn > 0 and shift(mask, qg, qn, kg, kn) is not None
             for (_, kg, kn) in ks] for (_, qg, qn) in qs]
    rows = [i for i in range(2) if any(live[i])]
    cols = [j for j in range(2) if any(live[i][j] for i in range(2))]
    if not rows:
        return None
    qp = merge_pieces([qs[i][1:] for i in rows])
    kp = merge_pieces([ks[j][1:] for j in cols])
    local = localize(mask, qp, kp)
    if local is None:
        return None
    return _Call(_slices([(qs[i][0], qs[i][2]) for i in rows]),
                 _slices([(ks[j][0], ks[j][2]) for j in cols]), local)


def _rows(x, slices, axis=1):
    parts = [jax.lax.slice_in_dim(x, s, s + n, axis=axis) for s, n in slices]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _update_rows(x, new, slices, axis=1):
    off = 0
    for s, n in slices:
        x = jax.lax.dynamic_update_slice_in_dim(
            x, jax.lax.slice_in_dim(new, off, off + n, axis=axis), s, axis=axis)
        off += n
    return x


def _dispatch(calls, device, body, carry, *args):
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


def _maybe_skip(call: _Call, cfg: _RingConfig, compute, carry):
    """Masks with traced data: skip the call when every chunk-sized tile is EMPTY."""
    if not call.mask.is_dynamic:
        return compute(carry)
    lq, lk = sum(n for _, n in call.q_slices), sum(n for _, n in call.kv_slices)
    state = call.mask.tile_state(lq, lk, min(cfg.chunk_q, lq), min(cfg.chunk_kv, lk))
    return jax.lax.cond(jnp.any(jnp.asarray(state) != EMPTY), compute, lambda c: c, carry)


def _attend(cfg: _RingConfig, call: _Call, q, k, v):
    return dot_product_attention(q, k, v, mask=call.mask, scale=cfg.scale,
                                 implementation=cfg.implementation, return_residuals=True)


def _merge(o_a, lse_a, o_b, lse_b):
    """Exact merge of two partial attentions over disjoint key sets. o [B, L, N, H] in
    the accumulation dtype, lse [B, L, N]; -inf rows (no key yet) weigh 0, never NaN."""
    lse = jnp.logaddexp(lse_a, lse_b)  # -inf when both are -inf
    ref = jnp.where(jnp.isneginf(lse), 0.0, lse)
    wa, wb = jnp.exp(lse_a - ref)[..., None], jnp.exp(lse_b - ref)[..., None]
    return o_a * wa + o_b.astype(o_a.dtype) * wb, lse


# ---------------------------------------------------------------------------------
# One buffer per hop. XLA's GPU scheduler keeps at most one collective-permute in
# flight, and ppermute of a tuple is one collective per array: K and V sent as two
# would overlap the step's kernel with one of them and expose the other. So each hop
# sends a single flat buffer holding every array that travels, as unsigned ints of
# the widest dtype's size (bf16 K/V two to a uint32 beside float32 dK/dV): the float32
# parts are then plain elementwise views, so adding a step's gradient and packing the
# next hop fuse into one pass over memory, and bits are never reinterpreted as floats.
# ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Packing:
    shapes: tuple
    dtypes: tuple

    @classmethod
    def of(cls, xs):
        return cls(tuple(x.shape for x in xs), tuple(jnp.dtype(x.dtype) for x in xs))

    @property
    def unit(self):
        return jnp.dtype(f"uint{8 * max(d.itemsize for d in self.dtypes)}")

    def _ratio(self, dtype):
        return self.unit.itemsize // dtype.itemsize

    def _size(self, shape, dtype):
        return -(-math.prod(shape) // self._ratio(dtype))  # units, rounded up

    def pack(self, xs):
        flat = []
        for x in xs:
            r = self._ratio(jnp.dtype(x.dtype))
            x = x.reshape(-1)
            if r > 1:  # r narrow values per unit (padded to a whole unit)
                x = jnp.pad(x, (0, -x.size % r)).reshape(-1, r)
            flat.append(jax.lax.bitcast_convert_type(x, self.unit))
        return flat[0] if len(flat) == 1 else jnp.concatenate(flat)

    def unpack(self, buf):
        out, off = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            n = self._size(shape, dtype)
            piece = jax.lax.bitcast_convert_type(jax.lax.slice_in_dim(buf, off, off + n), dtype)
            off += n
            out.append(piece.reshape(-1)[:math.prod(shape)].reshape(shape))
        return tuple(out)


def _send_on(xs, axis_name, p):
    """Pass a tuple of arrays one step along the ring as one collective."""
    packing = _Packing.of(xs)
    return packing.unpack(jax.lax.ppermute(packing.pack(xs), axis_name, _ring_perm(p)))


# ---------------------------------------------------------------------------------
# The ring, per device (inside shard_map).
# ---------------------------------------------------------------------------------
def _ring_perm(p):
    return [(i, (i + 1) % p) for i in range(p)]


def _acc_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _ring_forward(cfg: _RingConfig, q, k, v, leaves):
    """(out [B, L, N, H] in q's dtype, lse [B, L, N] in the accumulation dtype)."""
    p = cfg.num_shards
    mask = jax.tree_util.tree_unflatten(cfg.mask_treedef, leaves)
    device = jax.lax.axis_index(cfg.axis_name)
    b, lq, n, h = q.shape
    acc = _acc_dtype(q.dtype)
    carry = (jnp.zeros((b, lq, n, h), acc), jnp.full((b, lq, n), -jnp.inf, acc))

    def body(call, carry, q, k, v):
        def compute(carry):
            o_acc, lse_acc = carry
            o, lse = _attend(cfg, call, _rows(q, call.q_slices), _rows(k, call.kv_slices),
                             _rows(v, call.kv_slices))
            o_new, lse_new = _merge(_rows(o_acc, call.q_slices), _rows(lse_acc, call.q_slices),
                                    o, jnp.swapaxes(lse, 1, 2).astype(acc))
            return (_update_rows(o_acc, o_new, call.q_slices),
                    _update_rows(lse_acc, lse_new, call.q_slices))
        return _maybe_skip(call, cfg, compute, carry)

    # K and V travel as one buffer, forwarded as received (packed once, unpacked per step).
    packing = _Packing.of((k, v))
    buf = packing.pack((k, v))   # (p > 1 here: one device runs no ring)
    for s in range(p):
        # Send the shard on before computing with it, so the transfer overlaps the step.
        nxt = jax.lax.ppermute(buf, cfg.axis_name, _ring_perm(p)) if s + 1 < p else None
        kv = (k, v) if s == 0 else packing.unpack(buf)
        calls = [_device_call(cfg, mask, d, (d - s) % p) for d in range(p)]
        carry = _dispatch(calls, device, body, carry, q, *kv)
        if nxt is not None:
            # The next hop forwards what arrived here; without this tie XLA may run the
            # whole chain of hops up front, with no kernel to hide them behind.
            nxt, carry = jax.lax.optimization_barrier((nxt, carry))
        buf = nxt
    out, lse = carry
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_core(cfg: _RingConfig, q, k, v, leaves):
    return _ring_forward(cfg, q, k, v, leaves)[0]


def _ring_core_fwd(cfg, q, k, v, leaves):
    out, lse = _ring_forward(cfg, q, k, v, leaves)
    return out, (q, k, v, leaves, out, lse)


def _reference_block_backward(q, k, v, out, lse, dout, delta, mask, scale, parts=_BOTH):
    """dQ, dK, dV of one block of a larger attention, from that attention's GLOBAL
    row statistics (jnp, dense in the block): p = exp(scale·q·kᵀ − lse) on allowed
    pairs, dV = pᵀdO, dS = p ∘ (dO·vᵀ − D), dQ = scale·dS·k, dK = scale·dSᵀ·q.
    lse, delta: [B, N, T]; rows with lse = -inf get zero gradients."""
    del out  # D = rowsum(dO ∘ O) already carries what is needed of O.
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    ct = _acc_dtype(q.dtype)
    qg = q.astype(ct).reshape(b, t, kh, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(ct)) * jnp.asarray(scale, ct)
    allowed = allowed_pairs(mask, t, s)  # [Bm, Hm, T, S], Hm in (1, N)
    allowed = allowed[:, :, None] if allowed.shape[1] == 1 else allowed.reshape(-1, kh, g, t, s)
    row_lse = lse.astype(ct).reshape(b, kh, g, t)[..., None]
    keep = allowed & ~jnp.isneginf(row_lse)
    p = jnp.where(keep, jnp.exp(logits - jnp.where(jnp.isneginf(row_lse), 0, row_lse)), 0)
    do = dout.astype(ct).reshape(b, t, kh, g, h)
    dv = jnp.einsum("bkgts,btkgh->bskh", p, do)
    ds = p * (jnp.einsum("btkgh,bskh->bkgts", do, v.astype(ct))
              - delta.astype(ct).reshape(b, kh, g, t)[..., None])
    dq = jnp.einsum("bkgts,bskh->btkgh", ds, k.astype(ct)).reshape(b, t, n, h) * scale
    dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg) * scale
    return _select(parts, dq, dk, dv)


def _select(parts, dq, dk, dv):
    """(dq, dk, dv) with the halves not in `parts` replaced by None (XLA drops their math)."""
    return (dq if "dq" in parts else None,) + ((dk, dv) if "dkdv" in parts else (None, None))


def _pallas_block_backward(backend_name):
    """The Pallas kernels' own backward, fed the global out/lse/D (no forward recompute)."""
    def run(q, k, v, out, lse, dout, delta, mask, scale, parts=_BOTH):
        from jaxattn.flash import pallas_backward
        return pallas_backward(backend_name, q, k, v, out, lse, dout, delta, mask, scale=scale,
                               parts=parts)
    return run


def _block_backward(implementation):
    """A backward from the global residuals for this implementation, or None (then each
    step re-runs its forward under jax.vjp, which needs the implementation to
    differentiate its lse output). Gradients depend only on q, k, v, the mask, O, lse
    and dO, so any block backward is exact for any implementation's forward: jax.nn's
    "xla" and "cudnn" return an lse without gradient, so they get the jnp one."""
    name = implementation if implementation is not None else default_order()[0]
    if name in ("reference", "xla", "cudnn"):
        return _reference_block_backward
    if name == "pallas_triton":
        return _pallas_block_backward(name)
    return None


def _ring_core_bwd(cfg, residuals, dout):
    q, k, v, leaves, out, lse = residuals
    p = cfg.num_shards
    mask = jax.tree_util.tree_unflatten(cfg.mask_treedef, leaves)
    device = jax.lax.axis_index(cfg.axis_name)
    acc = _acc_dtype(q.dtype)
    delta = jnp.einsum("btnh,btnh->btn", dout.astype(acc), out.astype(acc))  # D = rowsum(dO∘O)
    block_backward = _block_backward(cfg.implementation)
    to_bnt = lambda x, sl: jnp.swapaxes(_rows(x, sl), 1, 2)  # noqa: E731

    def step_grads(call, q, k, v, parts):
        qc, kc, vc = _rows(q, call.q_slices), _rows(k, call.kv_slices), _rows(v, call.kv_slices)
        do = _rows(dout, call.q_slices)
        if block_backward is not None:
            return block_backward(qc, kc, vc, _rows(out, call.q_slices), to_bnt(lse, call.q_slices),
                                  do, to_bnt(delta, call.q_slices), call.mask, cfg.scale, parts)
        # Generic: re-run this step's forward under jax.vjp and give it cotangents
        # (w·dO, w·(dO·o_s − D)) with w = exp(lse_s − lse), this step's share of each
        # row (0 where lse_s = -inf): exactly the block gradients of global attention.
        (o, lse_s), vjp = jax.vjp(lambda a, b_, c: _attend(cfg, call, a, b_, c), qc, kc, vc)
        lse_t = jnp.swapaxes(lse_s, 1, 2).astype(acc)
        w = jnp.where(jnp.isneginf(lse_t), 0.0, jnp.exp(lse_t - _rows(lse, call.q_slices)))
        do = do.astype(acc)
        ct_o = (do * w[..., None]).astype(o.dtype)
        ct_lse = w * (jnp.einsum("btnh,btnh->btn", do, o.astype(acc)) - _rows(delta, call.q_slices))
        return _select(parts, *vjp((ct_o, jnp.swapaxes(ct_lse, 1, 2).astype(lse_s.dtype))))

    def body_for(parts):
        """body(call, carry, q, k, v) adding this step's `parts` of the block gradients to
        the carry: (dQ, dK, dV), (dK, dV) or (dQ,). dQ accumulates in float32 across
        steps; dK/dV start from zeros in K/V's dtype (this step's share only: the
        float32 sum is made outside, in the same pass that packs the next hop)."""
        def body(call, carry, q, k, v):
            def compute(carry):
                gq, gk, gv = step_grads(call, q, k, v, parts)
                add = lambda x, g, sl: _update_rows(x, _rows(x, sl) + g.astype(x.dtype), sl)  # noqa: E731
                new = []
                if "dq" in parts:
                    new.append(add(carry[0], gq, call.q_slices))
                if "dkdv" in parts:
                    new += [add(carry[-2], gk, call.kv_slices), add(carry[-1], gv, call.kv_slices)]
                return tuple(new)
            return _maybe_skip(call, cfg, compute, carry)
        return body

    # The ring. At step s this device holds the K/V shard of src = d - s, and gets, in
    # one buffer from device d - 1: the next K/V shard, and the dK/dV accumulator of
    # `src` holding the contributions of every device that saw `src` before it (summed
    # in ring order: deterministic). It adds its own and sends the sum on at the start
    # of the next step with that step's K/V, so both transfers overlap a step's kernels.
    # After the last step the accumulators are one hop from their owners; that hop is
    # sent as soon as the last dK/dV kernel is done, and overlaps the last dQ kernel.
    zeros_kv = lambda: (jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))  # noqa: E731
    dq = jnp.zeros(q.shape, acc)
    kv, finished = (k, v), ()  # the K/V held now; the accumulators completed last step
    for s in range(p):
        last = s == p - 1
        calls = [_device_call(cfg, mask, d, (d - s) % p) for d in range(p)]
        sent = (kv if not last else ()) + finished
        received = _send_on(sent, cfg.axis_name, p)
        if not last:
            dq, gk, gv = _dispatch(calls, device, body_for(_BOTH), (dq, *zeros_kv()), q, *kv)
        else:
            gk, gv = _dispatch(calls, device, body_for(("dkdv",)), zeros_kv(), q, *kv)
        nxt = received[:2] if not last else None
        incoming = received[len(received) - len(finished):] if finished else ()
        gk, gv = gk.astype(acc), gv.astype(acc)
        finished = (incoming[0] + gk, incoming[1] + gv) if incoming else (gk, gv)
        if last:
            # Home, overlapping the last dQ kernel; the sums are complete, so they travel
            # in K/V's dtype (the same values as casting after the hop, half the bytes).
            dkv = _send_on((finished[0].astype(k.dtype), finished[1].astype(v.dtype)), cfg.axis_name, p)
            (dq,) = _dispatch(calls, device, body_for(("dq",)), (dq,), q, *kv)
        kv = nxt
    zeros = jax.tree_util.tree_map(lambda x: None, leaves)
    return dq.astype(q.dtype), dkv[0], dkv[1], zeros


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def _ring_body(cfg: _RingConfig, zigzag_inside: bool, q, k, v, leaves):
    if cfg.num_shards == 1:  # one device on the axis: plain attention, no ring
        return dot_product_attention(q, k, v, mask=jax.tree_util.tree_unflatten(cfg.mask_treedef, leaves),
                                     scale=cfg.scale, implementation=cfg.implementation)
    axis, p = cfg.axis_name, cfg.num_shards
    if zigzag_inside:  # one permute of [q | k | v] stacked on the head axis
        if q.shape[1] == k.shape[1]:
            q, k, v = _zigzag((q, k, v), axis, p, False)
        else:
            (q,), (k, v) = _zigzag((q,), axis, p, False), _zigzag((k, v), axis, p, False)
    out = _ring_core(cfg, q, k, v, leaves)
    return _zigzag((out,), axis, p, True)[0] if zigzag_inside else out


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


def ring_attention(query, key, value, mask=None, *, mesh, axis_name, is_causal=False,
                   scale=None, implementation=None, sequence_layout="contiguous",
                   batch_axis_name=None):
    """`dot_product_attention` with the sequence axis (axis 1) sharded over `axis_name`.

    Args:
      query [B, T, N, H], key/value [B, S, K, H] (N a multiple of K), any sharding: they
        are placed with T and S split over `axis_name` of `mesh` (and B over
        `batch_axis_name`, if given; other mesh axes see replicated work).
      mask: None, a bool array broadcastable to [B, N, T, S], or a `jaxattn.masks.Mask`,
        always in absolute (natural-order) positions; `is_causal` is AND-ed in.
      scale: defaults to 1/sqrt(H). implementation: as in `dot_product_attention`,
        used for every per-step block (it must differentiate its lse output).
      sequence_layout: "contiguous" (default: permuted to zigzag order inside and back)
        or "zigzag" (query/key/value are already `x[:, zigzag_permutation(T, P)]`, the
        output comes back in that order; needs T and S multiples of 2P).

    T or S not a multiple of 2P: padded inside (padding keys are never attended, padded
    rows are dropped). Returns [B, T, N, H] in the query's dtype.
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
    p = int(mesh.shape[axis_name])
    if batch_axis_name is not None and b % mesh.shape[batch_axis_name]:
        raise ValueError(f"batch size {b} must be a multiple of the {batch_axis_name!r} axis size "
                         f"{mesh.shape[batch_axis_name]} to shard the batch over it.")
    if sequence_layout == "zigzag" and (t % (2 * p) or s % (2 * p)):
        raise ValueError(f"sequence_layout='zigzag' needs T and S multiples of 2 * {p} (the "
                         f"number of zigzag chunks), got T={t}, S={s}. Use 'contiguous' to pad inside.")
    return _ring_jit(query, key, value, canonical, mesh=mesh, axis_name=axis_name, scale=scale,
                     implementation=implementation, zigzag_inside=sequence_layout == "contiguous",
                     batch_axis_name=batch_axis_name)


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "scale", "implementation",
                                             "zigzag_inside", "batch_axis_name"))
def _ring_jit(query, key, value, mask, *, mesh, axis_name, scale, implementation,
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
    cfg = _RingConfig(axis_name, p, tp // chunks, sp // chunks, t, s, scale, implementation, treedef)
    seq = PartitionSpec(batch_axis_name, axis_name)
    def leaf_spec(x):  # mask data is small next to K/V: replicated, batch-split if B-sized
        x = jnp.asarray(x)
        return PartitionSpec(batch_axis_name) if batch_axis_name and x.ndim and x.shape[0] == b > 1 else PartitionSpec()
    leaf_specs = [leaf_spec(x) for x in leaves]
    query, key, value = (_place(x, mesh, seq) for x in (query, key, value))
    leaves = [_place(jnp.asarray(x), mesh, sp_) for x, sp_ in zip(leaves, leaf_specs)]
    out = jax.shard_map(functools.partial(_ring_body, cfg, zigzag_inside), mesh=mesh,
                        in_specs=(seq, seq, seq, leaf_specs), out_specs=seq,
                        check_vma=False)(query, key, value, leaves)
    return _place(out, mesh, PartitionSpec(batch_axis_name))[:, :t] if padded else out
