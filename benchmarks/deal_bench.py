"""The Hopper kernels' persistent deal on long causal calls: item order against time and clocks.

    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,\
clocks_throttle_reasons.active --format=csv -lms 200 > clocks.csv &
    PYTHONPATH=$PWD python3 benchmarks/deal_bench.py --out deal.json

Engines, each compiled once (the deal is chosen at trace time):
  heads_fastest  the snake numbering heads fastest (the deal before q_fastest existed);
  q_fastest      the snake numbering q-blocks fastest (schedule.Schedule.q_fastest), so
                 the CTAs of a round walk one head's K/V together;
  cudnn          jax.nn.dot_product_attention(implementation="cudnn", is_causal=True).
Each case is timed in interleaved rounds (every engine once per round, forward then
forward+backward; medians of --repeats waited-for calls per round), so a drift of the
card's clock moves every engine alike. Every phase's wall-clock start and end is saved,
so a clock log taken beside the run (above) can be matched to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxattn.benchmarking.cases import BenchCase  # noqa: E402
from jaxattn.benchmarking.timing import time_call  # noqa: E402
from pallas_kernels.mosaic_gpu import schedule  # noqa: E402
from tokamax_bench import attention, make_inputs, max_abs_diff  # noqa: E402

CASES = {
    "causal32k": BenchCase("D128 S32768 B1 H16 causal", 1, 16, 32768, 128, "causal"),
    "causal128k": BenchCase("D128 S131072 B1 H8 causal", 1, 8, 131072, 128, "causal"),
    "causal512k": BenchCase("D128 S524288 B1 H8 causal", 1, 8, 524288, 128, "causal"),
}
ENGINES = ("heads_fastest", "q_fastest", "cudnn")


def compile_engine(engine, case, inputs):
    """(forward, forward+backward) compiled for one engine; the deal is fixed while they trace."""
    attn, _ = attention("cudnn" if engine == "cudnn" else "jaxattn", case)
    q, k, v, do = inputs

    def loss(q, k, v, do):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

    saved = schedule.SNAKE_Q_FASTEST_FROM_BLOCKS
    schedule.SNAKE_Q_FASTEST_FROM_BLOCKS = 0 if engine == "q_fastest" else None
    try:
        fwd = jax.jit(attn).lower(q, k, v).compile()
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, do).compile()
    finally:
        schedule.SNAKE_Q_FASTEST_FROM_BLOCKS = saved
    return fwd, bwd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="deal_bench.json")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-backward", action="store_true")
    args = p.parse_args(argv)
    payload = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   rounds=args.rounds, repeats=args.repeats, cases={})
    for name in args.cases:
        case = CASES[name]
        inputs = make_inputs(case)
        q, k, v, do = inputs
        flops = case.flops("forward")
        compiled = {e: compile_engine(e, case, inputs) for e in args.engines}
        outs = {e: compiled[e][0](q, k, v) for e in args.engines}
        first = args.engines[0]
        row = dict(case=case.name, flops_forward=flops, phases=[],
                   max_abs_diff_vs_first={e: float(max_abs_diff(outs[e], outs[first]))
                                          for e in args.engines})
        del outs
        times = {e: {"fwd": [], "fwd_bwd": []} for e in args.engines}
        for r in range(args.rounds):
            for e in args.engines:
                fwd, bwd = compiled[e]
                modes = [("fwd", fwd, (q, k, v))]
                if not args.no_backward:
                    modes.append(("fwd_bwd", bwd, (q, k, v, do)))
                for mode, fn, call_args in modes:
                    start = time.time()
                    t = time_call(fn, [call_args], warmup=1 if r == 0 else 0,
                                  repeats=args.repeats).median_s
                    row["phases"].append(dict(round=r, engine=e, mode=mode, start=start, end=time.time()))
                    times[e][mode].append(t)
            print(name, "round", r, {e: {m: [f"{x * 1e3:.1f}" for x in v] for m, v in d.items()}
                                     for e, d in times.items()}, flush=True)
        row["engines"] = {
            e: dict(fwd_ms=[x * 1e3 for x in d["fwd"]], fwd_bwd_ms=[x * 1e3 for x in d["fwd_bwd"]],
                    fwd_tflops=[flops / x / 1e12 for x in d["fwd"]],
                    fwd_bwd_tflops=[3.5 * flops / x / 1e12 for x in d["fwd_bwd"]])
            for e, d in times.items()}
        payload["cases"][name] = row
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        for e, d in row["engines"].items():
            print(f"{case.name} {e}: fwd {['%.0f' % x for x in d['fwd_tflops']]} "
                  f"fwd+bwd {['%.0f' % x for x in d['fwd_bwd_tflops']]}", flush=True)
        del compiled, inputs, q, k, v, do
    return 0


if __name__ == "__main__":
    sys.exit(main())
