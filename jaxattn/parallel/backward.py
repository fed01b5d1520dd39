"""The ring's backward pass, per device (inside shard_map).

dQ stays home; float32 dK/dV accumulators travel one step behind their K/V shard, in the
same buffer (one collective per hop, see jaxattn.parallel.hops), summed in ring order,
so the result is deterministic; each step's own share comes out of the kernels in K/V's
dtype, as any single call's gradients do. The last hop home (the complete sums, in K/V's
dtype) is sent once the last dK/dV kernel is done and overlaps the last dQ kernel.

Each step computes the block gradients of global attention from the GLOBAL residuals
(out, lse, D = rowsum(dO ∘ out)): P_s = exp(S_s − lse), no forward recompute. Every
Pallas kernel backend does this with its own backward kernels (the backend contract's
``parts`` split runs dQ and dK/dV separately); the reference and jax.nn's xla/cudnn
(whose lse has no gradient) use dense jnp math per block. Any other implementation
re-runs the step's forward under ``jax.vjp`` with cotangents (w·dO, w·(dO·o_s − D)),
w = exp(lse_s − lse): exact too, if the implementation differentiates its lse output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import acc_dtype
from pallas_kernels.registry import backend_names
from jaxattn.flash import pallas_backward
from jaxattn.implementations import default_order
from jaxattn.parallel.forward import attend
from jaxattn.parallel.hops import send_on
from jaxattn.parallel.plan import dispatch, device_call, maybe_skip, rows, update_rows
from jaxattn.reference import grouped_allowed_pairs, select_reachable

BOTH = ("dq", "dkdv")   # the two halves of a block backward: dQ, and dK with dV


def _reference_block_backward(q, k, v, out, lse, dout, delta, mask, scale, parts=BOTH):
    """dQ, dK, dV of one block of a larger attention, from that attention's GLOBAL
    row statistics (jnp, dense in the block): p = exp(scale·q·kᵀ − lse) on allowed
    pairs, dV = pᵀdO, dS = p ∘ (dO·vᵀ − D), dQ = scale·dS·k, dK = scale·dSᵀ·q.
    lse, delta: [B, N, T]; rows with lse = -inf get zero gradients."""
    del out  # D = rowsum(dO ∘ O) already carries what is needed of O.
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    ct = acc_dtype(q.dtype)
    allowed = grouped_allowed_pairs(mask, t, s, kh, g)   # [Bm, K|1, G|1, T, S]
    qg, k, v = select_reachable(q.astype(ct).reshape(b, t, kh, g, h), k.astype(ct), v.astype(ct), allowed)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k) * jnp.asarray(scale, ct)
    row_lse = lse.astype(ct).reshape(b, kh, g, t)[..., None]
    keep = allowed & ~jnp.isneginf(row_lse)
    p = jnp.where(keep, jnp.exp(logits - jnp.where(jnp.isneginf(row_lse), 0, row_lse)), 0)
    do = dout.astype(ct).reshape(b, t, kh, g, h)
    dv = jnp.einsum("bkgts,btkgh->bskh", p, do)
    ds = p * (jnp.einsum("btkgh,bskh->bkgts", do, v)
              - delta.astype(ct).reshape(b, kh, g, t)[..., None])
    dq = jnp.einsum("bkgts,bskh->btkgh", ds, k).reshape(b, t, n, h) * scale
    dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg) * scale
    return _select(parts, dq, dk, dv)


def _select(parts, dq, dk, dv):
    """(dq, dk, dv) with the halves not in `parts` replaced by None (XLA drops their math)."""
    return (dq if "dq" in parts else None,) + ((dk, dv) if "dkdv" in parts else (None, None))


def _kernel_block_backward(backend_name):
    """The kernel backend's own backward, fed the global out/lse/D (no forward
    recompute); `parts` runs the dQ or the dK/dV half alone (the backend contract)."""
    def run(q, k, v, out, lse, dout, delta, mask, scale, parts=BOTH):
        return pallas_backward(backend_name, q, k, v, out, lse, dout, delta, mask, scale=scale,
                               parts=parts)
    return run


def _block_backward(implementation):
    """A backward from the global residuals for this implementation, or None (then each
    step re-runs its forward under jax.vjp, which needs the implementation to
    differentiate its lse output). Gradients depend only on q, k, v, the mask, O, lse
    and dO, so any block backward is exact for any implementation's forward: jax.nn's
    "xla" and "cudnn" return an lse without gradient, so they get the jnp one."""
    if implementation is None:
        return _first_serving_block_backward(default_order())
    if implementation in ("reference", "xla", "cudnn"):
        return _reference_block_backward
    if implementation in backend_names():
        return _kernel_block_backward(implementation)
    return None


def _first_serving_block_backward(order):
    """implementation=None: for each block, the backward of the first kernel backend in
    the default order that serves it (a backend's supports() may decline one block's
    mask and not another's), else the jnp block backward."""
    kernels = [name for name in order if name in backend_names()]

    def run(q, k, v, out, lse, dout, delta, mask, scale, parts=BOTH):
        for name in kernels:
            try:
                return _kernel_block_backward(name)(q, k, v, out, lse, dout, delta, mask, scale, parts)
            except NotImplementedError:
                continue
        return _reference_block_backward(q, k, v, out, lse, dout, delta, mask, scale, parts)
    return run


def ring_backward(cfg, residuals, dout):
    q, k, v, leaves, sinks, out, lse = residuals
    p = cfg.num_shards
    mask = jax.tree_util.tree_unflatten(cfg.mask_treedef, leaves)
    device = jax.lax.axis_index(cfg.axis_name)
    acc = acc_dtype(q.dtype)
    delta = jnp.einsum("btnh,btnh->btn", dout.astype(acc), out.astype(acc))  # D = rowsum(dO∘O)
    block_backward = _block_backward(cfg.implementation)
    to_bnt = lambda x, sl: jnp.swapaxes(rows(x, sl), 1, 2)  # noqa: E731

    def step_grads(call, q, k, v, parts):
        qc, kc, vc = rows(q, call.q_slices), rows(k, call.kv_slices), rows(v, call.kv_slices)
        do = rows(dout, call.q_slices)
        if block_backward is not None:
            return block_backward(qc, kc, vc, rows(out, call.q_slices), to_bnt(lse, call.q_slices),
                                  do, to_bnt(delta, call.q_slices), call.mask, cfg.scale, parts)
        # Generic: re-run this step's forward under jax.vjp and give it cotangents
        # (w·dO, w·(dO·o_s − D)) with w = exp(lse_s − lse), this step's share of each
        # row (0 where lse_s = -inf): exactly the block gradients of global attention.
        (o, lse_s), vjp = jax.vjp(lambda a, b_, c: attend(cfg, call, a, b_, c), qc, kc, vc)
        lse_t = jnp.swapaxes(lse_s, 1, 2).astype(acc)
        w = jnp.where(jnp.isneginf(lse_t), 0.0, jnp.exp(lse_t - rows(lse, call.q_slices)))
        do = do.astype(acc)
        ct_o = (do * w[..., None]).astype(o.dtype)
        ct_lse = w * (jnp.einsum("btnh,btnh->btn", do, o.astype(acc)) - rows(delta, call.q_slices))
        return _select(parts, *vjp((ct_o, jnp.swapaxes(ct_lse, 1, 2).astype(lse_s.dtype))))

    def body_for(parts):
        """body(call, carry, q, k, v) adding this step's `parts` of the block gradients to
        the carry: (dQ, dK, dV), (dK, dV) or (dQ,). dQ accumulates in float32 across
        steps; dK/dV start from zeros in K/V's dtype (this step's share only: the
        float32 sum is made outside, in the same pass that packs the next hop)."""
        def body(call, carry, q, k, v):
            def compute(carry):
                gq, gk, gv = step_grads(call, q, k, v, parts)
                add = lambda x, g, sl: update_rows(x, rows(x, sl) + g.astype(x.dtype), sl)  # noqa: E731
                new = []
                if "dq" in parts:
                    new.append(add(carry[0], gq, call.q_slices))
                if "dkdv" in parts:
                    new += [add(carry[-2], gk, call.kv_slices), add(carry[-1], gv, call.kv_slices)]
                return tuple(new)
            return maybe_skip(call, cfg, compute, carry)
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
        calls = [device_call(cfg, mask, d, (d - s) % p) for d in range(p)]
        sent = (kv if not last else ()) + finished
        received = send_on(sent, cfg.axis_name, p)
        if not last:
            dq, gk, gv = dispatch(calls, device, body_for(BOTH), (dq, *zeros_kv()), q, *kv)
        else:
            gk, gv = dispatch(calls, device, body_for(("dkdv",)), zeros_kv(), q, *kv)
        nxt = received[:2] if not last else None
        incoming = received[len(received) - len(finished):] if finished else ()
        gk, gv = gk.astype(acc), gv.astype(acc)
        finished = (incoming[0] + gk, incoming[1] + gv) if incoming else (gk, gv)
        if last:
            # Home, overlapping the last dQ kernel; the sums are complete, so they travel
            # in K/V's dtype (the same values as casting after the hop, half the bytes).
            dkv = send_on((finished[0].astype(k.dtype), finished[1].astype(v.dtype)), cfg.axis_name, p)
            (dq,) = dispatch(calls, device, body_for(("dq",)), (dq,), q, *kv)
        kv = nxt
    zeros = jax.tree_util.tree_map(lambda x: None, leaves)
    return dq.astype(q.dtype), dkv[0], dkv[1], zeros, _sink_gradient(sinks, lse, delta)


def _sink_gradient(sinks, lse, delta):
    """d sinks of this device's rows: the sink is one more column of every row's softmax,
    with probability P = exp(sinks[n] − lse) and a zero value vector (dP = 0), so its dS is
    P·(0 − D). Rows of all devices add up: shard_map sums the cotangents of the replicated
    sinks."""
    if sinks is None:
        return None
    p_sink = jnp.exp(sinks.astype(lse.dtype)[None, None, :] - lse)        # [B, L, N]
    return jnp.sum(-p_sink * delta, axis=(0, 1)).astype(sinks.dtype)
