"""The "xla" and "cudnn" implementations: `jax.nn.dot_product_attention`, the
baselines we measure against, held to jaxattn's contract (empty rows give 0, masks
given as jax.nn's structured arguments where it has them)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import acc_dtype
from jaxattn.masks import AndMask, CausalMask, FullMask, LocalMask, Mask
from jaxattn.reference import allowed_pairs


def jax_nn_attention(implementation, query, key, value, bias, mask: Mask, *, scale, logits_soft_cap,
            return_residuals, score_mod=None):
    if score_mod is not None:
        raise NotImplementedError("jax.nn.dot_product_attention has no score_mod")
    if logits_soft_cap is not None:
        raise NotImplementedError("jax.nn.dot_product_attention has no logits_soft_cap")
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise NotImplementedError("cuDNN attention needs a CUDA GPU")
    if implementation == "cudnn" and query.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError("cuDNN attention takes bfloat16/float16 only")
    if implementation == "cudnn" and jax_nn_mask_arguments(mask) is not None and (
            reason := cudnn_reason(mask, query.shape[1], key.shape[1])):
        raise NotImplementedError(reason)
    if implementation == "xla" and jax.default_backend() == "cpu" and query.dtype == jnp.float16:
        raise NotImplementedError("XLA's CPU dot has no float16 x float16 -> float32 mode")
    if implementation == "cudnn":
        try:
            return _jax_nn_jit(query, key, value, bias, mask, implementation=implementation,
                               scale=scale, return_residuals=return_residuals)
        except (ValueError, RuntimeError) as e:
            # jax.nn's cuDNN path rejects shapes/dtypes it has no kernel for; the inputs
            # were already validated, so this is "cannot serve", not "bad input".
            raise NotImplementedError(f"cuDNN cannot serve this call: {e}") from e
    return _jax_nn_jit(query, key, value, bias, mask, implementation=implementation, scale=scale,
                       return_residuals=return_residuals)


@functools.partial(jax.jit, static_argnames=("implementation", "scale", "return_residuals"))
def _jax_nn_jit(query, key, value, bias, mask, *, implementation, scale, return_residuals):
    t, s = query.shape[1], key.shape[1]
    # jax.nn averages all keys for a row with none allowed; our contract is 0 (lse -inf),
    # so rows without a key are found (O(T) for structured masks) and zeroed.
    kwargs = jax_nn_mask_arguments(mask)
    if kwargs is None:  # no structured equivalent: a dense [.., T, S] bool mask
        allowed = allowed_pairs(mask, t, s)
        kwargs = {"mask": allowed}
        row_has_key = jnp.swapaxes(jnp.any(allowed, axis=-1), 1, 2)[..., None]  # [B|1, T, N|1, 1]
    else:
        i = jnp.arange(t)
        lo, hi = jnp.zeros_like(i), jnp.full_like(i, s - 1)
        if "local_window_size" in kwargs:
            left, right = kwargs["local_window_size"]
            lo, hi = jnp.maximum(lo, i - left), jnp.minimum(hi, i + right)
        if kwargs.get("is_causal"):
            hi = jnp.minimum(hi, i)
        row_has_key = (lo <= hi)[None, :, None, None]
    out = jax.nn.dot_product_attention(query, key, value, bias, scale=scale,
                                       implementation=implementation,
                                       return_residual=return_residuals, **kwargs)
    lse = None
    if return_residuals:
        out, lse = out
        lse = jnp.swapaxes(lse, 1, 2).astype(acc_dtype(query.dtype))
    out = jnp.where(row_has_key, out, 0).astype(out.dtype)
    if lse is not None:
        lse = jnp.where(jnp.swapaxes(row_has_key[..., 0], 1, 2), lse, -jnp.inf)
    return (out, lse) if return_residuals else out


def cudnn_reason(mask: Mask, q_len: int | None = None, kv_len: int | None = None) -> str | None:
    """Why cuDNN cannot run `mask` (at these lengths, when given), or None. Checked before
    tracing: cuDNN refuses some of these only when XLA compiles the whole program, too
    late for dispatch to take another implementation; dispatch also reads it (without
    lengths) to put cuDNN first only for masks it runs."""
    kwargs = jax_nn_mask_arguments(mask)
    if kwargs is None:
        return "jax.nn has no structured argument for this mask (cuDNN would need it dense)"
    window = kwargs.get("local_window_size")
    if window is not None and window[1] > 0 and not kwargs.get("is_causal", False):
        return "cuDNN's sliding window reaches no key past the query without a causal mask"
    if window is not None and q_len is not None and kv_len is not None and q_len > kv_len:
        # seen on an H200 (cuDNN via jax 0.11.2): "Sliding window attention is only
        # supported with max_s_q <= max_s_kv", raised at compile time
        return (f"cuDNN's sliding window needs as many keys as queries (got T={q_len} > "
                f"S={kv_len})")
    return None


def jax_nn_mask_arguments(mask: Mask):
    """jax.nn's own structured arguments for full / causal / sliding-window masks (so
    cuDNN and XLA get their fast paths, not an O(T·S) bool mask); None otherwise."""
    parts = mask.parts if isinstance(mask, AndMask) else (mask,)
    kwargs = {}
    for p in parts:
        if isinstance(p, FullMask):
            continue
        if isinstance(p, CausalMask) and p.offset == 0:
            kwargs["is_causal"] = True
        elif isinstance(p, LocalMask) and p.offset == 0 and p.left is None and p.right == 0:
            kwargs["is_causal"] = True             # every key up to the query's own
        elif (isinstance(p, LocalMask) and p.offset == 0 and p.left is not None
              and p.right is not None and "local_window_size" not in kwargs):
            kwargs["local_window_size"] = (p.left, p.right)
            if p.right == 0:
                # The window ends at the query, so it is causal: say so. Given only
                # local_window_size=(w, 0), jax.nn (0.11.2) hands cuDNN a sliding window
                # without its causal mask type, and cuDNN then also attends to every later
                # key (wrong outputs, measured on an H200).
                kwargs["is_causal"] = True
        else:
            return None
    return kwargs
