"""One buffer per hop of the ring.

XLA's GPU scheduler keeps at most one collective-permute in flight, and ppermute of a
tuple is one collective per array: K and V sent as two would overlap the step's kernel
with one of them and expose the other. So each hop sends a single flat buffer holding
every array that travels, as unsigned ints of the widest dtype's size (bf16 K/V two to a
uint32 beside float32 dK/dV): the float32 parts are then plain elementwise views, so
adding a step's gradient and packing the next hop fuse into one pass over memory, and
bits are never reinterpreted as floats.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

@dataclasses.dataclass(frozen=True)
class Packing:
    shapes: tuple
    dtypes: tuple

    @classmethod
    def of(cls, xs):
        return cls(tuple(x.shape for x in xs), tuple(jnp.dtype(x.dtype) for x in xs))

    @property
    def unit(self):
        return jnp.dtype(f"uint{8 * max(d.itemsize for d in self.dtypes)}")

    def _ratio(self, dtype):
        return self.unit.itemsize // dtype.itemsize

    def _size(self, shape, dtype):
        return -(-math.prod(shape) // self._ratio(dtype))  # units, rounded up

    def pack(self, xs):
        flat = []
        for x in xs:
            r = self._ratio(jnp.dtype(x.dtype))
            x = x.reshape(-1)
            if r > 1:  # r narrow values per unit (padded to a whole unit)
                x = jnp.pad(x, (0, -x.size % r)).reshape(-1, r)
            flat.append(jax.lax.bitcast_convert_type(x, self.unit))
        return flat[0] if len(flat) == 1 else jnp.concatenate(flat)

    def unpack(self, buf):
        out, off = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            n = self._size(shape, dtype)
            piece = jax.lax.bitcast_convert_type(jax.lax.slice_in_dim(buf, off, off + n), dtype)
            off += n
            out.append(piece.reshape(-1)[:math.prod(shape)].reshape(shape))
        return tuple(out)


def send_on(xs, axis_name, p):
    """Pass a tuple of arrays one step along the ring as one collective."""
    packing = Packing.of(xs)
    return packing.unpack(jax.lax.ppermute(packing.pack(xs), axis_name, ring_perm(p)))


def ring_perm(p):
    return [(i, (i + 1) % p) for i in range(p)]
