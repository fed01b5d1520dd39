"""NotMask: the pairs another mask rules out.

Used by the planner (jaxattn/masks/plan.py) to compute a union of patterns part by part
without counting a pair twice: part k runs with ``term_k & NotMask(term_1) & ...``.

Tile states are the inner mask's with FULL and EMPTY swapped (a tile where every pair
is allowed becomes one where none is, and the reverse; PARTIAL stays PARTIAL), so an AND
with a NotMask still lets the kernels skip tiles.

    inner LocalMask(1, 0):   NotMask(LocalMask(1, 0)):
    1 0 0 0 0 0              0 1 1 1 1 1
    1 1 0 0 0 0              0 0 1 1 1 1
    0 1 1 0 0 0              1 0 0 1 1 1
    0 0 1 1 0 0              1 1 0 0 1 1
"""

from __future__ import annotations

import jax

from pallas_kernels.metadata import EMPTY, FULL
from jaxattn.masks.base import Mask


class NotMask(Mask):
    """~inner: allowed exactly where ``inner`` is not."""

    def __init__(self, inner: Mask):
        if not isinstance(inner, Mask):
            raise ValueError(f"NotMask: expected a jaxattn.masks.Mask, got {type(inner).__name__}. "
                             "Wrap a bool array in jaxattn.masks.DenseMask(array) first.")
        object.__setattr__(self, "inner", inner)

    @property
    def is_dynamic(self):  # type: ignore[override]
        return self.inner.is_dynamic

    def operands(self):
        return self.inner.operands()

    def evaluate(self, q_pos, kv_pos, operand_values=()):
        # `x ^ True` rather than `~x`: Mosaic GPU lowers a bool `not` as a round trip
        # through int whose way back to bool its wgmma-layout registers (two values
        # each) cannot hold ("Register bitwidth ... must be divisible by 8"); an
        # exclusive or with a constant is one bool op there, and in numpy and jnp.
        return self.inner.evaluate(q_pos, kv_pos, operand_values) ^ True

    def tile_state(self, q_len, kv_len, block_q, block_kv):
        state = self.inner.tile_state(q_len, kv_len, block_q, block_kv)
        # EMPTY (0) <-> FULL (2), PARTIAL (1) stays: works for numpy and jnp alike.
        return (EMPTY + FULL - state).astype(state.dtype)

    def batch_heads(self):
        return self.inner.batch_heads()

    def validate(self, q_len, kv_len, batch, num_heads):
        self.inner.validate(q_len, kv_len, batch, num_heads)

    def _key(self):
        return (self.inner,)

    def __repr__(self):
        return f"~{self.inner!r}"


jax.tree_util.register_pytree_node(NotMask, lambda m: ((m.inner,), None),
                                   lambda _, children: NotMask(children[0]))
