"""jaxattn: exact and block-sparse attention for JAX, with Pallas FlashAttention kernels.

The public names below, and the submodules, are loaded on first use (PEP 562 module
`__getattr__`): `import jaxattn` costs nothing until one is touched, so the `jaxattn`
command answers `--help` without importing jax or flax. `jaxattn.dot_product_attention`,
`from jaxattn import masks`, `jaxattn.parallel.zigzag_permutation` and the rest work as
plain attributes.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static tools see; at run time these load lazily
    from jaxattn import layers, masks
    from jaxattn.api import available_implementations, dot_product_attention
    from jaxattn.decode import decode_attention
    from jaxattn.parallel import ring_attention
    from jaxattn.score_mod import ScoreMod
    from jaxattn.score_recipes import alibi, alibi_slopes, relative_position_buckets, soft_cap

__all__ = ["dot_product_attention", "decode_attention", "available_implementations", "masks",
           "ring_attention", "layers", "ScoreMod", "alibi", "alibi_slopes",
           "relative_position_buckets", "soft_cap"]

# public name -> (module, attribute in it; None = the module itself)
_LAZY = {
    "dot_product_attention": ("jaxattn.api", "dot_product_attention"),
    "decode_attention": ("jaxattn.decode", "decode_attention"),
    "available_implementations": ("jaxattn.api", "available_implementations"),
    "ring_attention": ("jaxattn.parallel", "ring_attention"),
    "ScoreMod": ("jaxattn.score_mod", "ScoreMod"),
    "alibi": ("jaxattn.score_recipes", "alibi"),
    "alibi_slopes": ("jaxattn.score_recipes", "alibi_slopes"),
    "relative_position_buckets": ("jaxattn.score_recipes", "relative_position_buckets"),
    "soft_cap": ("jaxattn.score_recipes", "soft_cap"),
    "masks": ("jaxattn.masks", None),
    "layers": ("jaxattn.layers", None),  # imports flax
}


def _version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("jaxattn")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _LAZY:
        module, attr = _LAZY[name]
        value = import_module(module)
        if attr is not None:
            value = getattr(value, attr)
    elif not name.startswith("__"):  # a submodule, as `jaxattn.parallel.zigzag_permutation`
        try:
            value = import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists but something it imports does not
            raise AttributeError(f"module 'jaxattn' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'jaxattn' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})
