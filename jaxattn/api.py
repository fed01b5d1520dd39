"""jaxattn.dot_product_attention: validate → canonical Mask → pick implementation → call.

Shape legend: query [B, T, N, H], key/value [B, S, K, H], N a multiple of K (GQA/MQA),
bias broadcastable to [B, N, T, S], output [B, T, N, H] in the query's dtype,
lse float32 [B, N, T] (natural log). Unbatched [T, N, H] / [S, K, H] inputs (what
jax.vmap over the batch hands in) are one batch row.

Dispatch rule: ValueError means the input is wrong and is raised at once;
NotImplementedError means "this implementation cannot serve this valid request" and
`implementation=None` moves on to the next one, always ending at the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import acc_dtype
from pallas_kernels.registry import backend_names
from jaxattn import implementations
from jaxattn.implementations import available_implementations
from jaxattn.masks import LengthMask, Mask, canonical_mask
from jaxattn.masks.data import non_boolean_mask_error
from jaxattn.planned import run_planned
from jaxattn.reference import reference_attention, reference_attention_weights
from jaxattn.score_mod import as_score_mod
from jaxattn.sinks import add_sinks, check_sinks

__all__ = ["dot_product_attention", "available_implementations", "validate_inputs", "attention_weights"]

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


def validate_inputs(query, key, value, bias, *, scale=None, logits_soft_cap=None,
                    allow_empty=False, allow_array_scale=False):
    """ValueError for malformed 4-D inputs (every check that needs no implementation).
    `allow_empty`: B, T or S may be 0; `allow_array_scale`: scale may be a scalar array
    (dot_product_attention serves both; ring attention neither)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name}: expected an array, got {type(x).__name__}. Pass a jax or numpy array.")
    ranks = {x.ndim for x in (query, key, value)}
    if ranks != {4}:
        name, x = next((n, x) for n, x in (("query", query), ("key", key), ("value", value)) if x.ndim != 4)
        raise _shape_error(f"{name} rank", "4 dims in BTNH layout ([batch, length, heads, head_dim]), or "
                           "3 for one unbatched example, the same for query, key and value (same rank)",
                           f"shape {tuple(x.shape)}",
                           "Add the missing axes, e.g. x[None] for batch or x[:, :, None] for one head.")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
            raise ValueError(f"{name}: expected a floating dtype (bfloat16, float16, float32, float64), "
                             f"got {x.dtype}. Cast with x.astype(jnp.bfloat16).")
    b, t, n, h = query.shape
    bk, s, k, hk = key.shape
    # Empty batches and sequences give dot_product_attention an empty result (as in
    # jax.nn); heads and the head dim must exist.
    for name, x in (("query", query), ("key", key), ("value", value)):
        if 0 in x.shape[2:]:
            raise _shape_error(f"{name} shape", "heads and head_dim >= 1", tuple(x.shape),
                               "Only the batch and sequence lengths may be 0.")
        if 0 in x.shape and not allow_empty:
            raise _shape_error(f"{name} shape", "every dimension >= 1", tuple(x.shape),
                               "Skip the call for empty sequences (there is nothing to attend to).")
    if value.shape != key.shape:
        raise _shape_error("value shape", f"the key's shape {tuple(key.shape)}", tuple(value.shape),
                           "key and value must be [B, S, K, H] with the same S (key and value lengths "
                           "must match), K and H.")
    if bk != b:
        raise _shape_error("key batch size", f"query's batch size {b}", bk,
                           "Give query and key the same B (batch dims must match).")
    if hk != h:
        raise _shape_error("key head dim", f"query's head dim {h}", hk,
                           "Project q and k to the same head dim H (query and key depths must match).")
    if n % k:
        raise ValueError(f"head counts: query heads N must be a multiple of key/value heads K (GQA/MQA), "
                         f"got N={n}, K={k}. Use K dividing N, e.g. K=1 (MQA) or K=N (MHA).")
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
    _check_scale(scale, allow_array_scale)
    _check_cap(logits_soft_cap)


def check_scale_and_cap(scale, logits_soft_cap):
    """scale: None or a finite number; logits_soft_cap: None or a positive finite number."""
    _check_scale(scale, allow_array=False)
    _check_cap(logits_soft_cap)


def _check_cap(logits_soft_cap):
    # Finite too: c = inf would compute inf * tanh(x / inf) = inf * 0 = NaN.
    if logits_soft_cap is not None and (isinstance(logits_soft_cap, bool)
                                        or not isinstance(logits_soft_cap, (int, float, np.floating, np.integer))
                                        or not 0 < logits_soft_cap < math.inf):
        raise ValueError(f"logits_soft_cap: expected a positive finite float or None, got {logits_soft_cap!r}. "
                         "Typical values are 30.0 or 50.0; pass None for no cap.")


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_scale(scale, allow_array: bool):
    """None, a finite real number, or (allow_array) a real scalar array, traced or not."""
    if scale is None:
        return
    ok = not isinstance(scale, bool) and (
        isinstance(scale, (int, float, np.floating, np.integer))
        or (allow_array and hasattr(scale, "dtype") and jnp.ndim(scale) == 0
            and (jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer))))
    if ok and not _is_traced(scale):
        ok = math.isfinite(float(scale))
    if not ok:
        raise ValueError(f"scale: expected a finite float, a scalar array (traced under jit is fine) or "
                         f"None, got {scale!r}. Leave it None for 1/sqrt(head_dim).")


def _implementation_names(implementation) -> tuple[str, ...] | None:
    """None, or the names to try in order (one string, or a sequence of them)."""
    if implementation is None:
        return None
    names = (implementation,) if isinstance(implementation, str) else implementation
    try:
        names = tuple(names)
    except TypeError:
        names = (implementation,)
    available = available_implementations()
    bad = [x for x in names if not isinstance(x, str) or x not in available]
    if bad or not names:
        raise ValueError(f"implementation: expected None, one of {sorted(available)} or a sequence "
                         f"of them tried in order, got {implementation!r}. Leave it None to pick the best "
                         "available.")
    return names


def _is_default_precision(precision) -> bool:
    if precision is None:
        return True
    if isinstance(precision, (tuple, list)):
        return all(_is_default_precision(p) for p in precision)
    return precision in (jax.lax.Precision.DEFAULT, "default", "DEFAULT", "bfloat16", "fastest")


def _canonical_precision(precision):
    """None, a jax.lax.Precision (or its name), a pair of them, or a DotAlgorithmPreset:
    hashable, as the reference's jit wants it."""
    if precision is None or isinstance(precision, (jax.lax.Precision, jax.lax.DotAlgorithmPreset)):
        return precision
    if isinstance(precision, str):
        try:
            return jax.lax.Precision(precision)
        except (ValueError, KeyError):
            pass
    elif isinstance(precision, (tuple, list)) and len(precision) == 2:
        return tuple(_canonical_precision(p) for p in precision)
    raise ValueError(f"precision: expected None, a jax.lax.Precision (DEFAULT, HIGH, HIGHEST, or its "
                     f"name), a pair of them or a jax.lax.DotAlgorithmPreset, got {precision!r}. "
                     "Leave it None for the default.")


def _check_seq_lengths(name, lengths, batch):
    if lengths is None:
        return None
    if not hasattr(lengths, "dtype"):
        lengths = np.asarray(lengths)
    if jnp.ndim(lengths) != 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an int32 array of shape [B] = [{batch}], got "
                         f"{lengths.dtype} {tuple(jnp.shape(lengths))}. One length per batch row.")
    if jnp.shape(lengths)[0] != batch:
        raise ValueError(f"{name}: expected shape [B] = [{batch}], got {tuple(jnp.shape(lengths))}. "
                         "One length per batch row.")
    return lengths


def _check_dropout(dropout_rate, dropout_seed):
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float, np.floating, np.integer)) \
            or not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be in the range [0, 1), got {dropout_rate!r}. "
                         "Pass 0.0 for no attention dropout.")
    if dropout_rate and dropout_seed is None:
        raise ValueError("dropout_seed: expected a uint32 seed for attention dropout (dropout_rate > 0), "
                         "got None. Pass e.g. jax.random.bits(rng, dtype=jnp.uint32).")


def _decline_reason(name: str, query, *, precision, dropout_rate) -> str | None:
    """Why `name` cannot serve a request the reference can (None: it can try)."""
    if name == "reference":
        return None
    if dropout_rate and name not in backend_names():
        # Each kernel backend's supports() says itself whether it computes dropout.
        return ("jax.nn.dot_product_attention has no attention dropout; the reference and the "
                "Pallas Triton kernels ('pallas_triton') compute it")
    if (not _is_default_precision(precision) and query.dtype in (jnp.float32, jnp.float64)
            and jax.default_backend() == "gpu"):
        # 16-bit inputs: nothing to honour (products are exact in float32). On the CPU the
        # kernels (interpret mode) and XLA compute float32 dots exactly; on a GPU they run
        # as TF32.
        return (f"precision={precision!r} for {query.dtype} inputs: its float32 dots run as TF32 on "
                "a GPU; the reference honours it")
    return None


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, logits_soft_cap=None, precision=None,
                          dropout_rate=0.0, dropout_seed=None, broadcast_dropout=False,
                          score_mod=None, sinks=None, implementation=None, return_residuals=False):
    """Scaled dot-product attention, exact, with any mask; BTNH layout.

    Args:
      query: [B, T, N, H]. key, value: [B, S, K, H] with N a multiple of K. Unbatched
        [T, N, H] and [S, K, H] (e.g. under jax.vmap) are one batch row.
      bias: optional additive logits broadcastable to [B, N, T, S].
      mask: None, a bool array broadcastable to [B, N, T, S] (True = attend), or a
        `jaxattn.masks.Mask`. A float mask is refused: an additive mask goes in `bias`.
        `is_causal` (j <= i) and `local_window_size` (int w or (left, right):
        i - left <= j <= i + right) are AND-ed in.
      scale: multiplies q·k; defaults to 1/sqrt(H). A Python float, or a scalar array
        (traced under jit is fine: the kernels then get q·scale and scale 1.0).
      query_seq_lengths, key_value_seq_lengths: int [B] (traced is fine): row i of batch b
        is real when i < query_seq_lengths[b], key j when j < key_value_seq_lengths[b]
        (`masks.LengthMask`, whose padded tiles the kernels skip). Padded query rows
        return 0, as in jax.nn.
      logits_soft_cap: c > 0 maps logits to c·tanh(logits / c).
      score_mod: None, a `jaxattn.ScoreMod(fn, *operands)` or a plain callable
        fn(score, batch, head, q_pos, kv_pos) -> score, applied element-wise after the
        scale, the bias and the soft cap and before the mask (`jaxattn.score_mod`). Served
        by the reference and the Triton kernels; the others decline it.
      sinks: None or a float array [N]: one learned logit per query head added to every
        row's softmax with a zero value vector (`jaxattn.sinks`); differentiable. With
        return_residuals the lse includes the sink. "xla" and "cudnn" decline it (jax.nn's
        lse has no gradient).
      precision: matmul precision (jax.lax.Precision, a pair, or a DotAlgorithmPreset).
        The reference passes it to both matmuls; kernels and XLA accept it as a no-op for
        16-bit inputs and on the CPU (exact float32 dots) and decline float32 on a GPU.
      dropout_rate, dropout_seed, broadcast_dropout: attention dropout with a uint32 seed
        (traced is fine; `jaxattn.dropout` defines the keep-mask, a hash of (seed, batch,
        head, i, j); broadcast: one [T, S] mask for every batch row and head). The lse is
        that of the attention before dropout. Computed by the reference and the Triton
        kernels, which regenerate the same mask tile by tile in the forward and backward
        (same seed, same result as the reference); the Mosaic GPU kernels and jax.nn's
        "xla"/"cudnn" decline it.
      implementation: None (best available), a name ("reference", "xla", "cudnn",
        "pallas_triton", "pallas_mosaic_gpu"), or a sequence of names tried in order.
      return_residuals: also return lse [B, N, T] (natural log; float32, or float64 for
        float64 inputs so gradient checks stay exact; -inf on rows with no allowed key).
        Unlike jax.nn (whose residual is [B, T, N] and carries no gradient) the lse is
        [B, N, T] and differentiable: ring attention merges partial results through it.

    A query row that may attend to no key returns zeros (and zero gradients). T = 0 or
    S = 0 gives an empty result / zeros, as jax.nn does.
    """
    names = _implementation_names(implementation)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name}: expected an array, got {type(x).__name__}. Pass a jax or numpy array.")
    if query.ndim == key.ndim == value.ndim == 3:  # one unbatched example (e.g. under jax.vmap)
        out = dot_product_attention(
            query[None], key[None], value[None], bias, mask, scale=scale, is_causal=is_causal,
            query_seq_lengths=_one_row(query_seq_lengths),
            key_value_seq_lengths=_one_row(key_value_seq_lengths),
            local_window_size=local_window_size, logits_soft_cap=logits_soft_cap, precision=precision,
            dropout_rate=dropout_rate, dropout_seed=dropout_seed, broadcast_dropout=broadcast_dropout,
            score_mod=score_mod, sinks=sinks, implementation=implementation,
            return_residuals=return_residuals)
        return (out[0][0], out[1][0]) if return_residuals else out[0]
    validate_inputs(query, key, value, bias, scale=scale, logits_soft_cap=logits_soft_cap,
                    allow_empty=True, allow_array_scale=True)
    if mask is not None and not isinstance(mask, Mask):
        if not hasattr(mask, "dtype"):
            raise ValueError(f"mask: expected None, a bool array or a jaxattn.masks.Mask, got "
                             f"{type(mask).__name__}. Build one with jaxattn.masks.")
        if mask.dtype != bool:
            raise non_boolean_mask_error("mask", mask.dtype)
    if not isinstance(return_residuals, (bool, np.bool_)):
        raise ValueError(f"return_residuals: expected a bool, got {return_residuals!r}. "
                         "Pass True to also get the lse [B, N, T].")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal: expected a bool, got {is_causal!r}. Pass True or False "
                         "(a custom mask goes in `mask=`).")
    precision = _canonical_precision(precision)
    _check_dropout(dropout_rate, dropout_seed)
    b, t, n, h = query.shape
    s = key.shape[1]
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod.check(acc_dtype(query.dtype))
    sinks = check_sinks(sinks, n)
    if sinks is not None:   # attention without sinks, rescaled through its lse (jaxattn.sinks)
        out, lse = dot_product_attention(
            query, key, value, bias, mask, scale=scale, is_causal=is_causal,
            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size, logits_soft_cap=logits_soft_cap, precision=precision,
            dropout_rate=dropout_rate, dropout_seed=dropout_seed, broadcast_dropout=broadcast_dropout,
            score_mod=score_mod, implementation=_with_differentiable_lse(names),
            return_residuals=True)
        out, lse = add_sinks(out, lse, sinks)
        return (out, lse) if return_residuals else out
    q_lengths = _check_seq_lengths("query_seq_lengths", query_seq_lengths, b)
    kv_lengths = _check_seq_lengths("key_value_seq_lengths", key_value_seq_lengths, b)
    canonical = canonical_mask(mask, is_causal=bool(is_causal), local_window_size=local_window_size)
    canonical.validate(t, s, b, n)
    if 0 in (b, t, s):
        return _empty_result(query, s, return_residuals)
    if q_lengths is not None or kv_lengths is not None:
        canonical = canonical & LengthMask(q_lengths, kv_lengths, q_len=t, kv_len=s)
    traced_scale = scale if scale is not None and _is_traced(scale) else None
    scale = float(1.0 / math.sqrt(h)) if scale is None else scale if traced_scale is not None else float(scale)
    cap = None if logits_soft_cap is None else float(logits_soft_cap)
    dropout_rate = float(dropout_rate)
    # Strided patterns run in residue order, part by part, when that visits fewer tiles
    # (a call the plan does not cover — dropout, a non-default precision, several
    # implementations to try, a score_mod, which sees the original positions — takes the
    # plain tile walk).
    if (dropout_rate == 0.0 and _is_default_precision(precision) and (names is None or len(names) == 1)
            and score_mod is None):
        planned = run_planned(query, key, value, bias, canonical,
                              implementation=None if names is None else names[0], scale=scale,
                              logits_soft_cap=cap, return_residuals=bool(return_residuals),
                              attend_fn=dot_product_attention)
        if planned is not None:
            return planned

    order = (names if names is not None
             else implementations.default_order(canonical, query.dtype, cap, query.shape[-1],
                                                has_bias=bias is not None, q_len=query.shape[1],
                                                kv_len=key.shape[1]))
    reasons = []
    for name in order:
        try:
            reason = _decline_reason(name, query, precision=precision, dropout_rate=dropout_rate)
            if reason is not None:
                raise NotImplementedError(reason)
            if name == "reference":  # the one implementation taking every argument
                return reference_attention(query, key, value, bias, canonical, scale=scale,
                                           logits_soft_cap=cap, return_residuals=bool(return_residuals),
                                           precision=precision, dropout_rate=dropout_rate,
                                           dropout_seed=dropout_seed,
                                           broadcast_dropout=bool(broadcast_dropout),
                                           score_mod=score_mod)
            q, static_scale = query, scale
            if traced_scale is not None:
                # The kernels take the scale as a static float: fold a traced one into q.
                ct = acc_dtype(query.dtype)
                q, static_scale = (query.astype(ct) * traced_scale.astype(ct)).astype(query.dtype), 1.0
            fn = implementations.get_implementation(name)
            dropout = (dict(dropout_rate=dropout_rate, dropout_seed=dropout_seed,
                            broadcast_dropout=bool(broadcast_dropout)) if dropout_rate else {})
            extra = {} if score_mod is None else {"score_mod": score_mod}
            return fn(q, key, value, bias, canonical, scale=static_scale, logits_soft_cap=cap,
                      return_residuals=bool(return_residuals), **dropout, **extra)
        except NotImplementedError as e:
            if names is not None and len(names) == 1:
                raise
            reasons.append(f"{name}: {e}")
    raise NotImplementedError("no implementation could serve this request: " + "; ".join(reasons))


def _with_differentiable_lse(names):
    """The implementations to try for attention whose lse is differentiated (sinks):
    those of `names` (all by default) whose lse carries a gradient."""
    candidates = names if names is not None else implementations.default_order()
    kept = tuple(x for x in candidates if x not in implementations.LSE_WITHOUT_GRADIENT)
    if not kept:
        raise NotImplementedError(f"sinks: {', '.join(candidates)} cannot serve them (jax.nn's lse "
                                  "carries no gradient); use implementation=None, 'reference' or a "
                                  "Pallas kernel")
    return kept


def _one_row(lengths):
    """Sequence lengths of one unbatched example: a scalar becomes [1]."""
    if lengths is not None and jnp.ndim(lengths) == 0:
        return jnp.reshape(lengths, (1,))
    return lengths


def _empty_result(query, kv_len, return_residuals):
    """T = 0 or S = 0: zeros of the output's shape (rows with no key give 0), lse -inf."""
    b, t, n, _ = query.shape
    out = jnp.zeros(query.shape, query.dtype)
    if not return_residuals:
        return out
    lse_dtype = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
    return out, jnp.full((b, n, t), -jnp.inf, lse_dtype)


def attention_weights(query, key, bias=None, mask=None, *, scale=None, is_causal=False,
                      local_window_size=None, logits_soft_cap=None, precision=None,
                      score_mod=None, sinks=None):
    """The attention probabilities [B, N, T, S] that `dot_product_attention` applies to the
    values (float32; float64 for float64 inputs; rows with no allowed key are zeros; with
    sinks, a row sums to 1 minus the sink's share).
    O(T·S) memory: computed by the reference, for inspection and debugging."""
    validate_inputs(query, key, key, bias, scale=scale, logits_soft_cap=logits_soft_cap,
                    allow_array_scale=True)
    if mask is not None and not isinstance(mask, Mask) and getattr(mask, "dtype", None) != bool:
        raise non_boolean_mask_error("mask", getattr(mask, "dtype", type(mask).__name__))
    b, t, n, h = query.shape
    canonical = canonical_mask(mask, is_causal=bool(is_causal), local_window_size=local_window_size)
    canonical.validate(t, key.shape[1], b, n)
    if scale is None:
        scale = float(1.0 / math.sqrt(h))
    elif not _is_traced(scale):
        scale = float(scale)
    score_mod = as_score_mod(score_mod)
    sinks = check_sinks(sinks, n)
    cap = None if logits_soft_cap is None else float(logits_soft_cap)
    precision = _canonical_precision(precision)
    weights = reference_attention_weights(query, key, bias, canonical, scale=scale, logits_soft_cap=cap,
                                          precision=precision, score_mod=score_mod)
    if sinks is None:
        return weights
    # The sink's share of each row: weights · exp(lse − logaddexp(lse, sink)).
    _, lse = reference_attention(query, key, key, bias, canonical, scale=scale, logits_soft_cap=cap,
                                 precision=precision, score_mod=score_mod, return_residuals=True)
    ones = jnp.ones((b, t, n, 1), weights.dtype)
    share, _ = add_sinks(ones, lse, sinks)                                   # [B, T, N, 1]
    return weights * jnp.transpose(share, (0, 2, 1, 3))
