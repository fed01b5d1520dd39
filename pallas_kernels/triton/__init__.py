"""Portable FlashAttention backend: Pallas kernels lowered through Triton (any CUDA GPU;
Pallas interpret mode on CPU). Implements the backend protocol of
pallas_kernels/flash_vjp.py."""

from pallas_kernels.triton.backward import backward
from pallas_kernels.triton.config import TritonConfig, default_config
from pallas_kernels.triton.forward import forward

__all__ = ["forward", "backward", "TritonConfig", "default_config"]
