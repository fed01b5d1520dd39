"""Glue between masks and kernel backends: canonical Mask → block metadata + mask
operands → the backend-neutral custom VJP (pallas_kernels/flash_vjp.py).

A new backend (e.g. Mosaic GPU) plugs in by providing forward/backward and a config;
nothing here or in the masks changes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import triton as triton_backend
from pallas_kernels.flash_vjp import FlashStatic, flash_attention
from pallas_kernels.metadata import BlockMetadata
from pallas_kernels.triton.common import padded_head_dim
from jaxattn.masks import FullMask, Mask, build_block_metadata

_BACKENDS = {"pallas_triton": triton_backend}


def _as_jnp(meta: BlockMetadata) -> BlockMetadata:
    return jax.tree_util.tree_map(jnp.asarray, meta)


def default_interpret() -> bool:
    """Run kernels in Pallas interpret mode when there is no GPU (CPU tests, CI)."""
    return jax.default_backend() != "gpu"


def pallas_attention(backend_name: str, query, key, value, bias, mask: Mask, *, scale,
                     logits_soft_cap, return_residuals, config=None, interpret=None):
    """Implementation entry point (see jaxattn.api's dispatch contract)."""
    if bias is not None:
        raise NotImplementedError(f"{backend_name} has no additive bias input yet; express it as a Mask")
    if interpret is None:
        interpret = default_interpret()
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError(f"{backend_name} needs a CUDA GPU (or interpret=True)")
    backend = _BACKENDS[backend_name]
    if config is None:
        config = backend.default_config(padded_head_dim(query.shape[-1]), interpret=interpret)
    return _pallas_jit(query, key, value, mask, backend_name=backend_name, scale=scale,
                       logits_soft_cap=logits_soft_cap, return_residuals=return_residuals,
                       config=config, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("backend_name", "scale", "logits_soft_cap",
                                             "return_residuals", "config", "interpret"))
def _pallas_jit(query, key, value, mask, *, backend_name, scale, logits_soft_cap,
                return_residuals, config, interpret):
    t, s = query.shape[1], key.shape[1]
    metas = {name: _as_jnp(build_block_metadata(mask, t, s, bq, bk))
             for name, (bq, bk) in config.metadata_tiles().items()}
    operands = mask.operands()
    static = FlashStatic(
        backend=_BACKENDS[backend_name], scale=scale, logits_soft_cap=logits_soft_cap,
        mask_fn=None if isinstance(mask, FullMask) else mask.evaluate,
        operand_kinds=tuple((o.kind, o.layout_block) for o in operands),
        config=config, interpret=interpret)
    out, lse = flash_attention(static, query, key, value, metas,
                               tuple(jnp.asarray(o.array) for o in operands))
    if return_residuals:
        return out, lse.astype(jnp.float32) if lse.dtype != jnp.float64 else lse
    return out
