"""Tile sizes, warps and pipeline stages of the Triton FlashAttention kernels.

Heuristic defaults measured on one NVIDIA H100 80GB HBM3, jax 0.11.2, bf16, 2026-11-27
(`benchmarks/flash_bench.py --tune`, raw numbers in benchmarks/results/tune_*.json):
  D128, S16k, forward (full / causal), once kernels computed the block index of runs
       of FULL tiles instead of loading it: 128×64/4 warps/3 stages 432 / 383;
       128×64/8/3 396 / 393; 64×64/4/4 311 / 282 (tune_2026-11-27_c.json). Before
       that change: 128×128/8/2 355 (causal), 128×64/8/3 310, 128×128/4/2 260.
  D64, S4k causal, forward: 64×128/4/2 251; 128×128/4/2 243; 128×128/8/2 200.
  Backward (fwd+bwd, D128 S16k causal): dK/dV and dQ at 64×64/4 warps/2 stages 365;
       32×128 dK/dV tiles with 4 warps spill (50); 64×128 with 8 warps 236.
In interpret mode (CPU) small tiles keep the emulated grid cheap and exercise the
multi-tile logic on small test shapes.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.backend import KernelRequest
from pallas_kernels.triton.common import padded_head_dim


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    block_q: int = 128
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 3
    # dK/dV programs own a kv-block and walk q-blocks; dQ programs the reverse. Each
    # kernel gets metadata for its own tile shape.
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def metadata_tiles(self) -> dict[str, tuple[int, int]]:
        """(block_q, block_kv) of the block metadata each kernel walks."""
        return {"forward": (self.block_q, self.block_kv),
                "dkdv": (self.block_q_dkv, self.block_kv_dkv),
                "dq": (self.block_q_dq, self.block_kv_dq)}

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq",
                     "block_kv_dq"):
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


def default_config(request: KernelRequest, *, interpret: bool = False) -> TritonConfig:
    """Heuristic config per padded head dim (the tables above); small tiles in interpret
    mode."""
    return config_for_head_dim(padded_head_dim(request.head_dim), interpret=interpret)


def config_for_head_dim(head_dim: int, *, interpret: bool = False) -> TritonConfig:
    """The config of `default_config` for a padded head dim (other backends that borrow
    these kernels, e.g. the Mosaic GPU backend for calls with a bias, ask by head dim)."""
    if interpret:
        return TritonConfig(block_q=32, block_kv=32, block_q_dkv=16, block_kv_dkv=32,
                            block_q_dq=32, block_kv_dq=16)
    if head_dim <= 64:
        return TritonConfig(block_q=64, block_kv=128, num_warps=4, num_stages=2,
                            block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64,
                            num_warps_bwd=4, num_stages_bwd=2)
    if head_dim <= 128:
        return TritonConfig(block_q=128, block_kv=64, num_warps=4, num_stages=3,
                            block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64,
                            num_warps_bwd=4, num_stages_bwd=2)
    return TritonConfig(block_q=64, block_kv=32, num_warps=4, num_stages=2,
                        block_q_dkv=32, block_kv_dkv=32, block_q_dq=32, block_kv_dq=32,
                        num_warps_bwd=4, num_stages_bwd=1)


def supports(request: KernelRequest, *, interpret: bool) -> str | None:
    """None, or why these kernels cannot serve the request. Every mask, bias layout, soft
    cap, attention dropout, GQA ratio, dtype and length is served; compiled kernels need
    a CUDA GPU."""
    if not interpret and request.platform != "gpu":
        return (f"the Triton kernels need a CUDA GPU (platform is {request.platform!r}); "
                "pass interpret=True to run them in Pallas interpret mode")
    return None
