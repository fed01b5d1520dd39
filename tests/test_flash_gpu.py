"""GPU tier (skipped without a CUDA GPU): the shared kernel suite (tests/kernel_suite.py)
at the backend's real tile sizes, on sequences 16 times longer than the CPU tier's, in
bfloat16, compared row by row with the float32 reference (GPUTier: a row's tolerance
is twice a naive bfloat16 computation's error on that row, plus a small floor), so one
wrong tile cannot hide in a norm over the whole tensor.

Run it on a GPU machine with `JAX_PLATFORMS=cuda python -m pytest tests -m gpu`.
"""

import pytest

from kernel_suite import GPUTier

pytestmark = pytest.mark.gpu


class TestTritonGPU(GPUTier):
    backend = "pallas_triton"


class TestMosaicGPU(GPUTier):
    """The Hopper backend: what its supports() declines (dropout, score_mod) is asserted
    to raise NotImplementedError. Segment ids, dense mask operands and the bias run its
    forward kernel (the poisoned-input case takes its Triton fallback for NaN/Inf
    inputs); with a bias or a dense mask the backward is the Triton backend's."""
    backend = "pallas_mosaic_gpu"
    supports_score_mod = False
