"""Mask objects and their algebra.

A Mask says, for query row i and key column j (both 0-based, absolute), whether the
pair may attend. Every mask answers three questions with one definition:

* ``evaluate(q_pos, kv_pos, operand_values)`` — element-wise, broadcasting: the formula
  itself. Used by the reference (on full iotas), by ``to_dense`` and inside kernels
  (on one tile's iotas), so there is exactly one definition of each mask.
* ``tile_state(q_len, kv_len, block_q, block_kv)`` — EMPTY / PARTIAL / FULL per tile,
  computed arithmetically from the mask's parameters (never from a dense T×S matrix
  for structured masks). AND of masks is the element-wise min of states and OR the
  max; both are conservative (a PARTIAL tile may turn out empty, never the reverse).
* ``operands(block_q, block_kv)`` — arrays the kernel must load to evaluate the mask
  (segment ids, a dense mask, a block layout); empty for purely arithmetic masks.

Static masks (no array data, or numpy data) are hashable and can be jit static
arguments. Masks with jax arrays (SegmentMask, DenseMask of a jax array) are "dynamic":
their tile states come from a jittable jnp function instead of numpy.
"""

from __future__ import annotations

import functools
import operator
from typing import Sequence

import numpy as np
import jax
import jax.numpy as jnp

from pallas_kernels.metadata import EMPTY, FULL, PARTIAL, MaskOperand


class Mask:
    """Base class. Subclasses are frozen: never mutate one after construction."""

    #: True when the mask holds jax arrays (its metadata is computed under jit).
    is_dynamic: bool = False

    # -- algebra -----------------------------------------------------------------
    def __and__(self, other: "Mask") -> "Mask":
        return AndMask.of(self, _as_mask(other, "&"))

    def __or__(self, other: "Mask") -> "Mask":
        return OrMask.of(self, _as_mask(other, "|"))

    __rand__ = lambda self, other: AndMask.of(_as_mask(other, "&"), self)  # noqa: E731
    __ror__ = lambda self, other: OrMask.of(_as_mask(other, "|"), self)  # noqa: E731

    def __bool__(self):
        raise TypeError(
            "A Mask has no truth value: combine masks with `&` and `|`, not `and`/`or`, "
            "and test for a mask with `mask is None`."
        )

    # -- the definition ----------------------------------------------------------
    def evaluate(self, q_pos, kv_pos, operand_values: Sequence = ()):
        """Allowed pairs for broadcastable int32 positions; see module docstring."""
        raise NotImplementedError

    def operands(self) -> tuple[MaskOperand, ...]:
        return ()

    def tile_state(self, q_len: int, kv_len: int, block_q: int, block_kv: int):
        """int8 tile states [nQ, nK] (numpy) or [Bm, Hm, nQ, nK] (jnp, dynamic masks)."""
        raise NotImplementedError

    def batch_heads(self) -> tuple[int, int]:
        """(Bm, Hm): leading dims of this mask's data (1 when shared)."""
        return (1, 1)

    def validate(self, q_len: int, kv_len: int, batch: int, num_heads: int) -> None:
        """Raise ValueError if this mask cannot apply to these shapes."""

    # -- dense oracle ------------------------------------------------------------
    def to_dense(self, q_len: int, kv_len: int):
        """Bool matrix of allowed pairs: numpy [T, S] for static masks, jnp
        [..., T, S] when the mask holds per-batch (or per-head) arrays."""
        # [1, 1, T, 1] and [1, 1, 1, S]: the rank of the operand views, so the formula
        # broadcasts without rank promotion (clean under jax_numpy_rank_promotion="raise").
        q_pos = np.arange(q_len, dtype=np.int32).reshape(1, 1, q_len, 1)
        kv_pos = np.arange(kv_len, dtype=np.int32).reshape(1, 1, 1, kv_len)
        # Static masks (numpy operands or none) are evaluated entirely in numpy, so
        # to_dense also works inside jit (jnp ops there would return tracers, which
        # np.asarray cannot convert).
        xp = jnp if self.is_dynamic else np
        values = tuple(full_operand_view(o, q_len, kv_len, xp) for o in self.operands())
        dense = self.evaluate(xp.asarray(q_pos), xp.asarray(kv_pos), values)
        bm, hm = self.batch_heads()
        dense = xp.broadcast_to(xp.asarray(dense), (bm, hm, q_len, kv_len))
        if hm == 1:
            dense = dense[:, 0]
            if bm == 1 and not self.is_dynamic:
                dense = dense[0]
        return dense.copy() if xp is np else dense

    # -- identity ----------------------------------------------------------------
    def _key(self):
        raise NotImplementedError

    def __eq__(self, other):
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self):
        return hash((type(self).__name__, self._key()))


def _as_mask(x, op: str) -> Mask:
    if not isinstance(x, Mask):
        raise TypeError(f"`{op}` combines Mask objects; got {type(x).__name__}. "
                        "Wrap a boolean array in jaxattn.masks.DenseMask(array) first.")
    return x


def full_operand_view(op: MaskOperand, q_len: int, kv_len: int, xp=jnp):
    """Operand arrays as evaluate() sees them when given whole [T,1]/[1,S] iotas:
    broadcastable to [Bm, Hm, T, S]. ``xp`` is jnp, or np for static (numpy) operands."""
    a = xp.asarray(op.array)
    if op.kind == "block":
        bq, bk = op.layout_block
        a = xp.repeat(xp.repeat(a, bq, axis=-2), bk, axis=-1)
        return a[..., :q_len, :kv_len]
    if op.kind == "q":
        return a[:, None, :, None]
    if op.kind == "kv":
        return a[:, None, None, :]
    if op.kind == "qkv":
        return a
    raise ValueError(f"operand kind {op.kind!r} has no full view")


# ---------------------------------------------------------------------------------
# Tile geometry shared by the structured masks: row and column ranges of every tile,
# clipped to the real (unpadded) lengths. Shapes [nQ, 1] and [1, nK].
# ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def tile_bounds(q_len: int, kv_len: int, block_q: int, block_kv: int):
    n_q = -(-q_len // block_q)
    n_k = -(-kv_len // block_kv)
    r0 = (np.arange(n_q, dtype=np.int64) * block_q)[:, None]
    r1 = np.minimum(r0 + block_q, q_len) - 1
    c0 = (np.arange(n_k, dtype=np.int64) * block_kv)[None, :]
    c1 = np.minimum(c0 + block_kv, kv_len) - 1
    return r0, r1, c0, c1


def states_from(full, empty) -> np.ndarray:
    """Combine boolean 'every pair allowed' / 'no pair allowed' grids into states."""
    full, empty = np.broadcast_arrays(full, empty)
    out = np.full(full.shape, PARTIAL, dtype=np.int8)
    out[full] = FULL
    out[empty] = EMPTY
    return out


class _Composite(Mask):
    _combine_np = None
    _combine_jnp = None
    _combine_pairs = None
    _symbol = "?"

    def __init__(self, parts: tuple[Mask, ...]):
        object.__setattr__(self, "parts", tuple(parts))

    @classmethod
    def of(cls, a: Mask, b: Mask) -> Mask:
        parts = []
        for m in (a, b):
            parts.extend(m.parts if type(m) is cls else (m,))
        return cls(tuple(parts))

    @property
    def is_dynamic(self):  # type: ignore[override]
        return any(p.is_dynamic for p in self.parts)

    def operands(self):
        return tuple(o for p in self.parts for o in p.operands())

    def _split(self, operand_values):
        out, i = [], 0
        for p in self.parts:
            n = len(p.operands())
            out.append(tuple(operand_values[i:i + n]))
            i += n
        return out

    def batch_heads(self):
        bs = [p.batch_heads() for p in self.parts]
        return (max(b for b, _ in bs), max(h for _, h in bs))

    def validate(self, q_len, kv_len, batch, num_heads):
        for p in self.parts:
            p.validate(q_len, kv_len, batch, num_heads)

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        states = [p.tile_state(q_len, kv_len, block_q, block_kv) for p in self.parts]
        if any(not isinstance(s, np.ndarray) for s in states):
            # [nQ, nK] static states meet [Bm, Hm, nQ, nK] dynamic ones at rank 4 (no
            # implicit rank promotion).
            states = [jnp.asarray(s).reshape((1,) * (4 - s.ndim) + s.shape) for s in states]
            out = states[0]
            for s in states[1:]:
                out = self._combine_jnp(out, s)
            return out
        return functools.reduce(self._combine_np, states)

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        values = self._split(operand_values)
        return functools.reduce(self._combine_pairs,
                                (p.evaluate(q_pos, kv_pos, v) for p, v in zip(self.parts, values)))

    def _key(self):
        return self.parts

    def __repr__(self):
        return "(" + f" {self._symbol} ".join(map(repr, self.parts)) + ")"


class AndMask(_Composite):
    """Pairs allowed by every part (tile states: element-wise min)."""
    _combine_np = staticmethod(np.minimum)
    _combine_jnp = staticmethod(jnp.minimum)
    _combine_pairs = staticmethod(operator.and_)
    _symbol = "&"


class OrMask(_Composite):
    """Pairs allowed by any part (tile states: element-wise max)."""
    _combine_np = staticmethod(np.maximum)
    _combine_jnp = staticmethod(jnp.maximum)
    _combine_pairs = staticmethod(operator.or_)
    _symbol = "|"


# ---------------------------------------------------------------------------------
# Masks are pytrees, so they pass through jit as ordinary arguments: a static mask is a
# leafless node whose aux data is the (hashable) mask itself; masks holding jax arrays
# expose those arrays as leaves, so new segment ids never trigger a recompile.
# ---------------------------------------------------------------------------------
def register_static_mask(cls):
    jax.tree_util.register_pytree_node(cls, lambda m: ((), m), lambda aux, _: aux)
    return cls


def _composite_flatten(m):
    return m.parts, None


for _cls in (AndMask, OrMask):
    jax.tree_util.register_pytree_node(
        _cls, _composite_flatten, lambda aux, parts, _cls=_cls: _cls(tuple(parts)))
