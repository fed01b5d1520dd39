"""Structured masks: defined by a few integers, so tile states are arithmetic.

Each docstring shows the mask on T=4 query rows × S=6 key columns (1 = attend); the
tests pin the same matrices. When T ≠ S, positions are absolute: row i and column j are
compared as plain integers (use ``offset`` to align the end of a shorter query block
with the end of the keys, e.g. ``CausalMask(offset=S - T)`` for decoding).
"""

from __future__ import annotations

import numpy as np

from pallas_kernels.metadata import FULL, MaskOperand
from jaxattn.masks.base import Mask, register_static_mask, states_from, tile_bounds


def _check_int(name: str, value, *, minimum: int | None = None, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int{' or None' if allow_none else ''}, "
                         f"got {value!r} ({type(value).__name__}). Pass a Python int, e.g. int(x).")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}. "
                         f"Pass a {'non-negative' if minimum == 0 else 'positive'} integer.")
    return int(value)


@register_static_mask
class FullMask(Mask):
    """Every pair attends.

    1 1 1 1 1 1
    1 1 1 1 1 1
    1 1 1 1 1 1
    1 1 1 1 1 1
    """

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        return (q_pos >= 0) | (kv_pos >= 0)  # True, broadcast to the tile shape

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        r0, _, c0, _ = tile_bounds(q_len, kv_len, block_q, block_kv)
        return np.full((r0.shape[0], c0.shape[1]), FULL, np.int8)

    def _key(self):
        return ()

    def __repr__(self):
        return "FullMask()"


@register_static_mask
class CausalMask(Mask):
    """j <= i + offset.  offset=0:

    1 0 0 0 0 0
    1 1 0 0 0 0
    1 1 1 0 0 0
    1 1 1 1 0 0

    offset=2 (a 4-token query block at the end of 6 keys): row i sees keys 0..i+2.
    A row whose i + offset < 0 attends to nothing and returns 0.
    """

    def __init__(self, offset: int = 0):
        self.offset = _check_int("CausalMask offset", offset)

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        return kv_pos <= q_pos + self.offset

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        r0, r1, c0, c1 = tile_bounds(q_len, kv_len, block_q, block_kv)
        return states_from(c1 <= r0 + self.offset, c0 > r1 + self.offset)

    def _key(self):
        return (self.offset,)

    def __repr__(self):
        return f"CausalMask(offset={self.offset})"


@register_static_mask
class LocalMask(Mask):
    """i + offset - left <= j <= i + offset + right (None = unbounded on that side).

    LocalMask(left=1, right=0):   LocalMask(left=1, right=1):
    1 0 0 0 0 0                   1 1 0 0 0 0
    1 1 0 0 0 0                   1 1 1 0 0 0
    0 1 1 0 0 0                   0 1 1 1 0 0
    0 0 1 1 0 0                   0 0 1 1 1 0
    """

    def __init__(self, left: int | None, right: int | None = 0, offset: int = 0):
        self.left = _check_int("LocalMask left", left, minimum=0, allow_none=True)
        self.right = _check_int("LocalMask right", right, minimum=0, allow_none=True)
        self.offset = _check_int("LocalMask offset", offset)

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        centre = q_pos + self.offset
        ok = (kv_pos >= 0) | (q_pos >= 0)
        if self.left is not None:
            ok = ok & (kv_pos >= centre - self.left)
        if self.right is not None:
            ok = ok & (kv_pos <= centre + self.right)
        return ok

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        r0, r1, c0, c1 = tile_bounds(q_len, kv_len, block_q, block_kv)
        full = np.ones((r0.shape[0], c0.shape[1]), bool)
        empty = np.zeros_like(full)
        if self.left is not None:
            full &= c0 >= r1 + self.offset - self.left
            empty |= c1 < r0 + self.offset - self.left
        if self.right is not None:
            full &= c1 <= r0 + self.offset + self.right
            empty |= c0 > r1 + self.offset + self.right
        return states_from(full, empty)

    def _key(self):
        return (self.left, self.right, self.offset)

    def __repr__(self):
        return f"LocalMask(left={self.left}, right={self.right}, offset={self.offset})"


@register_static_mask
class StridedMask(Mask):
    """(i + offset - j) mod stride == 0.  StridedMask(2):

    1 0 1 0 1 0
    0 1 0 1 0 1
    1 0 1 0 1 0
    0 1 0 1 0 1

    Usually combined: ``CausalMask() & StridedMask(s)`` is the strided half of the
    Sparse Transformer's factorised attention.
    """

    def __init__(self, stride: int, offset: int = 0):
        self.stride = _check_int("StridedMask stride", stride, minimum=1)
        self.offset = _check_int("StridedMask offset", offset)

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        # Divisibility needs no sign fix-up: a truncating (C, as kernels lower `%`) and a
        # flooring (numpy/jnp) remainder are zero for exactly the same dividends. (An
        # earlier version added stride * 2**24 to make d non-negative, which overflowed
        # int32 for every stride >= 128.)
        d = q_pos + self.offset - kv_pos
        return d % self.stride == 0

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        r0, r1, c0, c1 = tile_bounds(q_len, kv_len, block_q, block_kv)
        s = self.stride
        lo = r0 + self.offset - c1  # smallest i + offset - j in the tile
        hi = r1 + self.offset - c0  # largest
        # Some value in [lo, hi] is a multiple of s  <=>  floor(hi/s) >= ceil(lo/s).
        nonempty = np.floor_divide(hi, s) >= -np.floor_divide(-lo, s)
        full = np.broadcast_to(np.asarray(s == 1) | ((r0 == r1) & (c0 == c1)), nonempty.shape)
        return states_from(full & nonempty, ~nonempty)

    def _key(self):
        return (self.stride, self.offset)

    def __repr__(self):
        return f"StridedMask(stride={self.stride}, offset={self.offset})"


@register_static_mask
class GlobalMask(Mask):
    """i < num_global or j < num_global.  GlobalMask(1):

    1 1 1 1 1 1
    1 0 0 0 0 0
    1 0 0 0 0 0
    1 0 0 0 0 0

    The first tokens attend everywhere and are seen by everyone (Longformer, BigBird).
    """

    def __init__(self, num_global: int):
        self.num_global = _check_int("GlobalMask num_global", num_global, minimum=0)

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        g = self.num_global
        return (q_pos < g) | (kv_pos < g)

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        r0, r1, c0, c1 = tile_bounds(q_len, kv_len, block_q, block_kv)
        g = self.num_global
        return states_from((r1 < g) | (c1 < g), (r0 >= g) & (c0 >= g))

    def _key(self):
        return (self.num_global,)

    def __repr__(self):
        return f"GlobalMask(num_global={self.num_global})"


@register_static_mask
class PrefixLMMask(Mask):
    """j < prefix_len or j <= i.  PrefixLMMask(3):

    1 1 1 0 0 0
    1 1 1 0 0 0
    1 1 1 0 0 0
    1 1 1 1 0 0

    Bidirectional over the prefix, causal after it.
    """

    def __init__(self, prefix_len: int):
        self.prefix_len = _check_int("PrefixLMMask prefix_len", prefix_len, minimum=0)

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        return (kv_pos < self.prefix_len) | (kv_pos <= q_pos)

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        r0, r1, c0, c1 = tile_bounds(q_len, kv_len, block_q, block_kv)
        p = self.prefix_len
        return states_from((c1 < p) | (c1 <= r0), (c0 >= p) & (c0 > r1))

    def _key(self):
        return (self.prefix_len,)

    def __repr__(self):
        return f"PrefixLMMask(prefix_len={self.prefix_len})"


@register_static_mask
class BlockSparseMask(Mask):
    """layout[i // block_q, j // block_kv].  layout [[1,0,1],[0,1,0]], blocks 2×2:

    1 1 0 0 1 1
    1 1 0 0 1 1
    0 0 1 1 0 0
    0 0 1 1 0 0

    ``layout`` is a static numpy bool array [ceil(T/block_q), ceil(S/block_kv)] (or
    larger). When kernel tiles divide (block_q, block_kv) every tile is FULL or EMPTY and
    the kernel never evaluates this mask element-wise.
    """

    def __init__(self, layout, block_q: int, block_kv: int):
        arr = np.asarray(layout)
        if arr.ndim != 2:
            raise ValueError(f"BlockSparseMask layout must be 2-D [q_blocks, kv_blocks], got shape "
                             f"{arr.shape}. Pass one layout shared by every batch row and head.")
        if arr.dtype != np.bool_:
            if not np.isin(arr, (0, 1)).all():
                raise ValueError(f"BlockSparseMask layout must be boolean (or 0/1), got dtype "
                                 f"{arr.dtype} with other values. Pass layout.astype(bool).")
            arr = arr.astype(bool)
        self.layout = arr.copy()
        self.layout.setflags(write=False)
        self.block_q = _check_int("BlockSparseMask block_q", block_q, minimum=1)
        self.block_kv = _check_int("BlockSparseMask block_kv", block_kv, minimum=1)
        self._digest = hash(self.layout.tobytes()) ^ hash(self.layout.shape)

    def operands(self):
        return (MaskOperand("block", self.layout.astype(np.int8)[None, None],
                            (self.block_q, self.block_kv)),)

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        (value,) = operand_values
        return value != 0

    def validate(self, q_len, kv_len, batch, num_heads):
        need = (-(-q_len // self.block_q), -(-kv_len // self.block_kv))
        if self.layout.shape[0] < need[0] or self.layout.shape[1] < need[1]:
            raise ValueError(
                f"BlockSparseMask layout: expected at least {need} blocks of "
                f"({self.block_q}, {self.block_kv}) to cover T={q_len}, S={kv_len}, got "
                f"{self.layout.shape}. Pass a layout of shape (ceil(T/block_q), ceil(S/block_kv)).")

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        r0, r1, c0, c1 = tile_bounds(q_len, kv_len, block_q, block_kv)
        # Count allowed layout blocks in each tile's rectangle with a 2-D prefix sum.
        lay = self.layout.astype(np.int64)
        csum = np.zeros((lay.shape[0] + 1, lay.shape[1] + 1), np.int64)
        csum[1:, 1:] = lay.cumsum(0).cumsum(1)
        a0, a1 = r0 // self.block_q, r1 // self.block_q + 1
        b0, b1 = c0 // self.block_kv, c1 // self.block_kv + 1
        count = csum[a1, b1] - csum[a0, b1] - csum[a1, b0] + csum[a0, b0]
        area = (a1 - a0) * (b1 - b0)
        return states_from(count == area, count == 0)

    def _key(self):
        return (self._digest, self.layout.shape, self.layout.tobytes(), self.block_q, self.block_kv)

    def __repr__(self):
        return (f"BlockSparseMask(layout{self.layout.shape} with {int(self.layout.sum())} blocks, "
                f"block_q={self.block_q}, block_kv={self.block_kv})")
