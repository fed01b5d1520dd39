"""What every kernel backend shares, each rule spelled once.

Numerics (the accumulation dtype, the finite mask value, the base-2 constants), the
padding convention (T and S up to whole tiles, the head dim up to the backend's
`padded_head_dim`, all with zeros), the order in which q-block programs run, how mask
operands and the bias reach the kernels, and how the bias gradient is shaped. The
contract these helpers implement is written down in pallas_kernels/README.md.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# A finite stand-in for -inf inside the online softmax: -inf - (-inf) would be NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)   # exp(x) = exp2(x · log2 e): kernels fold it into the scale
LN2 = math.log(2.0)         # and turn a base-2 lse back into a natural one


def acc_dtype(dtype):
    """Accumulate in float32, or in float64 when the inputs are (gradient checks)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


# ---------------------------------------------------------------------------------
# Padding: kernels see whole tiles; results are sliced back to the unpadded lengths.
# ---------------------------------------------------------------------------------
def pad_to_multiple(n: int, m: int) -> int:
    """n rounded up to a multiple of m (a length padded to whole tiles)."""
    return -(-n // m) * m


def padded_query_len(mask_fn, q_len: int, padded_len: int):
    """T for the PARTIAL tiles' compare q < T, or None where no compare is needed. The
    query tile's padding rows past T must attend nothing, or a key that only they reach
    (causal with T < S: the keys past the last query) would count as attended and its
    K/V rows be multiplied in unzeroed. Only a mask can let them reach such keys: without
    one a PARTIAL tile is a kv-padded tile, whose real keys every real row attends."""
    return q_len if mask_fn is not None and padded_len != q_len else None


def pad_axis(x, axis: int, size: int, value=0):
    """x padded at the end of `axis` to `size` with `value`."""
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def pad_btnh(x, length: int, head_dim: int):
    """A [B, L, heads, H] array zero padded to [B, length, heads, head_dim]. Zero head
    columns leave q·k unchanged; zero key rows are masked out by `kv_pos < kv_len`;
    zero query rows are computed and dropped."""
    return pad_axis(pad_axis(x, 1, length), 3, head_dim)


def reversed_q_block(i, num_q_blocks):
    """The q-block owned by program i of a grid over q-blocks: programs run the q-blocks
    in reverse order, because under causal-like masks the last q-blocks have the most
    kv-blocks, and starting them first shortens the tail of the grid. Works on Python
    ints (BlockSpec index maps) and traced ids (inside a kernel) alike."""
    return num_q_blocks - 1 - i


# ---------------------------------------------------------------------------------
# Inputs the kernels read besides q, k, v.
# ---------------------------------------------------------------------------------
def prepare_operands(operands, kinds, q_len, kv_len, q_pad, kv_pad, tile_q, tile_kv):
    """Mask operands as the kernels read them (operand kinds: pallas_kernels/metadata.py).

    "q" and "kv" ids become int32 padded to (q_pad, kv_pad); a "qkv" array is
    broadcast over its size-1 T/S axes, stored as int8 and padded; a "block" layout is
    kept as int32 when its layout blocks are multiples of the tiles (one scalar per
    tile), and otherwise expanded to a dense "qkv" operand. Padding values never matter:
    the kernels AND the mask with `kv_pos < kv_len`, and padded query rows are dropped.
    Returns [(kind, layout_block, array)], in the order of `operands`.
    """
    prepared = []
    for (kind, layout_block), arr in zip(kinds, operands):
        arr = jnp.asarray(arr)
        if kind == "block":
            lbq, lbk = layout_block
            if lbq % tile_q or lbk % tile_kv:
                arr = jnp.repeat(jnp.repeat(arr, lbq, axis=-2), lbk, axis=-1)
                arr = arr[..., :q_len, :kv_len]   # the "qkv" branch below pads it
                kind, layout_block = "qkv", None
            else:
                arr = arr.astype(jnp.int32)
        if kind == "q":
            arr = pad_axis(arr.astype(jnp.int32), 1, q_pad)
        elif kind == "kv":
            arr = pad_axis(arr.astype(jnp.int32), 1, kv_pad)
        elif kind == "qkv":
            bm, hm = arr.shape[:2]
            arr = jnp.broadcast_to(arr, (bm, hm, q_len, kv_len))  # size-1 T/S dims
            arr = pad_axis(pad_axis(arr.astype(jnp.int8), 2, q_pad), 3, kv_pad)
        prepared.append((kind, layout_block, arr))
    return prepared


def prepare_bias(bias, q_pad, kv_pad, acc):
    """bias [Bb, Hb, T|1, S|1] → the same with its full-length axes zero padded to
    (q_pad, kv_pad). Broadcast axes stay of size 1 (a [1, 1, 1, S] bias is read as one
    row per tile, never materialised as [T, S]); float32 and narrower dtypes are kept
    (added in `acc` inside the kernels), wider ones are cast to `acc`."""
    if bias is None:
        return None
    if jnp.dtype(bias.dtype).itemsize > jnp.dtype(acc).itemsize:
        bias = bias.astype(acc)
    if bias.shape[2] > 1:
        bias = pad_axis(bias, 2, q_pad)
    if bias.shape[3] > 1:
        bias = pad_axis(bias, 3, kv_pad)
    return bias


# ---------------------------------------------------------------------------------
# The bias gradient: dS reduced to the bias's own shape.
# ---------------------------------------------------------------------------------
def dbias_mode(bias_shape) -> str:
    """How the backward makes dbias for a bias [Bb, Hb, T|1, S|1]: the kernels reduce dS
    over what they already loop over.

    "tiles" ([.., T, S]): the dQ kernel writes dS per (b, n) tile;
    "cols"  ([.., 1, S]): the dK/dV kernel sums dS over the query rows;
    "rows"  ([.., T|1, 1]): the dQ kernel sums dS over the key columns.
    """
    t_full, s_full = bias_shape[2] > 1, bias_shape[3] > 1
    if t_full and s_full:
        return "tiles"
    return "cols" if s_full else "rows"


def reduce_dbias(dbias, bias):
    """dS per query head [B, N, T|1, S|1] → the bias's shape and dtype, summing over the
    batch and head axes the bias is broadcast along."""
    sum_axes = tuple(a for a in range(4) if bias.shape[a] == 1 and dbias.shape[a] != 1)
    return jnp.sum(dbias, axis=sum_axes, keepdims=True).astype(bias.dtype)


@dataclasses.dataclass(frozen=True)
class DeltaOfOutput:
    """The backward's D = rowsum(dO ∘ O) − dlse, not yet formed: a backend whose dQ
    kernel reads the O and dO rows of its q-block may form it there (one pass over O and
    dO in memory fewer); every other use calls `delta_array`. `dlse` is the lse's
    cotangent [B, N, T], or None for none."""
    dlse: jax.Array | None = None


def delta_array(delta, out, dout) -> jax.Array:
    """D as an array [B, N, T] in the accumulation dtype: `delta` itself when it is an
    array, else (a DeltaOfOutput) rowsum(dout ∘ out) − dlse of these [B, T, N, H] arrays."""
    if not isinstance(delta, DeltaOfOutput):
        return delta
    acc = acc_dtype(out.dtype)
    d = jnp.einsum("btnh,btnh->bnt", dout.astype(acc), out.astype(acc))
    return d if delta.dlse is None else d - delta.dlse.astype(acc)


def backward_lse(lse):
    """The lse the backward kernels read: +inf instead of -inf on rows with no allowed
    key, so P = exp(S − lse) is exactly 0 there even where S = −inf (a −inf bias)."""
    return jnp.where(jnp.isneginf(lse), jnp.inf, lse)
