"""jaxattn.decode_attention: attention of the newest tokens over a KV cache.

Shape legend: B batch, Tq new tokens per row, N query heads, K key/value heads (N a
multiple of K), H head dim; S_max the slots of a contiguous cache; a paged cache holds
num_pages pages of page_size slots and row b's pages are listed, in order, in
page_table[b] (its capacity is max_pages · page_size slots).

Semantics (the reference below is the definition): the query's Tq tokens sit at absolute
positions lengths[b] - Tq ... lengths[b] - 1 of row b. Query t may attend key j when

    j < lengths[b]   and   j <= lengths[b] - Tq + t   and   mask(lengths[b] - Tq + t, j)

i.e. decoding returns the last Tq rows of causal attention over the valid prefix, with
any jaxattn Mask evaluated at absolute positions (LocalMask(w - 1, 0) is a sliding window
of w keys). Slots at or past lengths[b] are never read into a result, whatever they hold
(NaN, Inf, another sequence's data); a row with lengths[b] = 0 (or a query position < 0)
returns zeros, with lse -inf. Masks that carry arrays are indexed at absolute positions:
SegmentMask ids are [B, capacity] on both sides, a DenseMask is [.., capacity, capacity].

A score_mod (`jaxattn.ScoreMod`) acts as in `dot_product_attention`, on the logits after
the scale and the soft cap and before causality, lengths and the mask (which it can never
revive), with the same arguments that attention over the whole sequence would give it:
batch row b, query head n (0..N-1), q_pos = lengths[b] - Tq + t and kv_pos = j, the
absolute (logical, for a paged cache) positions. Decoding is inference: the kernels have
no backward, and differentiating a kernel decode raises NotImplementedError; the
reference is plain jnp and differentiable (score_mod operands included).

Dispatch follows jaxattn.api: ValueError for bad input, NotImplementedError when an
implementation cannot serve a valid request (implementation=None then falls back, ending
at the reference).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.api import _shape_error, check_float_array, check_scale_and_cap
from jaxattn.masks import AndMask, CausalMask, DenseMask, FullMask, LocalMask, Mask, canonical_mask
from jaxattn.reference import reference_attention
from jaxattn.score_mod import ScoreMod, as_score_mod
from jaxattn.sinks import add_sinks, check_sinks
from pallas_kernels.common import acc_dtype
from pallas_kernels.decode_static import DecodeStatic, KeyBounds
from pallas_kernels.registry import backend_names, get_backend

__all__ = ["decode_attention", "reference_decode", "key_bounds", "decode_implementations"]

_CONTIGUOUS = "contiguous cache [B, S_max, K, H]"
_PAGED = "paged cache [num_pages, page_size, K, H]"


# ---------------------------------------------------------------------------------
# The definition
# ---------------------------------------------------------------------------------
def _operand_rows(op, q_pos, kv_len: int, batch: int):
    """A mask operand as mask.evaluate sees it at query positions q_pos [B, Tq] and keys
    0..kv_len-1: broadcastable to [B, Hm, Tq, kv_len] (rows gathered, never the whole
    [capacity, capacity] matrix of a block layout)."""
    a = jnp.asarray(op.array)
    rows = jnp.maximum(q_pos, 0)   # rows < 0 attend to nothing (causality) anyway
    if op.kind == "kv":
        return a[:, None, None, :kv_len]
    if op.kind == "q":
        a = jnp.broadcast_to(a, (batch, a.shape[1]))
        return jnp.take_along_axis(a, jnp.minimum(rows, a.shape[1] - 1), axis=1)[:, None, :, None]
    if op.kind == "block":
        rows = rows // op.layout_block[0]
    if a.shape[2] > 1:
        a = jnp.broadcast_to(a, (batch, *a.shape[1:]))
        index = jnp.broadcast_to(jnp.minimum(rows, a.shape[2] - 1)[:, None, :, None],
                                 (batch, a.shape[1], rows.shape[1], a.shape[3]))
        a = jnp.take_along_axis(a, index, axis=2)
    if op.kind == "block":
        a = jnp.repeat(a, op.layout_block[1], axis=3)[..., :kv_len]
    return a


@dataclasses.dataclass(frozen=True)
class _AtAbsolutePositions:
    """A score function of decode's query rows t, called at their absolute positions
    lengths[b] - Tq + t: its last operand is `lengths`, the others are fn's."""
    fn: Any
    tq: int

    def __call__(self, score, batch, head, q_pos, kv_pos, *operands):
        *operands, lengths = operands
        return self.fn(score, batch, head, lengths[batch] - self.tq + q_pos, kv_pos, *operands)


@functools.partial(jax.jit, static_argnames=("scale", "logits_soft_cap", "return_residuals"))
def reference_decode(query, key_cache, value_cache, lengths, page_table, mask: Mask, *,
                     scale: float, logits_soft_cap: float | None = None,
                     return_residuals: bool = False, score_mod: ScoreMod | None = None):
    """The dense oracle (inputs validated by decode_attention; `mask` canonical): gathers
    the pages into a contiguous [B, capacity, K, H] copy, zeroes every slot no query of the
    row may see (so NaN there cannot leak through 0 · NaN), and takes the reference
    attention of the Tq new tokens with causality, lengths and the mask as one bool mask,
    and the score function (if any) at absolute query positions."""
    b, tq = query.shape[:2]
    if page_table is not None:
        pages = jnp.clip(page_table, 0, key_cache.shape[0] - 1)
        key_cache, value_cache = (x[pages].reshape(b, -1, *x.shape[2:]) for x in (key_cache, value_cache))
    s = key_cache.shape[1]
    kv_pos = jnp.arange(s, dtype=jnp.int32)
    written = kv_pos[None, :] < lengths[:, None]                           # [B, S]
    q_pos = lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None, :]   # [B, Tq]
    allowed = (kv_pos[None, None, :] <= q_pos[:, :, None]) & written[:, None, :]
    allowed = allowed[:, None]                                             # [B, 1, Tq, S]
    if not isinstance(mask, FullMask):
        values = tuple(_operand_rows(o, q_pos, s, b) for o in mask.operands())
        allowed = allowed & mask.evaluate(q_pos[:, None, :, None], kv_pos[None, None, None, :], values)
    # Slots no query of the row may see are zeroed, so NaN or Inf there (unwritten slots,
    # keys outside a window) cannot leak through 0 · NaN.
    seen = jnp.any(allowed, axis=(1, 2))[:, :, None, None]                 # [B, S, 1, 1]
    key_cache, value_cache = (jnp.where(seen, x, 0) for x in (key_cache, value_cache))
    if score_mod is not None:
        score_mod = ScoreMod(_AtAbsolutePositions(score_mod.fn, tq), *score_mod.operands, lengths)
    return reference_attention(query, key_cache, value_cache, None, DenseMask(allowed), scale=scale,
                               logits_soft_cap=logits_soft_cap, return_residuals=return_residuals,
                               score_mod=score_mod)


def key_bounds(mask: Mask) -> KeyBounds:
    """Affine bounds on the keys a query at position p may see (pallas_kernels.decode_static).

    Causal and local parts of an AND give exact bounds; any other part (strided, global,
    an OR, array masks) leaves the bounds of the others in place but makes them a
    superset, so kernels evaluate the mask in every tile they visit."""
    parts = mask.parts if isinstance(mask, AndMask) else (mask,)
    lower, upper, exact = [], [], True
    for p in parts:
        if isinstance(p, FullMask):
            continue
        if isinstance(p, CausalMask):
            upper.append(p.offset)
        elif isinstance(p, LocalMask):
            if p.left is not None:
                lower.append(p.offset - p.left)
            if p.right is not None:
                upper.append(p.offset + p.right)
        else:
            exact = False
    upper = [c for c in upper if c < 0]   # decoding is causal: hi(p) <= p already
    return KeyBounds(lower_offsets=(max(lower),) if lower else (),
                     upper_offsets=(min(upper),) if upper else (), exact=exact)


# ---------------------------------------------------------------------------------
# Implementations: fn(query, key_cache, value_cache, lengths, page_table, mask, *, scale,
# logits_soft_cap, num_splits, return_residuals, score_mod): "reference", and one per
# kernel backend of pallas_kernels/registry.py that has a decode entry ("pallas_triton").
# ---------------------------------------------------------------------------------
def _reference_impl(query, key_cache, value_cache, lengths, page_table, mask, *, scale,
                    logits_soft_cap, num_splits, return_residuals, score_mod=None):
    del num_splits   # one dense pass
    return reference_decode(query, key_cache, value_cache, lengths, page_table, mask, scale=scale,
                            logits_soft_cap=logits_soft_cap, return_residuals=return_residuals,
                            score_mod=score_mod)


@dataclasses.dataclass(frozen=True)
class _MaskFn:
    """mask.evaluate as a kernel's mask_fn, keyed by the mask's structure only (its
    pytree definition): a new SegmentMask of the same shapes at every decoding step does
    not recompile. The arrays reach the kernel as operands, never through this object."""
    treedef: Any

    def __call__(self, q_pos, kv_pos, operand_values=()):
        mask = jax.tree_util.tree_unflatten(self.treedef, [None] * self.treedef.num_leaves)
        return mask.evaluate(q_pos, kv_pos, operand_values)


def kernel_decode(backend_name: str, query, key_cache, value_cache, lengths, page_table, mask, *,
                  scale, logits_soft_cap, num_splits, return_residuals, score_mod=None, config=None,
                  interpret=None):
    """A kernel backend's decode entry (pallas_kernels/decode_static.py) as an
    implementation. `config` defaults to the backend's; `interpret` to Pallas interpret
    mode exactly when there is no GPU. Forward only: its gradient raises
    NotImplementedError."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError(f"{backend_name} decoding needs a CUDA GPU (or interpret=True)")
    mask_fn = None if isinstance(mask, FullMask) else _MaskFn(jax.tree_util.tree_structure(mask))
    static = DecodeStatic(scale=scale, logits_soft_cap=logits_soft_cap, mask_fn=mask_fn,
                          bounds=key_bounds(mask), num_splits=num_splits, config=config,
                          interpret=bool(interpret),
                          score_mod=None if score_mod is None else score_mod.fn,
                          score_operand_shapes=() if score_mod is None else tuple(
                              tuple(x.shape) for x in score_mod.operands))
    score_operands = None if score_mod is None else tuple(jnp.asarray(x) for x in score_mod.operands)
    out, lse = _forward_only(backend_name, static, query, key_cache, value_cache, lengths, page_table,
                             mask, score_operands)
    return (out, lse) if return_residuals else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _forward_only(backend_name, static, query, key_cache, value_cache, lengths, page_table, mask,
                  score_operands):
    return _kernel_jit(query, key_cache, value_cache, lengths, page_table, mask, score_operands,
                       backend_name=backend_name, static=static)


def _forward_only_fwd(backend_name, static, *args):
    return _forward_only(backend_name, static, *args), None


def _forward_only_bwd(backend_name, static, residuals, cotangents):
    raise NotImplementedError(
        f"decode_attention(implementation={backend_name!r}) has no backward (decoding is inference). "
        "Differentiate implementation='reference', or dot_product_attention for training.")


_forward_only.defvjp(_forward_only_fwd, _forward_only_bwd)


@functools.partial(jax.jit, static_argnames=("backend_name", "static"))
def _kernel_jit(query, key_cache, value_cache, lengths, page_table, mask, score_operands, *,
                backend_name, static):
    b, tq = query.shape[:2]
    capacity = key_cache.shape[1] * (1 if page_table is None else page_table.shape[1])
    q_pos = lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None, :]
    # The mask's arrays at the query rows: [B|1, N|1, Tq|1, capacity|1] each.
    operands = tuple(_operand_rows(o, q_pos, capacity, b) for o in mask.operands())
    score = {} if score_operands is None else {"score_operands": score_operands}
    return get_backend(backend_name).decode(static, query, key_cache, value_cache, lengths,
                                            page_table, operands, **score)


def _kernel_backends_with_decode() -> tuple[str, ...]:
    """Registered kernel backends that have a decode entry, in preference order."""
    return tuple(name for name in backend_names() if get_backend(name).decode is not None)


def decode_implementations() -> tuple[str, ...]:
    """Names decode_attention's `implementation=` accepts in this installation."""
    return ("reference", *_kernel_backends_with_decode())


def _implementation(name: str):
    return _reference_impl if name == "reference" else functools.partial(kernel_decode, name)


def _default_order() -> tuple[str, ...]:
    if jax.default_backend() == "gpu":
        return (*_kernel_backends_with_decode(), "reference")
    return ("reference",)


# ---------------------------------------------------------------------------------
# Validation and the public entry point
# ---------------------------------------------------------------------------------
def _check_int_array(name: str, x, shape: tuple, meaning: str, fix: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name}: expected an int32 array {meaning}, got {type(x).__name__}. {fix}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name}: expected int32 {meaning}, got dtype {x.dtype}. "
                         f"Cast with {name}.astype(jnp.int32).")
    if tuple(x.shape) != shape:
        raise _shape_error(f"{name} shape", f"{list(shape)} {meaning}", tuple(x.shape), fix)
    return jnp.asarray(x).astype(jnp.int32)


def _validate(query, key_cache, value_cache, lengths, page_table, num_splits, scale, logits_soft_cap):
    """Static checks; returns (lengths, page_table) as int32 and the cache capacity."""
    check_float_array("query", query, "[B, Tq, N, H] layout ([batch, new tokens, heads, head_dim])")
    layout = _PAGED if page_table is not None else _CONTIGUOUS
    for name, x in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_float_array(name, x, f"the {layout} layout")
    b, tq, n, h = query.shape
    for name, x in (("query", query), ("key_cache", key_cache)):
        if 0 in x.shape:
            raise _shape_error(f"{name} shape", "every dimension >= 1", tuple(x.shape),
                               "Skip the call when there is no new token or no cache.")
    if value_cache.shape != key_cache.shape:
        raise _shape_error("value_cache shape", f"key_cache's shape {tuple(key_cache.shape)}",
                           tuple(value_cache.shape), "Allocate the key and value caches alike.")
    if not (query.dtype == key_cache.dtype == value_cache.dtype):
        raise ValueError(f"dtypes: expected query, key_cache and value_cache of one dtype, got "
                         f"{query.dtype}, {key_cache.dtype}, {value_cache.dtype}. Cast them to one dtype.")
    k, hk = key_cache.shape[2:]
    if hk != h:
        raise _shape_error("key_cache head dim", f"query's head dim {h}", hk,
                           "Project queries and keys to the same head dim H.")
    if n % k:
        raise _shape_error("head counts", "query heads N a multiple of the cache's key/value heads K "
                           "(GQA/MQA)", f"N={n}, K={k}", "Use K dividing N, e.g. K=1 (MQA) or K=N (MHA).")
    if page_table is None:
        if key_cache.shape[0] != b:
            raise _shape_error("key_cache batch", f"query's batch size {b} for a {_CONTIGUOUS}",
                               f"{key_cache.shape[0]} (shape {tuple(key_cache.shape)})",
                               "Give one cache row per sequence, or pass page_table=[B, max_pages] "
                               f"if this is a {_PAGED}.")
        capacity = key_cache.shape[1]
    else:
        if not hasattr(page_table, "ndim") or page_table.ndim != 2:
            raise _shape_error("page_table", "int32 [B, max_pages] (row b's page numbers, in order)",
                               getattr(page_table, "shape", type(page_table).__name__),
                               f"Pass page_table=None for a {_CONTIGUOUS}.")
        page_table = _check_int_array("page_table", page_table, (b, page_table.shape[1]),
                                      "[B, max_pages] (row b's page numbers)",
                                      "Give one row of page numbers per sequence.")
        capacity = page_table.shape[1] * key_cache.shape[1]
    if tq > capacity:
        raise _shape_error("query length", f"Tq <= the cache capacity {capacity}", f"Tq={tq}",
                           "Grow the cache (more slots or pages), or run a long prompt through "
                           "dot_product_attention.")
    lengths = _check_int_array("lengths", lengths, (b,), "[B] (valid tokens per row, new ones included)",
                               "Pass one length per sequence, e.g. jnp.full((B,), t, jnp.int32).")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer))
                                   or num_splits < 1):
        raise ValueError(f"num_splits: expected None or a positive int, got {num_splits!r}. "
                         "Leave it None to choose from the shapes.")
    check_scale_and_cap(scale, logits_soft_cap)
    return lengths, page_table, capacity


def decode_attention(query, key_cache, value_cache, *, lengths, page_table=None, mask=None,
                     scale=None, logits_soft_cap=None, num_splits=None, score_mod=None, sinks=None,
                     implementation=None, return_residuals=False):
    """Attention of the Tq newest tokens of each sequence over its KV cache.

    Args:
      query: [B, Tq, N, H], the tokens at positions lengths[b] - Tq ... lengths[b] - 1
        (Tq = 1 for plain decoding; Tq > 1 for speculative decoding or chunked prefill),
        causal among themselves.
      key_cache, value_cache: contiguous [B, S_max, K, H] (page_table None), or paged
        [num_pages, page_size, K, H] with `page_table`.
      lengths: int32 [B] (may be traced): tokens valid in row b, the new ones included.
      page_table: None, or int32 [B, max_pages]: row b's pages in order. Entries of pages
        past a row's length are never followed.
      mask: None, a `jaxattn.masks.Mask` or a bool array, evaluated at absolute positions
        (see the module docstring); causality is always applied.
      scale: multiplies q·k; default 1/sqrt(H). logits_soft_cap: c·tanh(logits / c).
      num_splits: programs sharing one sequence's keys in the kernels (None: from shapes).
      score_mod: None, a `jaxattn.ScoreMod(fn, *operands)` or a plain callable
        fn(score, batch, head, q_pos, kv_pos) -> score, as in `dot_product_attention`:
        applied after the scale and the soft cap and before causality, lengths and the
        mask, with head the query head and q_pos, kv_pos absolute positions (see the
        module docstring). Inference only: the kernels have no backward.
      sinks: None or float [N]: one logit per query head in every row's softmax, with a
        zero value vector (as in `dot_product_attention`; applied through the lse).
      implementation: None (best available), "reference", or a kernel backend with a
        decode entry ("pallas_triton"; see decode_implementations()).
      return_residuals: also return lse [B, N, Tq] (float32, float64 for float64 inputs; natural log, -inf for a row
        with no key).

    Returns:
      [B, Tq, N, H] in the query's dtype (and lse with return_residuals).
    """
    if implementation is not None and implementation not in decode_implementations():
        raise ValueError(f"implementation: expected None or one of {sorted(decode_implementations())}, "
                         f"got {implementation!r}. Leave it None to pick the best available.")
    if not isinstance(return_residuals, (bool, np.bool_)):
        raise ValueError(f"return_residuals: expected a bool, got {return_residuals!r}. "
                         "Pass True to also get the lse [B, N, Tq].")
    lengths, page_table, capacity = _validate(query, key_cache, value_cache, lengths, page_table,
                                              num_splits, scale, logits_soft_cap)
    if mask is not None and not isinstance(mask, Mask) and not hasattr(mask, "dtype"):
        raise ValueError(f"mask: expected None, a jaxattn.masks.Mask or a bool array, got "
                         f"{type(mask).__name__}. Build one with jaxattn.masks.")
    canonical = canonical_mask(mask)
    b, _, n, h = query.shape
    canonical.validate(capacity, capacity, b, n)   # positions are absolute: capacity × capacity
    scale = float(1.0 / math.sqrt(h)) if scale is None else float(scale)
    cap = None if logits_soft_cap is None else float(logits_soft_cap)
    splits = None if num_splits is None else int(num_splits)

    sinks = check_sinks(sinks, n)
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod.check(acc_dtype(query.dtype))
    score = {} if score_mod is None else {"score_mod": score_mod}

    order = (implementation,) if implementation is not None else _default_order()
    reasons = []
    for name in order:
        try:
            result = _implementation(name)(query, key_cache, value_cache, lengths, page_table, canonical,
                                            scale=scale, logits_soft_cap=cap, num_splits=splits,
                                            return_residuals=bool(return_residuals) or sinks is not None,
                                            **score)
            if sinks is None:
                return result
            out, lse = add_sinks(*result, sinks)
            return (out, lse) if return_residuals else out
        except NotImplementedError as e:
            if implementation is not None:
                raise
            reasons.append(f"{name}: {e}")
    raise NotImplementedError("no implementation could serve this request: " + "; ".join(reasons))
