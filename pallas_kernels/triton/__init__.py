"""Portable FlashAttention backend: Pallas kernels lowered through Triton (any CUDA GPU;
Pallas interpret mode on CPU). This module is the backend object of the kernel backend
protocol (pallas_kernels/backend.py), registered as "pallas_triton"."""

from pallas_kernels.triton.backward import backward
from pallas_kernels.triton.common import padded_head_dim
from pallas_kernels.triton.config import TritonConfig, default_config, supports
from pallas_kernels.triton.decode import decode   # the KV-cache decode entry
from pallas_kernels.triton.forward import forward

name = "pallas_triton"

__all__ = ["name", "decode", "padded_head_dim", "supports", "default_config", "forward",
           "backward", "TritonConfig"]
