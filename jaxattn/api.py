"""jaxattn.dot_product_attention: validate → canonical Mask → pick implementation → call.

Shape legend: query [B, T, N, H], key/value [B, S, K, H], N a multiple of K (GQA/MQA),
bias broadcastable to [B, N, T, S], output [B, T, N, H] in the query's dtype,
lse float32 [B, N, T] (natural log).

Dispatch rule: ValueError means the input is wrong and is raised at once;
NotImplementedError means "this implementation cannot serve this valid request" and
`implementation=None` moves on to the next one, always ending at the reference.
"""

from __future__ import annotations

import math
import jax.numpy as jnp
import numpy as np

from jaxattn import implementations
from jaxattn.implementations import available_implementations
from jaxattn.masks import Mask, canonical_mask
from jaxattn.planned import run_planned

__all__ = ["dot_product_attention", "available_implementations", "validate_inputs"]

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _shape_error(what: str, expected: str, got, fix: str):
    return ValueError(f"{what}: expected {expected}, got {got}. {fix}")


def check_float_array(name: str, x, layout: str = "BTNH layout ([batch, length, heads, head_dim])"):
    """x must be a 4-D floating array (`layout` names its axes in the message)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name}: expected an array, got {type(x).__name__}. Pass a jax or numpy array.")
    if x.ndim != 4:
        raise _shape_error(f"{name} rank", f"4 dims in {layout}", f"shape {tuple(x.shape)}",
                           "Add the missing axes, e.g. x[None] for batch or x[:, :, None] for one head.")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise ValueError(f"{name}: expected a floating dtype (bfloat16, float16, float32, float64), "
                         f"got {x.dtype}. Cast with x.astype(jnp.bfloat16).")


def validate_inputs(query, key, value, bias, *, scale, logits_soft_cap):
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_float_array(name, x)
    b, t, n, h = query.shape
    bk, s, k, hk = key.shape
    # Zero-size dims used to fail deep inside (numpy "zero-size array to reduction",
    # ZeroDivisionError from 1/sqrt(H)) and would give kernels an empty grid.
    for name, x in (("query", query), ("key", key), ("value", value)):
        if 0 in x.shape:
            raise _shape_error(f"{name} shape", "every dimension >= 1", tuple(x.shape),
                               "Skip the call for empty sequences (there is nothing to attend to).")
    if value.shape != key.shape:
        raise _shape_error("value shape", f"the key's shape {tuple(key.shape)}", tuple(value.shape),
                           "key and value must be [B, S, K, H] with the same S, K and H.")
    if bk != b:
        raise _shape_error("key batch size", f"query's batch size {b}", bk, "Give query and key the same B.")
    if hk != h:
        raise _shape_error("key head dim", f"query's head dim {h}", hk, "Project q and k to the same head dim H.")
    if k == 0 or n % k:
        raise _shape_error("head counts", "query heads N a multiple of key/value heads K (GQA/MQA)",
                           f"N={n}, K={k}", "Use K dividing N, e.g. K=1 (MQA) or K=N (MHA).")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"dtypes: expected query, key and value of one dtype, got {query.dtype}, "
                         f"{key.dtype}, {value.dtype}. Cast them to one dtype first.")
    if bias is not None:
        if not hasattr(bias, "shape") or bias.ndim > 4 or not jnp.issubdtype(bias.dtype, jnp.floating):
            raise _shape_error("bias", "a float array broadcastable to [B, N, T, S]",
                               f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}",
                               "Pass additive logits, e.g. shape [B, N, T, S] or [T, S].")
        full = (1,) * (4 - bias.ndim) + tuple(bias.shape)
        if any(d not in (1, want) for d, want in zip(full, (b, n, t, s))):
            raise _shape_error("bias shape", f"broadcastable to [B, N, T, S] = [{b}, {n}, {t}, {s}]",
                               tuple(bias.shape), "Use size-1 dims to broadcast.")
    check_scale_and_cap(scale, logits_soft_cap)


def check_scale_and_cap(scale, logits_soft_cap):
    """scale: None or a finite number; logits_soft_cap: None or a positive finite number."""
    if scale is not None and (not isinstance(scale, (int, float, np.floating, np.integer))
                              or isinstance(scale, bool) or not math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite Python float or None, got {scale!r}. "
                         "Leave it None for 1/sqrt(head_dim).")
    # Finite too: c = inf would compute inf * tanh(x / inf) = inf * 0 = NaN.
    if logits_soft_cap is not None and (isinstance(logits_soft_cap, bool)
                                        or not isinstance(logits_soft_cap, (int, float, np.floating, np.integer))
                                        or not 0 < logits_soft_cap < math.inf):
        raise ValueError(f"logits_soft_cap: expected a positive finite float or None, got {logits_soft_cap!r}. "
                         "Typical values are 30.0 or 50.0; pass None for no cap.")


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          local_window_size=None, logits_soft_cap=None, implementation=None,
                          return_residuals=False):
    """Scaled dot-product attention, exact, with any mask; BTNH layout.

    Args:
      query: [B, T, N, H]. key, value: [B, S, K, H] with N a multiple of K.
      bias: optional additive logits broadcastable to [B, N, T, S].
      mask: None, a bool array broadcastable to [B, N, T, S] (True = attend), or a
        `jaxattn.masks.Mask`. `is_causal` (j <= i) and `local_window_size`
        (int w or (left, right): i - left <= j <= i + right) are AND-ed in.
      scale: multiplies q·k; defaults to 1/sqrt(H).
      logits_soft_cap: c > 0 maps logits to c·tanh(logits / c).
      implementation: None (best available), "reference", "xla", "cudnn", or a kernel
        backend's name such as "pallas_triton" (see `available_implementations()`).
      return_residuals: also return lse [B, N, T] (natural log; float32, or float64 for
        float64 inputs so gradient checks stay exact; -inf on rows with no allowed key).

    A query row that may attend to no key returns zeros (and zero gradients).
    """
    available = available_implementations()
    if implementation is not None and implementation not in available:
        raise ValueError(f"implementation: expected None or one of {sorted(available)}, "
                         f"got {implementation!r}. Leave it None to pick the best available.")
    validate_inputs(query, key, value, bias, scale=scale, logits_soft_cap=logits_soft_cap)
    if mask is not None and not isinstance(mask, Mask):
        if not hasattr(mask, "dtype"):
            raise ValueError(f"mask: expected None, a bool array or a jaxattn.masks.Mask, got "
                             f"{type(mask).__name__}. Build one with jaxattn.masks.")
    if not isinstance(return_residuals, (bool, np.bool_)):
        raise ValueError(f"return_residuals: expected a bool, got {return_residuals!r}. "
                         "Pass True to also get the lse [B, N, T].")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal: expected a bool, got {is_causal!r}. Pass True or False "
                         "(a custom mask goes in `mask=`).")
    b, t, n, h = query.shape
    s = key.shape[1]
    canonical = canonical_mask(mask, is_causal=bool(is_causal), local_window_size=local_window_size)
    canonical.validate(t, s, b, n)
    scale = float(1.0 / math.sqrt(h)) if scale is None else float(scale)
    cap = None if logits_soft_cap is None else float(logits_soft_cap)
    # Strided patterns run in residue order, part by part, when that visits fewer tiles.
    planned = run_planned(query, key, value, bias, canonical, implementation=implementation, scale=scale,
                          logits_soft_cap=cap, return_residuals=bool(return_residuals),
                          attend_fn=dot_product_attention)
    if planned is not None:
        return planned

    order = ((implementation,) if implementation is not None
             else implementations.default_order(canonical, query.dtype, cap))
    reasons = []
    for name in order:
        try:
            fn = implementations.get_implementation(name)
            return fn(query, key, value, bias, canonical, scale=scale, logits_soft_cap=cap,
                      return_residuals=bool(return_residuals))
        except NotImplementedError as e:
            if implementation is not None:
                raise
            reasons.append(f"{name}: {e}")
    raise NotImplementedError("no implementation could serve this request: " + "; ".join(reasons))
