"""Where a training step stops being faster on the Hopper kernels than on cuDNN.

    python benchmarks/crossover_bench.py --out crossover.json [--lengths 1024 2048 ...]

Full and causal attention, bf16, B = 16384 / S sequences of S tokens (the same tokens per
call at every length), 2048 / D heads, for each head dim D of --head-dims: the forward
and the forward+backward step (jax.grad of a weighted sum) of
`jaxattn.dot_product_attention(..., implementation="pallas_mosaic_gpu")` and of
`jax.nn.dot_product_attention(..., implementation="cudnn")`, in one process on the same
inputs. The two engines are timed in interleaved rounds (--rounds rounds of --calls
waited-for calls each, engine after engine), so that a drift of the card's clock during
the run moves both alike; a row reports the median over the rounds of each round's median,
the spread of the round medians, and the time per call of --calls calls issued back to
back. The dispatch rule in jaxattn/implementations.py cites these rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn.benchmarking.cases import BenchCase  # noqa: E402
from jaxattn.benchmarking.timing import time_back_to_back, time_call  # noqa: E402

ENGINES = ("jaxattn", "cudnn")
TOKENS = 16384
WIDTH = 2048     # heads · head dim


def cases(lengths, head_dims, patterns):
    return [BenchCase(f"D{d} S{s} B{TOKENS // s} H{WIDTH // d} {p}", TOKENS // s, WIDTH // d, s, d, p)
            for d in head_dims for s in lengths for p in patterns]


def attention(engine, case):
    if engine == "jaxattn":
        mask = case.mask()
        return lambda q, k, v: jaxattn.dot_product_attention(q, k, v, mask=mask,
                                                             implementation="pallas_mosaic_gpu")
    kwargs, _ = case.jax_nn_mask_args()
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)


def compiled_steps(engine, case, inputs):
    """(forward, forward+backward) compiled for the case's inputs."""
    attn = attention(engine, case)
    q, k, v, do = inputs

    def loss(q, k, v, do):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    fwd = jax.jit(attn).lower(q, k, v).compile()
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, do).compile()
    return fwd, bwd


def measure(case, rounds, calls):
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (case.batch, case.seq_len, case.heads, case.head_dim)
    inputs = tuple(jax.random.normal(x, shape, jnp.bfloat16) for x in keys)
    steps = {e: compiled_steps(e, case, inputs) for e in ENGINES}
    args = {"fwd": [inputs[:3]], "fwd_bwd": [inputs]}
    flops = {"fwd": case.flops("forward"), "fwd_bwd": 3.5 * case.flops("forward")}
    medians = {(e, m): [] for e in ENGINES for m in args}
    for r in range(rounds):
        for e in ENGINES:
            for i, m in enumerate(args):
                t = time_call(steps[e][i], args[m], warmup=2 if r == 0 else 0, repeats=calls)
                medians[(e, m)].append(t.median_s)
    row = {"case": case.name, "batch": case.batch, "heads": case.heads, "seq_len": case.seq_len,
           "head_dim": case.head_dim, "pattern": case.pattern}
    for e in ENGINES:
        for i, m in enumerate(args):
            ts = medians[(e, m)]
            med = statistics.median(ts)
            b2b = time_back_to_back(steps[e][i], args[m], repeats=calls, warmup=0).per_call_s
            row[e + "_" + m] = {"ms": med * 1e3, "tflops": flops[m] / med / 1e12,
                                "round_tflops": [flops[m] / t / 1e12 for t in ts],
                                "b2b_tflops": flops[m] / b2b / 1e12}
    return row


def line(row):
    cells = []
    for m in ("fwd", "fwd_bwd"):
        a, c = row["jaxattn_" + m], row["cudnn_" + m]
        cells.append(f"{m} {a['tflops']:.0f} ({min(a['round_tflops']):.0f}-{max(a['round_tflops']):.0f}, "
                     f"b2b {a['b2b_tflops']:.0f}) vs cuDNN {c['tflops']:.0f} "
                     f"({min(c['round_tflops']):.0f}-{max(c['round_tflops']):.0f}, b2b {c['b2b_tflops']:.0f})")
    return f"{row['case']}: " + " | ".join(cells)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="*", default=[128])
    p.add_argument("--patterns", nargs="*", default=["full", "causal"], choices=["full", "causal"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10)
    a = p.parse_args(argv)
    for s in a.lengths:
        if s <= 0 or TOKENS % s:
            p.error(f"--lengths: each must divide {TOKENS}, got {s}")
    result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rounds": a.rounds, "calls": a.calls, "rows": []}
    for case in cases(a.lengths, a.head_dims, a.patterns):
        try:
            row = measure(case, a.rounds, a.calls)
            print(line(row), flush=True)
        except Exception as e:  # noqa: BLE001 - record the failure and go on
            row = {"case": case.name, "error": f"{type(e).__name__}: {e}"[:500]}
            print(case.name, row["error"], flush=True)
        result["rows"].append(row)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
