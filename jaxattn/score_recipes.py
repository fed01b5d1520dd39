"""Ready-made score functions: ALiBi, T5 relative-position buckets, soft capping.

Each returns a `jaxattn.ScoreMod` for `dot_product_attention(..., score_mod=...)`. The
functions inside are small frozen dataclasses, equal when their parameters are equal, so
two calls with the same parameters share one jit cache entry. With s the scaled logit of
query head n, row i and column j:

| recipe | score |
|---|---|
| `alibi(slopes)` | s + slopes[n] · (j − i)  (≤ 0 under a causal mask) |
| `alibi(slopes, symmetric=True)` | s − slopes[n] · abs(i − j) |
| `relative_position_buckets(table)` | s + table[n, bucket(j − i)]  (T5's bucketing) |
| `soft_cap(c)` | c · tanh(s / c)  (what `logits_soft_cap=c` computes) |
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jaxattn.score_mod import ScoreMod

__all__ = ["alibi", "alibi_slopes", "relative_position_buckets", "relative_position_bucket",
           "soft_cap"]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The fixed ALiBi slopes of Press et al. (2022): a geometric sequence starting at
    2^(−8/n) for the largest power of two n ≤ num_heads, interleaved with the next
    power's odd terms for the remaining heads. float32 [num_heads]."""
    if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"alibi_slopes: expected num_heads >= 1, got {num_heads!r}.")
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    if n < num_heads:
        extra = [2.0 ** (-4.0 * (i + 1) / n) for i in range(2 * n)][0::2]
        slopes += extra[:num_heads - n]
    return np.asarray(slopes, np.float32)


@dataclasses.dataclass(frozen=True)
class _Alibi:
    symmetric: bool

    def __call__(self, score, batch, head, q_pos, kv_pos, slopes):
        distance = (kv_pos - q_pos).astype(score.dtype)
        if self.symmetric:
            distance = -jnp.abs(distance)
        return score + slopes[head].astype(score.dtype) * distance


def alibi(slopes, *, symmetric: bool = False) -> ScoreMod:
    """ALiBi: s + slopes[n] · (j − i), or s − slopes[n] · |i − j| with symmetric=True.
    slopes: float [N] (learnable: the kernels compute its gradient); `alibi_slopes(N)`
    gives the paper's fixed ones."""
    slopes = jnp.asarray(slopes) if not hasattr(slopes, "dtype") else slopes
    if slopes.ndim != 1 or not jnp.issubdtype(slopes.dtype, jnp.floating):
        raise ValueError(f"alibi: expected float slopes of shape [N] (one per query head), got "
                         f"{slopes.dtype} {tuple(slopes.shape)}. See jaxattn.score_recipes.alibi_slopes.")
    return ScoreMod(_Alibi(bool(symmetric)), slopes)


def relative_position_bucket(relative_position, *, num_buckets: int, max_distance: int,
                             bidirectional: bool = True):
    """T5's bucket of relative_position = j − i (int array): exact buckets for small
    distances, logarithmic ones up to max_distance, the last bucket beyond; with
    bidirectional, half the buckets for keys after the query. int32, same shape."""
    rel = jnp.asarray(relative_position).astype(jnp.int32)
    n = -rel
    bucket = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    # log(1) = 0 for the small distances (selected away below), never log(0).
    ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(n < max_exact, n, large)


@dataclasses.dataclass(frozen=True)
class _RelativeBuckets:
    num_buckets: int
    max_distance: int
    bidirectional: bool

    def __call__(self, score, batch, head, q_pos, kv_pos, table):
        bucket = relative_position_bucket(kv_pos - q_pos, num_buckets=self.num_buckets,
                                          max_distance=self.max_distance,
                                          bidirectional=self.bidirectional)
        return score + table[head, bucket].astype(score.dtype)


def relative_position_buckets(table, *, max_distance: int = 128,
                              bidirectional: bool = True) -> ScoreMod:
    """T5 relative position bias: s + table[n, bucket(j − i)], table float [N, num_buckets]
    (`relative_position_bucket` defines the buckets). The Pallas kernels read the table
    with a gather load; they do not differentiate it (a table read at a tile of indices):
    to learn it, pass the bias table[:, bucket] as `bias=` instead."""
    table = jnp.asarray(table) if not hasattr(table, "dtype") else table
    if table.ndim != 2 or not jnp.issubdtype(table.dtype, jnp.floating):
        raise ValueError(f"relative_position_buckets: expected a float table [N, num_buckets], got "
                         f"{table.dtype} {tuple(table.shape)}.")
    num_buckets = int(table.shape[1])
    least = 4 if bidirectional else 2
    if num_buckets < least or max_distance <= num_buckets // (4 if bidirectional else 2):
        raise ValueError(f"relative_position_buckets: expected num_buckets >= {least} and max_distance "
                         f"> its exact range, got num_buckets={num_buckets}, max_distance={max_distance}. "
                         "T5 uses 32 buckets and max_distance 128.")
    return ScoreMod(_RelativeBuckets(num_buckets, int(max_distance), bool(bidirectional)), table)


@dataclasses.dataclass(frozen=True)
class _SoftCap:
    cap: float

    def __call__(self, score, batch, head, q_pos, kv_pos):
        return self.cap * jnp.tanh(score * (1.0 / self.cap))


def soft_cap(cap: float) -> ScoreMod:
    """c · tanh(s / c): the same as `logits_soft_cap=c` (within float rounding)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float, np.floating, np.integer)) \
            or not 0 < cap < math.inf:
        raise ValueError(f"soft_cap: expected a positive finite float, got {cap!r}.")
    return ScoreMod(_SoftCap(float(cap)))
