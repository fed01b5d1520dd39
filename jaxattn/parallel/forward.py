"""The ring's forward pass, per device (inside shard_map).

At ring step s device d holds the K/V shard of device src = (d - s) mod P. Each step's
partial result (out_s, lse_s) comes from ``dot_product_attention(...,
return_residuals=True)`` of whichever implementation was asked for, and the partials
merge exactly through their log-sum-exp:

    lse = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - lse)·out_a + exp(lse_b - lse)·out_b

with rows whose lse is -inf (nothing allowed yet) given weight 0, never NaN. Attention
sinks (one logit per head, zero value vector) are one more partial: the merge starts
from out = 0, lse = sinks[n] instead of lse = -inf. A score function is applied by each
step's call at global positions (jaxattn.parallel.scores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import acc_dtype
from jaxattn.api import dot_product_attention
from jaxattn.parallel.hops import Packing, ring_perm
from jaxattn.parallel.plan import Call, RingConfig, dispatch, device_call, maybe_skip, rows, update_rows
from jaxattn.parallel.scores import step_offsets, step_score_mod


def attend(cfg: RingConfig, call: Call, q, k, v, score=None):
    """One step's call: (out, lse [B, N, L]). score: None, or (the score function's
    operands, the step's offsets) (jaxattn.parallel.scores)."""
    return dot_product_attention(q, k, v, mask=call.mask, scale=cfg.scale,
                                 score_mod=step_score_mod(cfg, call.q_slices, call.kv_slices, score),
                                 implementation=cfg.implementation, return_residuals=True)


def merge(o_a, lse_a, o_b, lse_b):
    """Exact merge of two partial attentions over disjoint key sets. o [B, L, N, H] in
    the accumulation dtype, lse [B, L, N]; -inf rows (no key yet) weigh 0, never NaN."""
    lse = jnp.logaddexp(lse_a, lse_b)  # -inf when both are -inf
    ref = jnp.where(jnp.isneginf(lse), 0.0, lse)
    wa, wb = jnp.exp(lse_a - ref)[..., None], jnp.exp(lse_b - ref)[..., None]
    return o_a * wa + o_b.astype(o_a.dtype) * wb, lse



def ring_forward(cfg: RingConfig, q, k, v, leaves, sinks=None, score_operands=()):
    """(out [B, L, N, H] in q's dtype, lse [B, L, N] in the accumulation dtype); with
    sinks [N] the lse includes them; score_operands: the arrays cfg.score_fn reads."""
    p = cfg.num_shards
    mask = jax.tree_util.tree_unflatten(cfg.mask_treedef, leaves)
    device = jax.lax.axis_index(cfg.axis_name)
    b, lq, n, h = q.shape
    acc = acc_dtype(q.dtype)
    start = (jnp.full((b, lq, n), -jnp.inf, acc) if sinks is None
             else jnp.broadcast_to(sinks.astype(acc)[None, None, :], (b, lq, n)))
    carry = (jnp.zeros((b, lq, n, h), acc), start)

    def body(call, carry, q, k, v, score):
        def compute(carry):
            o_acc, lse_acc = carry
            o, lse = attend(cfg, call, rows(q, call.q_slices), rows(k, call.kv_slices),
                             rows(v, call.kv_slices), score)
            o_new, lse_new = merge(rows(o_acc, call.q_slices), rows(lse_acc, call.q_slices),
                                    o, jnp.swapaxes(lse, 1, 2).astype(acc))
            return (update_rows(o_acc, o_new, call.q_slices),
                    update_rows(lse_acc, lse_new, call.q_slices))
        return maybe_skip(call, cfg, compute, carry)

    # K and V travel as one buffer, forwarded as received (packed once, unpacked per step).
    packing = Packing.of((k, v))
    buf = packing.pack((k, v))   # (p > 1 here: one device runs no ring)
    for s in range(p):
        # Send the shard on before computing with it, so the transfer overlaps the step.
        nxt = jax.lax.ppermute(buf, cfg.axis_name, ring_perm(p)) if s + 1 < p else None
        kv = (k, v) if s == 0 else packing.unpack(buf)
        calls = [device_call(cfg, mask, d, (d - s) % p) for d in range(p)]
        score = (None if cfg.score_fn is None
                 else (tuple(score_operands), step_offsets(cfg, device, (device - s) % p, b)))
        carry = dispatch(calls, device, body, carry, q, *kv, score)
        if nxt is not None:
            # The next hop forwards what arrived here; without this tie XLA may run the
            # whole chain of hops up front, with no kernel to hide them behind.
            nxt, carry = jax.lax.optimization_barrier((nxt, carry))
        buf = nxt
    out, lse = carry
    return out.astype(q.dtype), lse
