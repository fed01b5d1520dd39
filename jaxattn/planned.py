"""Running a plan (jaxattn/masks/plan.py): residue layouts, parts, and their exact merge.

dot_product_attention asks `run_planned` first. For a mask holding a StridedMask, asked of
a kernel backend (whose cost follows the tiles it visits), it plans at that backend's
forward tile sizes;
when the plan visits fewer tiles than the plain walk it runs the plan, else returns None
and the call takes today's path. Everything here is jnp around ordinary kernel calls, so
the backward follows the same plan (its kernels skip tiles by the same masks).

Residue layout, stride s. Query i = p·s + r becomes row p of class r; key j becomes row
p' of class r where j + pre = p'·s + r. Two ways to give the kernels the classes:

* heads: when T and S are multiples of s (and pre = 0) a contiguous [B, T, N, H] array
  viewed as [B, T/s, s·N, H] holds class r at heads r·N ... r·N + N - 1. The view is free
  (a reshape), and under GQA query head r·N + n still reads key head r·K + n // (N/K).
* batch: otherwise the sequence is padded to whole classes ([B, s·Tc, N, H]) and the classes
  are moved into the batch axis ([B·s, Tc, N, H], a transpose). Padding keys are masked
  by a SegmentMask, and segment ids are permuted like the tokens.

Parts over disjoint pairs merge through their log-sum-exp (`merge_partials`).
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import jax
import jax.numpy as jnp

from pallas_kernels.registry import backend_names, get_backend
from jaxattn import flash
from jaxattn.implementations import default_order
from jaxattn.masks import AndMask, Mask, OrMask, SegmentMask, StridedMask
from jaxattn.masks.complement import NotMask
from jaxattn.masks.plan import DataSlot, Part, plan_mask, skeleton, substitute, to_class_coords

_ENABLED = contextvars.ContextVar("jaxattn_planning", default=True)


@contextlib.contextmanager
def planning(enabled: bool = True):
    """Turn the planner on or off for the dot_product_attention calls traced inside:

        with jaxattn.planned.planning(False):
            out = jax.jit(f)(q, k, v)     # today's path: the plain tile walk

    A function already traced by jit keeps the choice it was traced with."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def planning_enabled() -> bool:
    return _ENABLED.get()


def forward_tiles(name: str, query, key, mask: Mask, logits_soft_cap=None):
    """(block_q, block_kv) of the forward kernel that implementation `name` would run
    for this call; None when `name` is no kernel backend (its cost does not follow the
    tiles: nothing to plan for) or the backend declines the call."""
    if name not in backend_names():
        return None
    backend = get_backend(name)
    interpret = flash.default_interpret()
    request = flash.kernel_request(query, key, None, mask, logits_soft_cap)
    if backend.supports(request, interpret=interpret) is not None:
        return None
    return backend.default_config(request, interpret=interpret).metadata_tiles()["forward"]


def _has(mask: Mask, kind) -> bool:
    if isinstance(mask, (AndMask, OrMask)):
        return any(_has(p, kind) for p in mask.parts)
    if isinstance(mask, NotMask):
        return _has(mask.inner, kind)
    return isinstance(mask, kind)


def plan_for(mask: Mask, query, key, implementation: str | None, logits_soft_cap=None):
    """(plan, segment masks, kernel backend name) for this call, or None for today's
    path. query and key may be arrays or jax.ShapeDtypeStructs."""
    if not _ENABLED.get() or not _has(mask, StridedMask):
        return None
    tiles = None
    for name in (implementation,) if implementation is not None else default_order():
        tiles = forward_tiles(name, query, key, mask, logits_soft_cap)
        if tiles is not None or name not in backend_names():
            break  # the first implementation that would serve the call decides
    found = None if tiles is None else skeleton(mask)
    if found is None:
        return None
    skel, data = found
    plan = plan_mask(skel, query.shape[1], key.shape[1], *tiles)
    return (plan, data, name) if plan.planned else None


def run_planned(query, key, value, bias, mask: Mask, *, implementation, scale, logits_soft_cap,
                return_residuals, attend_fn):
    """The dispatch hook: the planned result of dot_product_attention, or None when the
    plain tile walk is the best (or the call has a bias, which the plan does not permute).
    `attend_fn` is dot_product_attention itself, which runs each part."""
    if bias is not None:
        return None
    found = plan_for(mask, query, key, implementation, logits_soft_cap)
    if found is None:
        return None
    plan, data, planned_for = found

    def attend(q, k, v, m):
        call = dict(mask=m, scale=scale, logits_soft_cap=logits_soft_cap, return_residuals=True)
        if implementation is not None:
            return attend_fn(q, k, v, implementation=implementation, **call)
        # Default dispatch: the parts run on the kernels the plan's tiles were sized for.
        # Left to dispatch, a part that is a plain window or causal mask would go where a
        # full-length one goes (cuDNN), which on the H200 ran a planned dilated window at
        # 55 TFLOP/s against 237 on the Mosaic kernels (BENCHMARKS.md). A part those
        # kernels decline takes the default dispatch.
        try:
            return attend_fn(q, k, v, implementation=planned_for, **call)
        except NotImplementedError:
            return attend_fn(q, k, v, implementation=None, **call)

    try:
        with planning(False):  # the parts' own calls take the plain walk
            partials = [_run_part(part, data, query, key, value, attend) for part in plan.parts]
    except NotImplementedError:  # a kernel declines a part's call: keep today's path
        return None
    out, lse = partials[0] if len(partials) == 1 else merge_partials(partials)
    return (out, lse) if return_residuals else out


def _run_part(part: Part, data, query, key, value, attend):
    if part.layout is None:
        return attend(query, key, value, substitute(part.mask, data.__getitem__))
    s, pre = part.layout.stride, part.layout.pre
    b, t = query.shape[:2]
    kv_len = key.shape[1]
    tq, tk = part.q_len, part.kv_len
    heads = pre == 0 and t == tq * s and kv_len == tk * s and not _has(part.mask, DataSlot)

    def segments(k):
        seg = data[k]
        q_ids = jnp.broadcast_to(seg.q_segment_ids, (b, t))
        kv_ids = jnp.broadcast_to(seg.kv_segment_ids, (b, kv_len))
        return SegmentMask(_to_classes(q_ids[..., None, None], s, tq, 0, False)[..., 0, 0],
                           _to_classes(kv_ids[..., None, None], s, tk, pre, False)[..., 0, 0])

    kernel_mask = to_class_coords(part.mask, part.layout, segments)
    if not heads and (pre or kv_len + pre != tk * s):
        # Key rows padded in front (pre) and at the end of the classes attend to nothing.
        kk = np.arange(tk)[None, :] * s + np.arange(s)[:, None]
        pad = np.tile(((kk < pre) | (kk >= kv_len + pre)).astype(np.int32), (b, 1))
        kernel_mask = kernel_mask & SegmentMask(jnp.zeros((b * s, tq), jnp.int32), jnp.asarray(pad))
    out, lse = attend(_to_classes(query, s, tq, 0, heads), _to_classes(key, s, tk, pre, heads),
                      _to_classes(value, s, tk, pre, heads), kernel_mask)
    return _from_classes(out, lse, b, s, t, heads)


def _to_classes(x, stride: int, length: int, front: int, heads: bool):
    """[B, L, K, H] -> classes of `length` rows: [B, length, stride·K, H] (heads) or
    [B·stride, length, K, H] (batch), after `front` padding rows and padding at the end."""
    b, l, k, h = x.shape
    back = length * stride - l - front
    if front or back:
        xp = np if isinstance(x, np.ndarray) else jnp  # numpy too, for the tests
        x = xp.pad(x, ((0, 0), (front, back), (0, 0), (0, 0)))
    x = x.reshape(b, length, stride, k, h)
    if heads:
        return x.reshape(b, length, stride * k, h)
    return x.transpose(0, 2, 1, 3, 4).reshape(b * stride, length, k, h)


def _from_classes(out, lse, b: int, stride: int, t: int, heads: bool):
    """Inverse of _to_classes for the output ([B, T, N, H]) and lse ([B, N, T])."""
    if heads:
        _, tq, sn, h = out.shape
        n = sn // stride
        out = out.reshape(b, tq * stride, n, h)
    else:
        _, tq, n, h = out.shape
        out = out.reshape(b, stride, tq, n, h).transpose(0, 2, 1, 3, 4).reshape(b, tq * stride, n, h)
    lse = lse.reshape(b, stride, n, tq).transpose(0, 2, 3, 1).reshape(b, n, tq * stride)
    return out[:, :t], lse[..., :t]


def merge_partials(partials):
    """Exact attention over the union of disjoint key sets from per-set results.

    partials: (out [B, T, N, H], lse [B, N, T]) pairs. With lse = log Σ_p exp(lse_p),
    out = Σ_p exp(lse_p - lse)·out_p. A row with no key in one part (lse_p = -inf) gives
    that part weight 0; a row with no key anywhere gives out 0 and lse -inf; neither
    makes a NaN, in values or gradients. (The ring's merge, jaxattn/parallel/forward.py,
    is the two-part case; it is never differentiated, and jnp.logaddexp's gradient at
    (-inf, -inf) is NaN, so this one shifts by a stopped maximum instead.)
    """
    outs, lses = zip(*partials)
    lses = jnp.stack(lses)  # [P, B, N, T]
    # The shift cancels exactly in out and lse: no gradient needs to flow through it.
    m = jax.lax.stop_gradient(jnp.max(lses, axis=0))
    m = jnp.where(jnp.isfinite(m), m, 0)
    w = jnp.exp(lses - m)
    total = jnp.sum(w, axis=0)
    nonempty = total > 0
    total = jnp.where(nonempty, total, 1)
    lse = jnp.where(nonempty, m + jnp.log(total), -jnp.inf)
    weights = jnp.swapaxes(w / total, -1, -2)[..., None]  # [P, B, T, N, 1]
    out = sum(o.astype(lses.dtype) * weights[p] for p, o in enumerate(outs))
    return out.astype(outs[0].dtype), lse
