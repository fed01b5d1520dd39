"""The implementations `dot_product_attention(..., implementation=name)` can call.

Built in: "reference" (the jnp oracle), "xla" and "cudnn" (`jax.nn.dot_product_attention`,
the baselines we measure against), and one implementation per kernel backend of
pallas_kernels/registry.py ("pallas_triton", ...), registered from that registry, so a
new kernel backend needs no line here.

Every implementation is fn(query, key, value, bias, mask, *, scale, logits_soft_cap,
return_residuals) on validated inputs with a canonical Mask. It raises ValueError for
bad input and NotImplementedError for a valid request it cannot serve, which makes
`implementation=None` move on to the next name of `default_order()`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from pallas_kernels.registry import backend_names
from jaxattn.flash import pallas_attention
from jaxattn.jax_nn import jax_nn_attention
from jaxattn.reference import reference_attention

_IMPLEMENTATIONS: dict[str, Callable] = {}


def register_implementation(name: str, fn: Callable) -> None:
    """Make `fn` callable as dot_product_attention(..., implementation=name)."""
    _IMPLEMENTATIONS[name] = fn


def available_implementations() -> tuple[str, ...]:
    """Names `implementation=` accepts in this installation."""
    return tuple(_IMPLEMENTATIONS)


def get_implementation(name: str) -> Callable:
    return _IMPLEMENTATIONS[name]


def default_order() -> tuple[str, ...]:
    """Implementations tried by implementation=None, best first, for this platform."""
    if jax.default_backend() == "gpu":
        # The kernel backends in the registry's preference order; cuDNN then serves, in
        # O(T) memory, what they decline, before the O(T·S) reference.
        return (*(name for name in backend_names() if name in _IMPLEMENTATIONS), "cudnn", "reference")
    return ("reference",)


def _reference(query, key, value, bias, mask, *, scale, logits_soft_cap, return_residuals):
    return reference_attention(query, key, value, bias, mask, scale=scale,
                               logits_soft_cap=logits_soft_cap, return_residuals=return_residuals)


register_implementation("reference", _reference)
register_implementation("xla", functools.partial(jax_nn_attention, "xla"))
register_implementation("cudnn", functools.partial(jax_nn_attention, "cudnn"))
for _name in backend_names():
    register_implementation(_name, functools.partial(pallas_attention, _name))
