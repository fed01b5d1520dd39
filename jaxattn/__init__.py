"""jaxattn: exact and block-sparse attention for JAX, with Pallas FlashAttention kernels."""

from jaxattn import masks
from jaxattn.api import available_implementations, dot_product_attention
from jaxattn.parallel import ring_attention
from jaxattn import layers  # Flax layers (imports flax)

__all__ = ["dot_product_attention", "available_implementations", "masks", "ring_attention", "layers"]
__version__ = "0.1.0"
