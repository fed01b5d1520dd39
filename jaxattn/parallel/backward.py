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

With a score function (jaxattn.parallel.scores) every block backward pulls dS back
through fn (the kernels with jax's derivative of fn in their tiles, the jnp block with
jax.vjp), and also returns the gradients of fn's differentiated operands: this device's
steps add them up in float32, and shard_map sums the devices' shares of the replicated
operands.
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
from jaxattn.parallel.scores import step_offsets, step_score_mod
from jaxattn.reference import grouped_allowed_pairs, select_reachable
from jaxattn.score_mod import ScoreMod

BOTH = ("dq", "dkdv")   # the two halves of a block backward: dQ, and dK with dV


def _reference_block_backward(q, k, v, out, lse, dout, delta, mask, scale, parts=BOTH,
                              score_mod=None, score_grads=()):
    """dQ, dK, dV of one block of a larger attention, from that attention's GLOBAL
    row statistics (jnp, dense in the block): p = exp(fn(scale·q·kᵀ) − lse) on allowed
    pairs (fn the score function, or none), dV = pᵀdO, dS = p ∘ (dO·vᵀ − D) pulled back
    through fn, dQ = scale·dS·k, dK = scale·dSᵀ·q. lse, delta: [B, N, T]; rows with
    lse = -inf get zero gradients. Fourth result: the gradients of score_mod's operands
    flagged in score_grads (None for the others; all None unless "dkdv" is in parts)."""
    del out  # D = rowsum(dO ∘ O) already carries what is needed of O.
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    ct = acc_dtype(q.dtype)
    allowed = grouped_allowed_pairs(mask, t, s, kh, g)   # [Bm, K|1, G|1, T, S]
    qg, k, v = select_reachable(q.astype(ct).reshape(b, t, kh, g, h), k.astype(ct), v.astype(ct), allowed)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k) * jnp.asarray(scale, ct)
    pull, wanted = None, ()
    if score_mod is not None:
        wanted = tuple(i for i, w in enumerate(score_grads) if w) if "dkdv" in parts else ()
        logits, pull = _score_vjp(score_mod, jnp.where(allowed, logits, 0), wanted)
    row_lse = lse.astype(ct).reshape(b, kh, g, t)[..., None]
    keep = allowed & ~jnp.isneginf(row_lse)
    p = jnp.where(keep, jnp.exp(logits - jnp.where(jnp.isneginf(row_lse), 0, row_lse)), 0)
    do = dout.astype(ct).reshape(b, t, kh, g, h)
    dv = jnp.einsum("bkgts,btkgh->bskh", p, do)
    ds = p * (jnp.einsum("btkgh,bskh->bkgts", do, v)
              - delta.astype(ct).reshape(b, kh, g, t)[..., None])
    d_operands = None
    if pull is not None:
        ds, *d_wanted = pull(ds)
        d_operands = [None] * len(score_mod.operands)
        for i, d in zip(wanted, d_wanted):
            d_operands[i] = d
    dq = jnp.einsum("bkgts,bskh->btkgh", ds, k).reshape(b, t, n, h) * scale
    dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg) * scale
    return _select(parts, dq, dk, dv) + (d_operands,)


def _score_vjp(score_mod, logits, wanted):
    """(fn(logits), pullback(d) -> (d logits, *d operands[wanted])) on the grouped logits
    [B, K, G, T, S] of one block (masked pairs enter fn as 0: finite, zero cotangent)."""
    b, kh, g, t, s = logits.shape
    ids = [jnp.arange(d, dtype=jnp.int32).reshape([d if a == i else 1 for a in range(4)])
           for i, d in enumerate((b, kh * g, t, s))]

    def apply(x, *values):
        operands = list(score_mod.operands)
        for i, value in zip(wanted, values):
            operands[i] = value
        out = ScoreMod(score_mod.fn, *operands).reference_apply(x.reshape(b, kh * g, t, s), *ids)
        return out.reshape(b, kh, g, t, s)
    return jax.vjp(apply, logits, *[score_mod.operands[i] for i in wanted])


def _select(parts, dq, dk, dv):
    """(dq, dk, dv) with the halves not in `parts` replaced by None (XLA drops their math)."""
    return (dq if "dq" in parts else None,) + ((dk, dv) if "dkdv" in parts else (None, None))


def _kernel_block_backward(backend_name):
    """The kernel backend's own backward, fed the global out/lse/D (no forward
    recompute); `parts` runs the dQ or the dK/dV half alone (the backend contract).
    Operand gradients come from the dK/dV kernel, so only with "dkdv" in parts."""
    def run(q, k, v, out, lse, dout, delta, mask, scale, parts=BOTH, score_mod=None, score_grads=()):
        if score_mod is None:
            return pallas_backward(backend_name, q, k, v, out, lse, dout, delta, mask, scale=scale,
                                   parts=parts) + (None,)
        grads = score_grads if "dkdv" in parts else ()
        dq, dk, dv, d_operands = pallas_backward(
            backend_name, q, k, v, out, lse, dout, delta, mask, scale=scale, parts=parts,
            score_mod=score_mod, score_grads=grads)
        return dq, dk, dv, list(d_operands)
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

    def run(q, k, v, out, lse, dout, delta, mask, scale, parts=BOTH, score_mod=None, score_grads=()):
        args = (q, k, v, out, lse, dout, delta, mask, scale, parts, score_mod, score_grads)
        for name in kernels:
            try:
                return _kernel_block_backward(name)(*args)
            except NotImplementedError:
                continue
        return _reference_block_backward(*args)
    return run


def ring_backward(cfg, residuals, dout):
    """Cotangents of ring_core's (q, k, v, mask leaves, sinks, score operands): None for
    the mask and for score operands that are not differentiated (`flags`: () for those
    that are, None for the others)."""
    q, k, v, leaves, sinks, score_operands, flags, out, lse = residuals
    p = cfg.num_shards
    mask = jax.tree_util.tree_unflatten(cfg.mask_treedef, leaves)
    device = jax.lax.axis_index(cfg.axis_name)
    acc = acc_dtype(q.dtype)
    delta = jnp.einsum("btnh,btnh->btn", dout.astype(acc), out.astype(acc))  # D = rowsum(dO∘O)
    block_backward = _block_backward(cfg.implementation)
    to_bnt = lambda x, sl: jnp.swapaxes(rows(x, sl), 1, 2)  # noqa: E731
    wanted = tuple(i for i, f in enumerate(flags) if f is not None)   # differentiated operands
    score_grads = tuple(f is not None for f in flags) + (False,)      # (+ the step's offsets)

    def step_grads(call, q, k, v, parts, score):
        """(dQ, dK, dV) of this step's `parts` (None for the others), and the gradients of
        the score operands (a list over the step ScoreMod's operands, None where not
        wanted; None without "dkdv" in parts, so no step is counted twice)."""
        qc, kc, vc = rows(q, call.q_slices), rows(k, call.kv_slices), rows(v, call.kv_slices)
        do = rows(dout, call.q_slices)
        if block_backward is not None:
            score_mod = step_score_mod(cfg, call.q_slices, call.kv_slices, score)
            return block_backward(qc, kc, vc, rows(out, call.q_slices), to_bnt(lse, call.q_slices),
                                  do, to_bnt(delta, call.q_slices), call.mask, cfg.scale, parts,
                                  score_mod, score_grads)
        # Generic: re-run this step's forward under jax.vjp and give it cotangents
        # (w·dO, w·(dO·o_s − D)) with w = exp(lse_s − lse), this step's share of each
        # row (0 where lse_s = -inf): exactly the block gradients of global attention.
        operands = () if score is None else score[0]
        def forward(a, b_, c, *values):
            if score is None:
                return attend(cfg, call, a, b_, c)
            ops = list(operands)
            for i, value in zip(wanted, values):
                ops[i] = value
            return attend(cfg, call, a, b_, c, (tuple(ops), score[1]))
        (o, lse_s), vjp = jax.vjp(forward, qc, kc, vc, *[operands[i] for i in wanted])
        lse_t = jnp.swapaxes(lse_s, 1, 2).astype(acc)
        w = jnp.where(jnp.isneginf(lse_t), 0.0, jnp.exp(lse_t - rows(lse, call.q_slices)))
        do = do.astype(acc)
        ct_o = (do * w[..., None]).astype(o.dtype)
        ct_lse = w * (jnp.einsum("btnh,btnh->btn", do, o.astype(acc)) - rows(delta, call.q_slices))
        gq, gk, gv, *d_values = vjp((ct_o, jnp.swapaxes(ct_lse, 1, 2).astype(lse_s.dtype)))
        d_operands = None
        if "dkdv" in parts:
            d_operands = [None] * (len(operands) + 1)
            for i, d in zip(wanted, d_values):
                d_operands[i] = d
        return _select(parts, gq, gk, gv) + (d_operands,)

    def body_for(parts):
        """body(call, carry, q, k, v, score) adding this step's `parts` of the block
        gradients to the carry: (dQ, dK, dV, dOps), (dK, dV, dOps) or (dQ,). dQ and the
        score operands' gradients dOps (a tuple over `wanted`) accumulate in float32
        across steps; dK/dV start from zeros in K/V's dtype (this step's share only: the
        float32 sum is made outside, in the same pass that packs the next hop)."""
        def body(call, carry, q, k, v, score):
            def compute(carry):
                gq, gk, gv, d_operands = step_grads(call, q, k, v, parts, score)
                add = lambda x, g, sl: update_rows(x, rows(x, sl) + g.astype(x.dtype), sl)  # noqa: E731
                new = []
                if "dq" in parts:
                    new.append(add(carry[0], gq, call.q_slices))
                if "dkdv" in parts:
                    d_ops = carry[-1]
                    new += [add(carry[-3], gk, call.kv_slices), add(carry[-2], gv, call.kv_slices),
                            tuple(x + d_operands[i].astype(x.dtype) for x, i in zip(d_ops, wanted))]
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
    d_ops = tuple(jnp.zeros(score_operands[i].shape, acc) for i in wanted)
    kv, finished = (k, v), ()  # the K/V held now; the accumulators completed last step
    for s in range(p):
        last = s == p - 1
        calls = [device_call(cfg, mask, d, (d - s) % p) for d in range(p)]
        score = (None if cfg.score_fn is None
                 else (tuple(score_operands), step_offsets(cfg, device, (device - s) % p, q.shape[0])))
        sent = (kv if not last else ()) + finished
        received = send_on(sent, cfg.axis_name, p)
        if not last:
            dq, gk, gv, d_ops = dispatch(calls, device, body_for(BOTH), (dq, *zeros_kv(), d_ops),
                                         q, *kv, score)
        else:
            gk, gv, d_ops = dispatch(calls, device, body_for(("dkdv",)), (*zeros_kv(), d_ops),
                                     q, *kv, score)
        nxt = received[:2] if not last else None
        incoming = received[len(received) - len(finished):] if finished else ()
        gk, gv = gk.astype(acc), gv.astype(acc)
        finished = (incoming[0] + gk, incoming[1] + gv) if incoming else (gk, gv)
        if last:
            # Home, overlapping the last dQ kernel; the sums are complete, so they travel
            # in K/V's dtype (the same values as casting after the hop, half the bytes).
            dkv = send_on((finished[0].astype(k.dtype), finished[1].astype(v.dtype)), cfg.axis_name, p)
            (dq,) = dispatch(calls, device, body_for(("dq",)), (dq,), q, *kv, score)
        kv = nxt
    zeros = jax.tree_util.tree_map(lambda x: None, leaves)
    d_score = [None] * len(score_operands)
    for i, d in zip(wanted, d_ops):   # this device's share; shard_map sums the devices'
        d_score[i] = d.astype(score_operands[i].dtype)
    return (dq.astype(q.dtype), dkv[0], dkv[1], zeros, _sink_gradient(sinks, lse, delta),
            tuple(d_score))


def _sink_gradient(sinks, lse, delta):
    """d sinks of this device's rows: the sink is one more column of every row's softmax,
    with probability P = exp(sinks[n] − lse) and a zero value vector (dP = 0), so its dS is
    P·(0 − D). Rows of all devices add up: shard_map sums the cotangents of the replicated
    sinks."""
    if sinks is None:
        return None
    p_sink = jnp.exp(sinks.astype(lse.dtype)[None, None, :] - lse)        # [B, L, N]
    return jnp.sum(-p_sink * delta, axis=(0, 1)).astype(sinks.dtype)
