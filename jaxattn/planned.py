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

Parts over disjoint pairs merge through their log-sum-exp (`merge_partials`). When every
part runs on one kernel backend, the merge has its own VJP (`_merged_parts`): for
disjoint parts the attention of the union has P = exp(S − lse) with the merged lse, and
dS = P ∘ (dP − D) with D = rowsum(dO ∘ O) − dlse of the merged output. So each part's
backward kernels take the merged O, lse, dO and D in its own layout (free views, or the
permutation of the forward), and D is computed once. Differentiating through the merge
instead would cost three more passes over O-sized arrays (each part's weighted dO and
its own D) and keep every part's output alive until the backward.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import numpy as np
import jax
import jax.numpy as jnp

from pallas_kernels.common import DeltaOfOutput, delta_array
from pallas_kernels.registry import backend_names, get_backend
from jaxattn import flash
from jaxattn.flash import pallas_attention, pallas_backward
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
    Parts that all run on the kernel backend the plan was sized for merge under the
    merge's own VJP (`_merged_parts`); otherwise `attend_fn` (dot_product_attention
    itself) runs each part and the merge is differentiated as it stands."""
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
            inputs = [_part_inputs(part, data, query, key, value) for part in plan.parts]
            if len(inputs) > 1 and _kernels_serve_all(planned_for, inputs, scale, logits_soft_cap,
                                                      (query, key, value)):
                spec = _MergeSpec(planned_for, scale, logits_soft_cap,
                                  tuple(layout for *_, layout in inputs))
                out, lse = _merged_parts(spec, tuple(tuple(x[:4]) for x in inputs))
            else:
                partials = [_from_layout(*attend(q, k, v, m), layout) for q, k, v, m, layout in inputs]
                out, lse = partials[0] if len(partials) == 1 else merge_partials(partials)
    except NotImplementedError:  # a kernel declines a part's call: keep today's path
        return None
    return (out, lse) if return_residuals else out


def _kernels_serve_all(name: str, inputs, scale, logits_soft_cap, arrays) -> bool:
    """Whether kernel backend `name` serves every part as given (so that the merge's own
    VJP can run their backward kernels): a static scale, no explicit sharding (the
    backward kernels are called on whole arrays), and the backend accepting each part."""
    if not isinstance(scale, float) or flash.explicitly_sharded(*arrays):
        return False
    return all(flash.decline_reason(name, q, k, m, scale=scale, logits_soft_cap=logits_soft_cap)
               is None for q, k, _, m, _ in inputs)


@dataclasses.dataclass(frozen=True)
class _MergeSpec:
    """The static side of a merged call: the kernel backend, scale, soft cap, and each
    part's layout ((batch, stride, T, heads) for a residue layout, None for natural)."""

    backend: str
    scale: float
    logits_soft_cap: float | None
    layouts: tuple


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _merged_parts(spec: _MergeSpec, inputs):
    """(out, lse) of the union of disjoint parts; inputs: per part (q, k, v, kernel mask)
    in that part's layout."""
    return _merged_forward(spec, inputs)[0]


def _merged_forward(spec: _MergeSpec, inputs):
    with planning(False):
        partials = [
            _from_layout(*pallas_attention(spec.backend, q, k, v, None, m, scale=spec.scale,
                                           logits_soft_cap=spec.logits_soft_cap,
                                           return_residuals=True), layout)
            for (q, k, v, m), layout in zip(inputs, spec.layouts)]
    out, lse = merge_partials(partials)
    return (out, lse), (inputs, out, lse)


def _merged_backward(spec: _MergeSpec, residuals, cotangents):
    inputs, out, lse = residuals
    dout, dlse = cotangents
    # D = rowsum(dO ∘ O) − dlse of the merged result, once for every part: [B, N, T].
    delta = delta_array(DeltaOfOutput(dlse), out, dout)
    grads = []
    for (q, k, v, m), layout in zip(inputs, spec.layouts):
        o_p, do_p, lse_p, delta_p = out, dout, lse, delta
        if layout is not None:
            _, s, _, heads = layout
            tq = q.shape[1]
            o_p, do_p = (_to_classes(x, s, tq, 0, heads) for x in (out, dout))
            # A padding query row of the classes gets dO = 0 and P = 0 (lse = +inf).
            lse_p = _rows_to_classes(lse, s, tq, heads, jnp.inf)
            delta_p = _rows_to_classes(delta, s, tq, heads, 0)
        dq, dk, dv = pallas_backward(spec.backend, q, k, v, o_p, lse_p, do_p, delta_p, m,
                                     scale=spec.scale, logits_soft_cap=spec.logits_soft_cap)
        grads.append((dq, dk, dv, None))  # the kernel mask holds integer data only
    return (tuple(grads),)


_merged_parts.defvjp(_merged_forward, _merged_backward)


def _part_inputs(part: Part, data, query, key, value):
    """(q, k, v, kernel mask, layout) of one part: the arrays in the part's layout, and
    the layout _from_layout needs to bring its result back (None: natural order)."""
    if part.layout is None:
        return query, key, value, substitute(part.mask, data.__getitem__), None
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
    if not heads and (pre or kv_len + pre != tk * s or t != tq * s):
        # Rows padded at the ends of the classes (and key rows in front, pre) take no part:
        # real rows get id 0, padding keys 1, padding queries 2. A padding query then
        # attends no key; otherwise a key reached by padding queries alone (causal, T < S:
        # the keys past the last query) would count as attended in a PARTIAL tile, and
        # the kernels would multiply its K/V rows in unzeroed (NaN there would reach
        # real rows of the tile).
        kk = np.arange(tk)[None, :] * s + np.arange(s)[:, None]
        qq = np.arange(tq)[None, :] * s + np.arange(s)[:, None]
        pad_kv = np.tile(((kk < pre) | (kk >= kv_len + pre)).astype(np.int32), (b, 1))
        pad_q = np.tile(np.where(qq >= t, 2, 0).astype(np.int32), (b, 1))
        kernel_mask = kernel_mask & SegmentMask(jnp.asarray(pad_q), jnp.asarray(pad_kv))
    return (_to_classes(query, s, tq, 0, heads), _to_classes(key, s, tk, pre, heads),
            _to_classes(value, s, tk, pre, heads), kernel_mask, (b, s, t, heads))


def _from_layout(out, lse, layout):
    """A part's (out, lse) in natural order."""
    return (out, lse) if layout is None else _from_classes(out, lse, *layout)


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


def _rows_to_classes(x, stride: int, length: int, heads: bool, fill):
    """A per-row array laid out like lse ([B, N, T]) in the classes' layout: [B, stride·N,
    length] (heads) or [B·stride, N, length] (batch), padding rows set to `fill`."""
    b, n, t = x.shape
    x = jnp.pad(x, ((0, 0), (0, 0), (0, length * stride - t)), constant_values=fill)
    x = x.reshape(b, n, length, stride).transpose(0, 3, 1, 2)
    return x.reshape(b, stride * n, length) if heads else x.reshape(b * stride, n, length)


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
