"""`ScoreMod`: a pure function that changes each attention score, with the arrays it reads.

    def alibi(score, batch, head, q_pos, kv_pos, slopes):
        return score + slopes[head] * (kv_pos - q_pos)
    out = jaxattn.dot_product_attention(q, k, v, is_causal=True,
                                        score_mod=jaxattn.ScoreMod(alibi, slopes))

Where it acts: logits = scale · q·kᵀ, then + bias, then the soft cap c·tanh(x/c), then
``fn``, then the mask (a masked pair stays masked whatever fn returns), then the softmax.

``fn(score, batch, head, q_pos, kv_pos, *operands)`` is element-wise: every argument
broadcasts against the score. batch, head, q_pos and kv_pos are int32 (head is the query
head; q_pos and kv_pos are the row i and column j the masks see: absolute positions in
`decode_attention`, global ones and the global batch row in every step of
`ring_attention`). The reference calls it
once on [B, N, T, S]; the kernels call it on each tile. Operands are read only by
indexing, ``slopes[head]`` or ``table[head, bucket]`` with integer scalars or arrays, one
index per axis, clamped to the axis's bounds like jnp indexing; each operand is an
`OperandView` with ``shape``, ``ndim`` and ``[...]``, nothing else. Arrays fn needs go in
`operands`, not in a closure: a closure over a traced value would leak the tracer, and
the kernels cannot capture arrays.

Floating-point operands are differentiable: the reference differentiates fn with jax,
the kernels apply jax's derivative of fn inside their tiles. The kernels compute operand
gradients for operands read at scalar indices (per-head or per-batch values such as
learned ALiBi slopes); an operand read with a tile of indices (a bucket table) is a
NotImplementedError under differentiation there: a learned table belongs in ``bias=``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.score_mod import linear_index

__all__ = ["ScoreMod", "OperandView", "as_score_mod"]


class OperandView:
    """An operand as fn sees it outside the kernels: view[idx] is x[idx] with every index
    clamped to its axis (the same element the kernels load)."""

    def __init__(self, array):
        self._flat = jnp.reshape(array, (-1,))
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, idx):
        return self._flat[linear_index(idx, self.shape)]


def _array_key(x):
    if isinstance(x, jax.core.Tracer):
        return ("traced", id(x))
    a = np.asarray(x)
    return (a.shape, a.dtype.str, a.tobytes())


class ScoreMod:
    """fn and the arrays it reads; see the module docstring. Immutable, hashable (by fn
    and the operands' values), and a pytree whose leaves are the operands, so it passes
    through jit as an argument and a traced operand is differentiated."""

    def __init__(self, fn: Callable, *operands):
        if not callable(fn):
            raise ValueError(f"ScoreMod: expected a callable fn(score, batch, head, q_pos, kv_pos, "
                             f"*operands), got {type(fn).__name__}.")
        for i, x in enumerate(operands):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise ValueError(f"ScoreMod operand {i}: expected an array, got {type(x).__name__}. "
                                 "Pass arrays (jnp or numpy); Python numbers can live in fn.")
            if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
                raise ValueError(f"ScoreMod operand {i}: expected a float or int array, got {x.dtype}.")
        self.fn = fn
        self.operands = tuple(operands)

    def __repr__(self):
        ops = ", ".join(f"{x.dtype}{list(x.shape)}" for x in self.operands)
        return f"ScoreMod({getattr(self.fn, '__name__', self.fn)!r}{', ' + ops if ops else ''})"

    def __eq__(self, other):
        return (isinstance(other, ScoreMod) and self.fn == other.fn
                and len(self.operands) == len(other.operands)
                and all(_array_key(a) == _array_key(b) for a, b in zip(self.operands, other.operands)))

    def __hash__(self):
        return hash((self.fn, tuple(_array_key(x)[:2] for x in self.operands)))

    def __bool__(self):
        raise TypeError("A ScoreMod has no truth value: test for one with `score_mod is None`.")

    def views(self, operands=None):
        return [OperandView(x) for x in (self.operands if operands is None else operands)]

    def check(self, score_dtype=jnp.float32):
        """ValueError unless fn is a pure element-wise function of its arguments: traced
        once on scalars, it must return one floating score and read no array (traced or
        not, even 0-d) by closure."""
        def scalar_call(score, batch, head, q_pos, kv_pos, *operands):
            return self.fn(score, batch, head, q_pos, kv_pos, *self.views(operands))
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        args = (jax.ShapeDtypeStruct((), score_dtype), i32, i32, i32, i32,
                *[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self.operands])
        try:
            closed, out_shape = jax.make_jaxpr(scalar_call, return_shape=True)(*args)
        except (jax.errors.UnexpectedTracerError, jax.errors.TracerArrayConversionError,
                jax.errors.ConcretizationTypeError) as e:
            raise ValueError(f"score_mod {self!r}: fn is not a pure function of its arguments "
                             f"({type(e).__name__}). Pass every array it reads as an operand: "
                             "ScoreMod(fn, array).") from e
        for c in closed.consts:
            if isinstance(c, jax.core.Tracer):
                raise ValueError(f"score_mod {self!r}: fn reads a traced value by closure. Pass it as "
                                 "an operand instead, ScoreMod(fn, x), and read it as x[head] (or "
                                 "x[...] with integer indices) inside fn.")
            # Even a 0-d array: a kernel cannot capture one (a Python number is fine).
            raise ValueError(f"score_mod {self!r}: fn reads an array of shape {np.shape(c)} by "
                             "closure; the kernels cannot capture arrays. Pass it as an operand, "
                             "ScoreMod(fn, x), or use a Python number.")
        leaves = jax.tree_util.tree_leaves(out_shape)
        if (len(leaves) != 1 or leaves[0].shape != ()
                or not jnp.issubdtype(leaves[0].dtype, jnp.floating)):
            raise ValueError(f"score_mod {self!r}: fn must return one floating score per element "
                             f"(element-wise), got {out_shape} for scalar inputs.")

    def reference_apply(self, score, batch, head, q_pos, kv_pos):
        """fn on whole broadcastable arrays (the reference); result in score's dtype."""
        out = self.fn(score, batch, head, q_pos, kv_pos, *self.views())
        return jnp.broadcast_to(jnp.asarray(out, score.dtype), score.shape)


def _unflatten(fn, operands):
    # Not through __init__: jax rebuilds pytrees with placeholders as leaves.
    m = object.__new__(ScoreMod)
    m.fn, m.operands = fn, tuple(operands)
    return m


jax.tree_util.register_pytree_node(ScoreMod, lambda m: (m.operands, m.fn), _unflatten)


def as_score_mod(score_mod) -> ScoreMod | None:
    """None, a ScoreMod, or a plain callable (a ScoreMod with no operands)."""
    if score_mod is None or isinstance(score_mod, ScoreMod):
        return score_mod
    if callable(score_mod):
        return ScoreMod(score_mod)
    raise ValueError(f"score_mod: expected None, a jaxattn.ScoreMod or a callable fn(score, batch, "
                     f"head, q_pos, kv_pos), got {type(score_mod).__name__}.")
