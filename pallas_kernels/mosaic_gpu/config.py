"""Tile shapes and pipeline depth of the Mosaic GPU (Hopper) FlashAttention forward.

A CTA owns ``block_q`` = 128 query rows, split between two consumer warpgroups of 64
rows each (one wgmma M-tile each); a third warpgroup only issues TMA copies. Both
consumers walk the same tile list, so the forward metadata is built for
(block_q, block_kv). K/V tiles rotate through ``num_stages`` shared-memory slots.

Where the numbers come from (bf16, jax 0.11.2):

| head dim | block_q | block_kv | stages | source |
|---|---|---|---|---|
| 64, 128  | 128 | 128 | 2 | FA3 / tokamax sm90 defaults (2 x 64-row warpgroups, block_kv 128, 2 stages); measured in NOTES.md |
| 256      | 128 |  64 | 2 | shared memory: q 64 KB + 2 x (K 32 KB + V 32 KB) = 192 KB of the 227 KB an sm90 CTA may use; block_kv 128 needs 320 KB |

The backward is, for now, the Triton backend's kernels (see ``forward.py``), so the
``dkdv`` and ``dq`` tiles are those of the Triton config for the same head dim.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.triton.config import TritonConfig
from pallas_kernels.triton.config import default_config as triton_default_config

# Rows of one consumer warpgroup: the M of one wgmma.
ROWS_PER_WARPGROUP = 64
CONSUMER_WARPGROUPS = 2
SMEM_BYTES = 227 * 1024       # what one sm90 CTA may allocate (checked at lowering too)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    block_q: int = 128
    block_kv: int = 128
    num_stages: int = 2
    persistent: bool = False      # one CTA per SM looping over work items (forward.py)
    backward: TritonConfig = dataclasses.field(default_factory=TritonConfig)

    def __post_init__(self):
        if self.block_q != ROWS_PER_WARPGROUP * CONSUMER_WARPGROUPS:
            raise ValueError(f"MosaicConfig.block_q must be {ROWS_PER_WARPGROUP * CONSUMER_WARPGROUPS} "
                             f"(two consumer warpgroups of {ROWS_PER_WARPGROUP} rows), got {self.block_q}.")
        if self.block_kv % 64 or self.block_kv <= 0:
            raise ValueError(f"MosaicConfig.block_kv must be a positive multiple of 64 (wgmma K "
                             f"of the P·V product), got {self.block_kv}.")
        if self.num_stages < 1:
            raise ValueError(f"MosaicConfig.num_stages must be >= 1, got {self.num_stages}.")

    def metadata_tiles(self) -> dict[str, tuple[int, int]]:
        """(block_q, block_kv) of the block metadata each kernel walks."""
        return {"forward": (self.block_q, self.block_kv),
                "dkdv": (self.backward.block_q_dkv, self.backward.block_kv_dkv),
                "dq": (self.backward.block_q_dq, self.backward.block_kv_dq)}

    def smem_bytes(self, head_dim: int, itemsize: int, q_buffers: int = 1) -> int:
        """Shared memory of the forward kernel: q/out tiles, K and V slots, lse rows."""
        q = q_buffers * self.block_q * head_dim * itemsize
        kv = 2 * self.num_stages * self.block_kv * head_dim * itemsize
        return q + kv + self.block_q * 4 + 1024   # + barriers and alignment slack


def default_config(head_dim: int) -> MosaicConfig:
    """Config for a padded head dim (64, 128 or 256)."""
    backward = triton_default_config(head_dim)
    if head_dim <= 128:
        return MosaicConfig(block_q=128, block_kv=128, num_stages=2, backward=backward)
    return MosaicConfig(block_q=128, block_kv=64, num_stages=2, backward=backward)
