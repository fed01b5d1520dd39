"""Tile sizes, warps and pipeline stages of the Triton FlashAttention kernels.

Heuristic defaults: starting points from the FlashAttention-2 Triton tutorial shapes
(128×64 forward tiles, 64×64 backward tiles; 4 warps up to D=64, 8 above), to be
re-tuned on an H100 with benchmarks/ (see BENCHMARKS.md for the card and date of the
numbers behind the current table). In interpret mode (CPU) small tiles keep the
emulated grid cheap and exercise multi-tile logic on small test shapes.
"""

from __future__ import annotations

import dataclasses


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    block_q: int = 128
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 3
    block_q_bwd: int = 64
    block_kv_bwd: int = 64
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            v = getattr(self, name)
            if not _is_pow2(v) or v < 16:
                raise ValueError(f"TritonConfig.{name}={v} must be a power of two >= 16 "
                                 "(Triton tiles and tensor-core dots need it).")
        for name in ("num_warps", "num_warps_bwd"):
            v = getattr(self, name)
            if v not in (1, 2, 4, 8, 16):
                raise ValueError(f"TritonConfig.{name}={v} must be one of 1, 2, 4, 8, 16.")
        for name in ("num_stages", "num_stages_bwd"):
            if getattr(self, name) < 1:
                raise ValueError(f"TritonConfig.{name} must be >= 1, got {getattr(self, name)}.")


def default_config(head_dim: int, *, interpret: bool = False) -> TritonConfig:
    """Heuristic config per (padded) head dim."""
    if interpret:
        return TritonConfig(block_q=32, block_kv=32, block_q_bwd=32, block_kv_bwd=32)
    if head_dim <= 64:
        return TritonConfig(block_q=128, block_kv=64, num_warps=4, num_stages=3,
                            block_q_bwd=64, block_kv_bwd=64, num_warps_bwd=4, num_stages_bwd=2)
    if head_dim <= 128:
        return TritonConfig(block_q=128, block_kv=64, num_warps=8, num_stages=3,
                            block_q_bwd=64, block_kv_bwd=64, num_warps_bwd=4, num_stages_bwd=2)
    return TritonConfig(block_q=64, block_kv=32, num_warps=4, num_stages=2,
                        block_q_bwd=32, block_kv_bwd=32, num_warps_bwd=4, num_stages_bwd=1)
