"""Named cases: the cases `jaxattn bench` measures and the methods `jaxattn compare` sweeps.

Bench cases are the ones BENCHMARKS.md reports beside cuDNN and XLA: head dim D 64 and
128, S = 1k, 4k, 16k, full and causal, with heads = 2048 / D and batch = 16384 / S (the same
token and width budget in every row, as in the FlashAttention papers); a causal sliding
window of 256 and 2048 keys at 32k tokens; and a BigBird-style block mask at 16k tokens.
Each case knows its jaxattn Mask (what our kernels get) and how
`jax.nn.dot_product_attention` expresses the same pairs (what the xla and cudnn baselines
get: is_causal, local_window_size, or a dense bool mask).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxattn import masks
from jaxattn.masks import Mask

from jaxattn.benchmarking import flops

# BigBird-style case: local window ±256 | 256 global tokens | 3 random 128-blocks per
# query block (seed 0) = 8.36% of pairs at S=16384 ("8.4 % of pairs" in BENCHMARKS.md).
BIGBIRD_WINDOW, BIGBIRD_GLOBAL, BIGBIRD_RANDOM_BLOCKS, BIGBIRD_BLOCK = 256, 256, 3, 128


@dataclasses.dataclass(frozen=True)
class BenchCase:
    name: str
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    pattern: str  # "full" | "causal" | "window" (causal, i - window <= j <= i) | "bigbird"
    window: int | None = None

    def mask(self) -> Mask:
        if self.pattern == "full":
            return masks.FullMask()
        if self.pattern == "causal":
            return masks.CausalMask()
        if self.pattern == "window":
            return masks.LocalMask(self.window, 0)
        if self.pattern == "bigbird":
            return masks.bigbird_mask(self.seq_len, window=BIGBIRD_WINDOW, num_global=BIGBIRD_GLOBAL,
                                      num_random_blocks=BIGBIRD_RANDOM_BLOCKS,
                                      block_size=BIGBIRD_BLOCK, seed=0)
        raise ValueError(f"unknown pattern {self.pattern!r}")

    def jax_nn_mask_args(self) -> tuple[dict, np.ndarray | None]:
        """(static keyword arguments, dense bool mask [1, 1, S, S] or None) that make
        jax.nn.dot_product_attention compute the same pairs. The dense mask is passed
        as a jit argument, never baked into the program as a constant."""
        if self.pattern == "full":
            return {}, None
        if self.pattern == "causal":
            return {"is_causal": True}, None
        if self.pattern == "window":
            return {"is_causal": True, "local_window_size": (self.window, 0)}, None
        dense = np.asarray(self.mask().to_dense(self.seq_len, self.seq_len))
        return {}, dense[None, None]

    def fraction(self) -> float:
        return flops.allowed_fraction(self.mask(), self.seq_len, self.seq_len)

    def flops(self, mode: str, fraction: float | None = None) -> float:
        return flops.attention_flops(batch=self.batch, heads=self.heads, q_len=self.seq_len,
                                     kv_len=self.seq_len, head_dim=self.head_dim, mask=self.mask(),
                                     mode=mode, fraction=fraction)


def _anchor_cases() -> tuple[BenchCase, ...]:
    out = []
    for d in (64, 128):
        for s in (1024, 4096, 16384):
            for pattern in ("full", "causal"):
                out.append(BenchCase(f"D{d} S{s} {pattern}", 16384 // s, 2048 // d, s, d, pattern))
    for w in (256, 2048):
        out.append(BenchCase(f"D128 S32768 B1 H16 causal window {w}", 1, 16, 32768, 128, "window", w))
    out.append(BenchCase("D128 S16384 B1 H16 bigbird", 1, 16, 16384, 128, "bigbird"))
    return tuple(out)


ANCHOR_CASES = _anchor_cases()

# The table of issue 11 (the Hopper kernels' goals) that takes jax.nn's structured mask
# arguments, shared by the benches that time it (benchmarks/mosaic_check.py adds BigBird
# and packed documents, which need a dense mask there).
HOPPER_GOAL_CASES = (
    BenchCase("D128 S16384 B1 H16 full", 1, 16, 16384, 128, "full"),
    BenchCase("D128 S16384 B1 H16 causal", 1, 16, 16384, 128, "causal"),
    BenchCase("D128 S1024 B16 H16 full", 16, 16, 1024, 128, "full"),
    BenchCase("D128 S32768 B1 H16 causal window 2048", 1, 16, 32768, 128, "window", 2048),
    BenchCase("D128 S32768 B1 H16 causal window 256", 1, 16, 32768, 128, "window", 256),
    BenchCase("D128 S131072 B1 H8 causal", 1, 8, 131072, 128, "causal"),
)
QUICK_CASE_NAMES = ("D128 S4096 full", "D128 S4096 causal", "D128 S32768 B1 H16 causal window 2048",
                    "D128 S16384 B1 H16 bigbird")

# Tiny versions of each pattern for `jaxattn bench --allow-cpu` (a smoke run, not a benchmark).
SMOKE_CASES = (
    BenchCase("smoke D32 S128 full", 1, 2, 128, 32, "full"),
    BenchCase("smoke D32 S128 causal", 1, 2, 128, 32, "causal"),
    BenchCase("smoke D32 S256 causal window 32", 1, 2, 256, 32, "window", 32),
)


def select_cases(spec: str | None, *, quick: bool = False, smoke: bool = False) -> tuple[BenchCase, ...]:
    """Cases whose name contains any of the comma-separated substrings of ``spec``
    (case-insensitive); all anchor cases when ``spec`` is None."""
    pool = SMOKE_CASES if smoke else ANCHOR_CASES
    if spec is None:
        if quick and not smoke:
            return tuple(c for c in pool if c.name in QUICK_CASE_NAMES)
        return pool
    wanted = [w.strip().lower() for w in spec.split(",") if w.strip()]
    chosen = tuple(c for c in pool if any(w in c.name.lower() for w in wanted))
    if not chosen:
        raise ValueError(f"no case matches {spec!r}; cases are: " + "; ".join(c.name for c in pool))
    return chosen


# ------------------------------------------------------------------------------------
# `jaxattn compare` methods: one attention pattern each, swept over the sequence length.
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PatternParams:
    window: int            # local window: keys i - window .. i + window
    num_global: int        # global tokens (longformer, bigbird)
    block_size: int        # bigbird random-block size
    random_blocks: int     # bigbird random blocks per query block
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class CompareMethod:
    name: str
    family: str            # "full" | "local" | "sparse" | "flash"
    description: str
    build: Callable[[int, PatternParams], Mask]
    scaling: str           # how its needed FLOPs grow with n: "n^2", "n*w", "n^2/w"


def _local(n, p):
    return masks.LocalMask(p.window, p.window)


def _longformer(n, p):
    return masks.longformer_mask(p.window, p.num_global)


def _bigbird(n, p):
    return masks.bigbird_mask(n, window=p.window, num_global=p.num_global,
                              num_random_blocks=p.random_blocks, block_size=p.block_size, seed=p.seed)


def _strided(n, p):
    return masks.LocalMask(p.window, p.window) | masks.StridedMask(p.window)


COMPARE_METHODS = {m.name: m for m in (
    CompareMethod("full", "full", "full attention, dense O(n²) jnp reference", lambda n, p: masks.FullMask(), "n^2"),
    CompareMethod("local", "local", "sliding window: keys i-w..i+w", _local, "n*w"),
    CompareMethod("longformer", "sparse", "window ±w | first g tokens global (Longformer)", _longformer, "n*w"),
    CompareMethod("bigbird", "sparse", "window ±w | g global | r random blocks per query block (BigBird)",
                  _bigbird, "n*w"),
    CompareMethod("strided", "sparse", "window ±w | every w-th key (Sparse Transformer, non-causal)",
                  _strided, "n^2/w"),
    CompareMethod("flash", "flash", "full attention, FlashAttention kernel (tiled, online softmax)",
                  lambda n, p: masks.FullMask(), "n^2"),
)}
