"""One decode step per cache layout, for a profiler: the kernel alone, a few times.

    ncu --clock-control none --kernel-name regex:jaxattn_flash_decode --launch-skip 2 \
        --launch-count 3 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy \
        python3 benchmarks/decode_profile.py contiguous paged16 paged64

Every kernel of a step, to see what a step costs besides the attention kernel (the
layout changes and the split merge around it; cuDNN's and XLA's steps for comparison):

    ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        python3 benchmarks/decode_profile.py contiguous --batch 1 --context 32768 --impl cudnn

Shape: D128, N32, K = --kv-heads (8; 1 is MQA), Tq = --tq (1), B = --batch (8), context =
--context (131072), bf16, every row full; the kernel config and split count are the defaults. Each layout runs 5 times
(compile and warm-up first), so `--launch-skip 2 --launch-count 3` profiles the same
launches of each layout's kernel when layouts are profiled one per process.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxattn.benchmarking import decode as D  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("layouts", nargs="+", help="contiguous, paged16, paged64, ...")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--tq", type=int, default=1, help="new tokens per row")
    p.add_argument("--impl", default="pallas_triton",
                   help="pallas_triton, cudnn or xla (the last two: contiguous caches only)")
    args = p.parse_args(argv)
    for layout in args.layouts:
        case = D.DecodeCase(args.kv_heads, args.batch, args.context, args.tq, layout)
        kc, vc, table = D.make_cache(jax.random.key(0), case, jnp.bfloat16)
        q = jax.random.normal(jax.random.key(1), (case.batch, case.tq, case.num_heads, case.head_dim), jnp.bfloat16)
        lengths = jnp.full((case.batch,), case.context, jnp.int32)
        fn = jax.jit(D.decode_fn(args.impl, case))
        for _ in range(5):
            out = jax.block_until_ready(fn(q, kc, vc, lengths, table))
        print(layout, case.name, float(jnp.abs(out.astype(jnp.float32)).sum()), flush=True)
        del kc, vc, table


if __name__ == "__main__":
    sys.exit(main())
