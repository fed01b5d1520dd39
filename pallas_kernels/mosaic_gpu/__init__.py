"""Hopper FlashAttention backend: Pallas kernels lowered through Mosaic GPU (sm90 only).

Implements the kernel-backend protocol (name, padded_head_dim, default_config, supports,
forward, backward, decode). The forward is the warp-specialised TMA + wgmma kernel of
forward.py; it adds a bias and reads dense ("qkv") mask operands (tile_inputs.py). The
backward is this package's dQ and dK/dV kernels (backward_kernels.py) for calls
without a bias or dense mask operands; otherwise (a bias and its gradient, a dense
mask) it is the Triton backend's kernels, run on metadata built for
the Triton tiles that ``MosaicConfig.backward`` names (same metadata contract, same
residuals: out and the natural-log lse). Masks that may leave unreached rows in PARTIAL
tiles (segment ids, sequence lengths, tile-cutting edges) run the Mosaic forward when
the inputs are finite and the Triton forward when not (nonfinite_fallback.py); the Mosaic
backward likewise, while the Triton backward zeroes such rows itself.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels import triton as _triton
from pallas_kernels.mosaic_gpu import backward_kernels as _mosaic_backward
from pallas_kernels.mosaic_gpu.common import padded_head_dim
from pallas_kernels.mosaic_gpu.config import MosaicConfig, default_config as config_for_head_dim
from pallas_kernels.triton.config import config_for_head_dim as triton_config_for_head_dim
from pallas_kernels.mosaic_gpu import nonfinite_fallback
from pallas_kernels.mosaic_gpu.forward import forward as _mosaic_forward

name = "pallas_mosaic_gpu"
decode = None

__all__ = ["name", "padded_head_dim", "default_config", "supports", "metadata_reason", "forward",
           "backward", "decode", "MosaicConfig", "config_for_head_dim"]

_SM90_NAMES = ("H100", "H200", "H800", "H20", "GH200")


def default_config(request, *, interpret: bool = False) -> MosaicConfig:
    """The head dim's config; where this package's backward kernels decline the request
    (backward_kernels.backward_supports: a bias and its gradient, dense ("qkv") mask
    operands) its backward is the Triton backend's, with the Triton config for that head
    dim: it adds the bias, computes dbias and reads dense masks on the same residuals
    (out and the natural-log lse) and its own metadata tiles."""
    del interpret   # the kernels do not run in an interpreter (see supports)
    hp = padded_head_dim(request.head_dim)
    cfg = config_for_head_dim(hp)
    if not cfg.triton_backward and _mosaic_backward.backward_supports(request) is not None:
        cfg = dataclasses.replace(cfg, backward=triton_config_for_head_dim(hp))
    return cfg


def supports(request, *, interpret: bool = False) -> str | None:
    """None when the kernels can serve `request`, otherwise why not."""
    if interpret or request.platform != "gpu":
        return ("the Mosaic GPU kernels need an sm90 (Hopper) GPU; the Mosaic GPU interpreter "
                "cannot run wgmma with a register operand")
    if not any(s in (request.device_kind or "") for s in _SM90_NAMES):
        return f"the Mosaic GPU kernels are written for sm90 (H100/H200), got {request.device_kind!r}"
    if jnp.dtype(request.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"the Mosaic GPU kernels take bfloat16/float16, got {jnp.dtype(request.dtype).name}"
    if request.head_dim > 256:
        return f"the Mosaic GPU kernels take head dims up to 256, got {request.head_dim}"
    if request.dropout_rate:
        return ("the Mosaic GPU kernels have no attention dropout yet; the Triton kernels "
                "(implementation='pallas_triton') compute it")
    if request.has_score_mod:
        return "the Mosaic GPU kernels take no score_mod yet"
    # Every mask operand is read: "q" / "kv" vectors, "block" scalars, dense "qkv" tiles,
    # and block layouts the tiles do not divide as dense tiles (tile_inputs.py).
    return None


def metadata_reason(static, metas) -> str | None:
    """Why these kernels cannot run this call safely, or None. The Mosaic kernels select
    masked logits away but do not zero K/V (or Q) rows inside a PARTIAL tile, so a key
    that no query row of the tile attends, holding NaN or Inf (padding, unwritten cache
    slots), would reach the result through 0 · NaN in a wgmma. The block metadata says
    exactly whether the mask leaves such rows (BlockMetadata.partial_isolates_*);
    causal masks with T = S, aligned windows and BigBird's block patterns do not. Up to
    head dim 128 such calls check their inputs and take the Triton kernels when these
    hold NaN/Inf (nonfinite_fallback.py); at head dim 256 (MosaicConfig.finite_check
    off) they are refused."""
    if static.config.finite_check:
        return None
    if "forward" in metas and metas["forward"].partial_isolates_keys:
        return ("this mask leaves keys inside a PARTIAL tile that no row of the tile attends; "
                "the Mosaic GPU forward does not zero them, so NaN/Inf held there could reach "
                "the result, and at head dim 256 it has no finite-input check with a Triton "
                "fallback (the Triton kernels serve it)")
    if not static.config.triton_backward and (
            ("dq" in metas and metas["dq"].partial_isolates_keys)
            or ("dkdv" in metas and metas["dkdv"].partial_isolates_queries)):
        return ("this mask leaves keys (or queries) inside a PARTIAL backward tile that no "
                "row (or key) of the tile attends; the Mosaic GPU backward does not zero them, "
                "and at head dim 256 it has no finite-input check with a Triton fallback (the "
                "Triton kernels serve it)")
    return None


def forward(static, q, k, v, bias, metas, operands):
    """The forward kernel of forward.py; behind a finite-input check (Triton fallback)
    where the mask may leave unattended keys in PARTIAL tiles (module docstring)."""
    if not static.config.finite_check or not nonfinite_fallback.forward_needs_check(metas):
        return _mosaic_forward(static, q, k, v, bias, metas, operands)
    return nonfinite_fallback.guarded_forward(_mosaic_forward, static, q, k, v, bias, metas,
                                              operands)


def backward(static, q, k, v, bias, out, lse, dout, delta, metas, operands, parts):
    """This package's backward kernels, or the Triton backend's (a TritonConfig in
    MosaicConfig.backward: a bias and its gradient, dense mask operands; see
    default_config), which computes every part asked for, "dbias" included."""
    if not static.config.triton_backward:
        if nonfinite_fallback.backward_needs_check(
                metas, parts, nonfinite_fallback.fused_backward(static, parts)):
            return nonfinite_fallback.guarded_backward(
                _mosaic_backward.backward, static, q, k, v, bias, out, lse, dout, delta, metas,
                operands, parts)
        return _mosaic_backward.backward(static, q, k, v, bias, out, lse, dout, delta, metas,
                                         operands, parts=parts)
    triton_static = dataclasses.replace(static, backend=_triton, config=static.config.backward)
    return _triton.backward(triton_static, q, k, v, bias, out, lse, dout, delta, metas, operands,
                            parts=parts)
