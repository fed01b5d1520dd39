"""The implementations `dot_product_attention(..., implementation=name)` can call.

Built in: "reference" (the jnp oracle), "xla" and "cudnn" (`jax.nn.dot_product_attention`,
the baselines we measure against), and one implementation per kernel backend of
pallas_kernels/registry.py ("pallas_triton", ...), registered from that registry, so a
new kernel backend needs no line here.

Every implementation is fn(query, key, value, bias, mask, *, scale, logits_soft_cap,
return_residuals) on validated inputs with a canonical Mask; the kernel backends also take
dropout_rate, dropout_seed and broadcast_dropout (jaxattn.api passes them only when
dropout_rate > 0, and only to those), and `score_mod=` (a jaxattn.ScoreMod) goes to those
that serve score functions (passed only when given). It raises ValueError for bad input and
NotImplementedError for a valid request it cannot serve, which makes
`implementation=None` move on to the next name of `default_order()`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.registry import backend_names
from jaxattn.flash import pallas_attention
from jaxattn.forward_split import mosaic_forward_cudnn_training
from jaxattn.jax_nn import cudnn_reason, jax_nn_attention, jax_nn_mask_arguments
from jaxattn.masks import Mask
from jaxattn.reference import reference_attention

_IMPLEMENTATIONS: dict[str, Callable] = {}

# Implementations whose lse (return_residuals=True) carries no gradient: jax.nn's. The
# sinks of dot_product_attention are applied through a differentiated lse, so these
# cannot serve them.
LSE_WITHOUT_GRADIENT = frozenset({"xla", "cudnn"})


def register_implementation(name: str, fn: Callable) -> None:
    """Make `fn` callable as dot_product_attention(..., implementation=name)."""
    _IMPLEMENTATIONS[name] = fn


def available_implementations() -> tuple[str, ...]:
    """Names `implementation=` accepts in this installation."""
    return tuple(_IMPLEMENTATIONS)


def get_implementation(name: str) -> Callable:
    return _IMPLEMENTATIONS[name]


def default_order(mask: Mask | None = None, dtype=None, logits_soft_cap=None,
                  head_dim: int | None = None, has_bias: bool = False,
                  q_len: int | None = None, kv_len: int | None = None) -> tuple[str, ...]:
    """Implementations tried by implementation=None, best first, for this platform and
    (when given) this request.

    On a GPU: the kernel backends in the registry's preference order, then cuDNN, which
    serves in O(T) memory what they decline, then the O(T·S) reference. Except for a mask
    `jax.nn.dot_product_attention` expresses natively (full, causal, sliding window) on
    16-bit inputs without a soft cap or bias, where the default must never be slower
    than jax.nn, so the Hopper kernels come first only where they were measured ahead
    (BENCHMARKS.md, "What implementation=None runs"; one H200, bf16, beside cuDNN in one
    process, TFLOP/s forward / forward+backward), i.e. at head dim 128 (the kernels run
    65–127 as 128, cuDNN the head dim itself: a padded head dim costs 1.07–1.97× the work)
    and from MIN_QUERIES queries (the shortest measured; a decoding step's few were not):
    Figures from the twelfth run of 2026-11-30 unless dated otherwise:
    - causal windows of at most WINDOW keys back go to the Hopper kernels: at 32k, 256
      keys 162 / 171 against cuDNN's 115 / 128, 2048 keys 451 / 414 against 379 / 417
      (level in training: 440 against 436 back to back; 512 and 1024 keys 18–28 % ahead
      in the forward, before the persistent backward);
    - so do causal attention (no window) up to CAUSAL_TRAINING_LENGTH tokens and the
      full mask up to FULL_TRAINING_LENGTH, as self-attention (as many queries as keys,
      the shape measured): there the Hopper kernels' training step leads cuDNN's or is
      level with it (benchmarks/crossover_bench.py, 16k tokens per call, 16 heads: causal
      331 / 411 / 462 against 315 / 399 / 451 at 2k / 4k / 8k, and 238 against 207 at 1k
      in the seventh run; full 439 against 415 at 2k and, since the dQ kernel forms D,
      486 against 485 at 4k, level within the rounds' spread and ahead back to back, 513
      against 506; 358 against 330 at 1k in the seventh run), and their forward is
      level within the rounds' spread or ahead;
    - the other causal and full masks (longer, wider windows, more keys than queries
      or fewer) go to mosaic_forward_cudnn_training: the Hopper forward when the value is
      only used, cuDNN's forward and backward when it is differentiated, for cuDNN's
      backward leads from 16k causal and 8k full tokens (causal 16k 471 against 516,
      full 8k 494 against 521, 16k 503 against 542), while the Hopper forward leads on
      causal attention (16k: 530 against 508, 608 against 580 back to back) and is level
      on the full mask (16k: 584 against 602, 636 against 612 back to back);
    - at head dim 256, causal self-attention (no window) of WIDE_SPLIT_LENGTHS tokens goes
      to mosaic_forward_cudnn_training: there the Hopper forward leads cuDNN's (4k: 432
      against 365, 16k: 594 against 503; thirteenth run of 2026-11-30) and cuDNN's
      training step led (310 against 329, 354 against 401) while the Hopper backward
      formed Sᵀ and dPᵀ twice at that head dim; with them shared it leads at 16k (417
      against 394, full 434 against 390), not yet measured at other lengths, so the
      training step stays cuDNN's; the full mask's forward was level (482 against 468,
      611 against 611) and stays with cuDNN;
    - anything else native, and all of these at other head dims or shorter queries, goes
      to cuDNN first.
    Not with a bias: those measurements had none, and with one the Hopper forward hands
    its backward to the Triton kernels (for the bias gradient), a training step not
    compared with cuDNN's. Where the first declines (an unaligned window, a GPU before
    Hopper) cuDNN is next.
    jaxattn's kernels stay bitwise deterministic; cuDNN's backward is not promised to be:
    name a kernel backend to keep that for these masks."""
    if jax.default_backend() != "gpu":
        return ("reference",)
    kernels = tuple(name for name in backend_names() if name in _IMPLEMENTATIONS)
    if mask is not None and _cudnn_native(mask, dtype, logits_soft_cap):
        measured = (HOPPER_KERNELS in kernels and not has_bias and head_dim in MEASURED_HEAD_DIMS
                    and q_len is not None and q_len >= MIN_QUERIES)
        window = _causal_window(mask)
        causal, full = _causal(mask), jax_nn_mask_arguments(mask) == {}
        self_attention = kv_len == q_len
        if measured and ((window is not None and window <= WINDOW)
                         or (self_attention and causal and window is None
                             and q_len <= CAUSAL_TRAINING_LENGTH)
                         or (self_attention and full and q_len <= FULL_TRAINING_LENGTH)):
            rest = tuple(name for name in kernels if name != HOPPER_KERNELS)
            return (HOPPER_KERNELS, "cudnn", *rest, "reference")
        if measured and (causal or full):
            return (FORWARD_SPLIT, "cudnn", *kernels, "reference")
        wide_measured = (HOPPER_KERNELS in kernels and not has_bias and head_dim == WIDE_HEAD_DIM
                         and q_len is not None and WIDE_SPLIT_LENGTHS[0] <= q_len <= WIDE_SPLIT_LENGTHS[1])
        if wide_measured and self_attention and causal and window is None:
            return (FORWARD_SPLIT, "cudnn", *kernels, "reference")
        return ("cudnn", *kernels, "reference")
    return (*kernels, "cudnn", "reference")


# Where the Hopper kernels come first for masks cuDNN runs natively (see default_order):
# causal windows up to WINDOW keys back, causal self-attention up to
# CAUSAL_TRAINING_LENGTH and full self-attention up to FULL_TRAINING_LENGTH tokens, and
# the split for the other causal and full masks, at the measured head dims and query
# lengths.
HOPPER_KERNELS = "pallas_mosaic_gpu"
FORWARD_SPLIT = "mosaic_forward_cudnn_training"
WINDOW = 2048
CAUSAL_TRAINING_LENGTH = 8192
FULL_TRAINING_LENGTH = 4096
MEASURED_HEAD_DIMS = (128,)
MIN_QUERIES = 1024
# Head dim 256: causal self-attention from the first to the last of these lengths (the
# measured ones) takes the split.
WIDE_HEAD_DIM = 256
WIDE_SPLIT_LENGTHS = (4096, 16384)


def _causal(mask: Mask) -> bool:
    """Causal attention, windowed or not, as jax.nn expresses it."""
    kwargs = jax_nn_mask_arguments(mask) or {}
    window = kwargs.get("local_window_size")
    return bool(kwargs.get("is_causal", False)) or (window is not None and window[1] == 0)


def _causal_window(mask: Mask) -> int | None:
    """Keys before the query of a causal window (causal & LocalMask(w, r) keeps no key
    past the query whatever r is), or None for a mask that is not one."""
    kwargs = jax_nn_mask_arguments(mask) or {}
    window = kwargs.get("local_window_size")
    if window is None or not (window[1] == 0 or kwargs.get("is_causal", False)):
        return None
    return window[0]


def _cudnn_native(mask: Mask, dtype, logits_soft_cap) -> bool:
    """cuDNN runs this mask natively (jax_nn.cudnn_reason has no objection to it)."""
    return (logits_soft_cap is None and dtype is not None
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and cudnn_reason(mask) is None)


def _reference(query, key, value, bias, mask, *, scale, logits_soft_cap, return_residuals,
               score_mod=None):
    return reference_attention(query, key, value, bias, mask, scale=scale,
                               logits_soft_cap=logits_soft_cap, return_residuals=return_residuals,
                               score_mod=score_mod)


register_implementation("reference", _reference)
register_implementation("xla", functools.partial(jax_nn_attention, "xla"))
register_implementation("cudnn", functools.partial(jax_nn_attention, "cudnn"))
# The Hopper forward when only the value is used, cuDNN's forward and backward when it is
# differentiated (jaxattn/forward_split.py).
register_implementation("mosaic_forward_cudnn_training", mosaic_forward_cudnn_training)
for _name in backend_names():
    register_implementation(_name, functools.partial(pallas_attention, _name))
