"""One attention case, forward+backward a few times, for a profiler: where the time of a
call goes (the kernels, a plan's layout changes and merge, the backward's preprocessing).

    ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        python3 benchmarks/case_profile.py "strided 256 causal" > kernels.csv
    ncu --clock-control none --kernel-name regex:mosaic --launch-skip 4 --launch-count 4 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy \
        python3 benchmarks/case_profile.py "local 256 causal" --engine plan_mosaic

Cases: strided_bench's (D128 B1 H16 at --seq tokens) and "bigbird" (issue 11's BigBird
mask, benchmarking/cases.py, at --seq tokens); engines: strided_bench's, but cudnn.

Each call is compiled and run twice first, then --calls more times (the ones to read);
every launch of a call is listed by ncu in order. Without a profiler the script prints
the median time of the forward and of the forward+backward, which locates the backward.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.strided_bench import IMPLEMENTATION, _functions, cases, window_cases  # noqa: E402
from jaxattn.planned import planning  # noqa: E402
from jaxattn.benchmarking.cases import BenchCase  # noqa: E402
from jaxattn.benchmarking.timing import time_call  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", help=f"one of {list(cases()) + list(window_cases())} or bigbird")
    p.add_argument("--engine", default="default", choices=list(IMPLEMENTATION),
                   help="strided_bench's engines (cudnn, which needs the dense mask, excepted)")
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--backward-only", action="store_true", help="run only forward+backward calls")
    args = p.parse_args(argv)
    if args.case == "bigbird":
        mask = BenchCase("bigbird", 1, 16, args.seq, 128, "bigbird").mask()
    else:
        mask = {**cases(), **window_cases(args.seq)}[args.case]
    b, n, s, d = 1, 16, args.seq, 128
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(x, (b, s, n, d), jnp.bfloat16) for x in ks)
    fwd, fwd_bwd = _functions(args.engine, mask)
    # The planner's switch is read while tracing ("today" is the plain tile walk).
    with planning(args.engine != "today"):
        fwd = jax.jit(fwd).lower(q, k, v).compile()
        fwd_bwd = jax.jit(fwd_bwd).lower(q, k, v, do).compile()
    for _ in range(2 + args.calls):
        if not args.backward_only:
            jax.block_until_ready(fwd(q, k, v))
        jax.block_until_ready(fwd_bwd(q, k, v, do))
    hlo = fwd_bwd.as_text()
    calls = sorted({line.split('custom_call_target="')[1].split('"')[0]
                    for line in hlo.splitlines() if 'custom_call_target="' in line})
    print("custom calls of the forward+backward:", calls, file=sys.stderr)
    if os.environ.get("NCU_PROFILING") is None:
        tf = time_call(fwd, [(q, k, v)]).median_s
        tfb = time_call(fwd_bwd, [(q, k, v, do)]).median_s
        print(f"{args.case}: forward {tf * 1e3:.3f} ms, forward+backward {tfb * 1e3:.3f} ms "
              f"(backward alone ~{(tfb - tf) * 1e3:.3f} ms)", file=sys.stderr)


if __name__ == "__main__":
    main()
