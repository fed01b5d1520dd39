"""Tile shapes and pipeline depth of the Mosaic GPU (Hopper) FlashAttention kernels.

Forward: a CTA owns ``block_q`` = 128 query rows, split between two consumer
warpgroups of 64 rows each (one wgmma M-tile each); a third warpgroup only issues TMA
copies. Both consumers walk the same tile list, so the forward metadata is built for
(block_q, block_kv). K/V tiles rotate through ``num_stages`` shared-memory slots.

Where the numbers come from (bf16, jax 0.11.2, one H200, 2026-11-29; raw JSON in
benchmarks/results/mosaic_fwd_2026-11-29_h200_*; the story in NOTES.md beside this file):

| head dim | block_q | block_kv | stages | source |
|---|---|---|---|---|
| 64, 128  | 128 | 128 | 2 | FA3 / tokamax sm90 defaults (2 x 64-row warpgroups, block_kv 128, 2 stages). A third stage at D128 (fits once no reduction scratch is reserved) measured no faster: D128 S16k full 552 vs 582 TFLOP/s, causal 538 vs 552, window 2048 407 vs 410 (run b) |
| 256      | 128 |  64 | 2 | shared memory: Q 64 KB + 2 x (K 32 KB + V 32 KB) = 192 KB of the 227 KB an sm90 CTA may use; block_kv 128 (or a third stage) does not fit |

``persistent`` (one CTA per SM looping over work items, Q double-buffered; forward.py)
is the default at head dims 64 and 128: on the H200 it was as fast or faster in every
case timed beside the one-CTA-per-item grid (same process; TFLOP/s median, back to back
in parentheses): D128 S16k full 584 (611) vs 558 (588), S1k B16 H16 265 (549) vs 246
(427), causal window 256 at S32k 146 (257) vs 135 (224), BigBird 230 (349) vs 222 (339);
cuDNN in that run 589 (619), 301 (501), 127 (211), 24 (25). Those items were dealt in
order; causal-like masks need a balanced deal (schedule.py: causal 16k ran at
391 in order, 546–552 balanced, cuDNN 503–548). Head dim 256 (one Q buffer, block_kv 64)
keeps the grid until it is timed.

``named_barriers`` (the consumers' turns through hardware named barriers instead of a
shared-memory mbarrier; consumer_turns.py) is off: on the H200 (2026-11-30) it passed
every value check and ran level with the default back to back (dense S16k 625 vs 624,
causal 621 vs 625, S1k 559 vs 573 TFLOP/s; NOTES.md beside this file).

Backward: this package's own dQ and dK/dV kernels (backward_kernels.py, their config
``MosaicBackwardConfig``; at head dim 256 the dK/dV warpgroups split the columns and
the dQ kernel runs one warpgroup, default_backward_config); for calls with a bias or a
dense mask operand (which those kernels do not read; the backend's default_config), the
backward is the Triton backend's, with the Triton config for that head dim.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.mosaic_gpu.backward_kernels import MosaicBackwardConfig, default_backward_config
from pallas_kernels.triton.config import TritonConfig

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
    # The consumers take turns through hardware named barriers (bar.sync / bar.arrive)
    # instead of a shared-memory mbarrier (consumer_turns.py); off until timed on a GPU.
    named_barriers: bool = False
    backward: MosaicBackwardConfig | TritonConfig = dataclasses.field(
        default_factory=MosaicBackwardConfig)
    # Masks that may leave unattended keys in PARTIAL tiles: check the inputs and take the
    # Triton forward on these tiles when they hold NaN/Inf (nonfinite_fallback.py). Off at
    # head dim 256, where such calls are refused (metadata_reason) instead.
    finite_check: bool = True

    def __post_init__(self):
        if self.block_q != ROWS_PER_WARPGROUP * CONSUMER_WARPGROUPS:
            raise ValueError(f"MosaicConfig.block_q must be {ROWS_PER_WARPGROUP * CONSUMER_WARPGROUPS} "
                             f"(two consumer warpgroups of {ROWS_PER_WARPGROUP} rows), got {self.block_q}.")
        if self.block_kv % 64 or self.block_kv <= 0:
            raise ValueError(f"MosaicConfig.block_kv must be a positive multiple of 64 (wgmma K "
                             f"of the P·V product), got {self.block_kv}.")
        if self.num_stages < 1:
            raise ValueError(f"MosaicConfig.num_stages must be >= 1, got {self.num_stages}.")
        for flag in ("named_barriers", "finite_check"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"MosaicConfig.{flag} must be a bool (True or False), got "
                                 f"{getattr(self, flag)!r}.")
        if not isinstance(self.backward, (MosaicBackwardConfig, TritonConfig)):
            raise ValueError("MosaicConfig.backward must be a MosaicBackwardConfig or a "
                             f"TritonConfig, got {type(self.backward).__name__}.")

    @property
    def triton_backward(self) -> bool:
        """True when the backward runs the Triton backend's kernels."""
        return isinstance(self.backward, TritonConfig)

    def metadata_tiles(self) -> dict[str, tuple[int, int]]:
        """(block_q, block_kv) of the block metadata each kernel walks."""
        backward = self.backward.metadata_tiles()
        return {"forward": (self.block_q, self.block_kv),
                "dkdv": backward["dkdv"], "dq": backward["dq"]}

    def smem_bytes(self, head_dim: int, itemsize: int, q_buffers: int = 1) -> int:
        """Shared memory of the forward kernel: q/out tiles, K and V slots, lse rows."""
        q = q_buffers * self.block_q * head_dim * itemsize
        kv = 2 * self.num_stages * self.block_kv * head_dim * itemsize
        return q + kv + self.block_q * 4 + 1024   # + barriers and alignment slack


def default_config(head_dim: int) -> MosaicConfig:
    """Config for a padded head dim (64, 128 or 256)."""
    if head_dim <= 128:
        return MosaicConfig(block_q=128, block_kv=128, num_stages=2, persistent=True,
                            backward=default_backward_config(head_dim))
    return MosaicConfig(block_q=128, block_kv=64, num_stages=2,
                        backward=default_backward_config(head_dim), finite_check=False)
