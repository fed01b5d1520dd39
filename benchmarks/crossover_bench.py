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
back. The engines and inputs are tokamax_bench.py's (--engines: jaxattn and cudnn by
default; triton_backward adds the Hopper forward with the Triton backward,
duplicated_products the head-dim-256 backward with both products in both dK/dV
warpgroups). The dispatch rule in jaxattn/implementations.py cites these rows.
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

from benchmarks.tokamax_bench import OPTIONAL_ENGINES, attention, make_inputs  # noqa: E402
from jaxattn.benchmarking.cases import BenchCase  # noqa: E402
from jaxattn.benchmarking.timing import time_back_to_back, time_interleaved  # noqa: E402

ENGINES = ("jaxattn", "cudnn")
TOKENS = 16384
WIDTH = 2048     # heads · head dim
MODES = {"fwd": "forward", "fwd_bwd": "forward_and_vjp"}


def cases(lengths, head_dims, patterns):
    return [BenchCase(f"D{d} S{s} B{TOKENS // s} H{WIDTH // d} {p}", TOKENS // s, WIDTH // d, s, d, p)
            for d in head_dims for s in lengths for p in patterns]


def compiled_steps(engine, case, inputs):
    """{mode: (compiled function, its arguments)}: the forward and the forward+backward
    (jax.grad of a weighted sum) of the engine (tokamax_bench.attention's "jaxattn":
    the Hopper kernels; "cudnn": jax.nn's cuDNN) on the case's inputs."""
    attn, mask_args = attention(engine, case)
    q, k, v, do = inputs

    def loss(q, k, v, do, *mask_args):
        return jnp.sum(attn(q, k, v, *mask_args).astype(jnp.float32) * do.astype(jnp.float32))
    fwd_args, bwd_args = (q, k, v, *mask_args), (q, k, v, do, *mask_args)
    return {"fwd": (jax.jit(attn).lower(*fwd_args).compile(), fwd_args),
            "fwd_bwd": (jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*bwd_args).compile(), bwd_args)}


def measure(case, rounds, calls, engines=ENGINES):
    inputs = make_inputs(case)
    steps = {e: compiled_steps(e, case, inputs) for e in engines}
    entries = [(e, m) for e in engines for m in MODES]
    medians = time_interleaved([steps[e][m] for e, m in entries], rounds=rounds, repeats=calls)
    row = {"case": case.name, "batch": case.batch, "heads": case.heads, "seq_len": case.seq_len,
           "head_dim": case.head_dim, "pattern": case.pattern}
    for (e, m), ts in zip(entries, medians):
        flops = case.flops(MODES[m])
        med = statistics.median(ts)
        fn, args = steps[e][m]
        b2b = time_back_to_back(fn, [args], repeats=calls, warmup=0).per_call_s
        row[e + "_" + m] = {"ms": med * 1e3, "tflops": flops / med / 1e12,
                            "round_tflops": [flops / t / 1e12 for t in ts],
                            "b2b_tflops": flops / b2b / 1e12}
    return row


def line(row, engines=ENGINES):
    cells = []
    for m in ("fwd", "fwd_bwd"):
        parts = []
        for e in engines:
            a = row[e + "_" + m]
            parts.append(f"{e} {a['tflops']:.0f} ({min(a['round_tflops']):.0f}-"
                         f"{max(a['round_tflops']):.0f}, b2b {a['b2b_tflops']:.0f})")
        cells.append(f"{m} " + " vs ".join(parts))
    return f"{row['case']}: " + " | ".join(cells)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="*", default=[128])
    p.add_argument("--patterns", nargs="*", default=["full", "causal"], choices=["full", "causal"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--engines", nargs="*", default=list(ENGINES),
                   choices=["jaxattn", "cudnn", *OPTIONAL_ENGINES])
    a = p.parse_args(argv)
    for s in a.lengths:
        if s <= 0 or TOKENS % s:
            p.error(f"--lengths: each must divide {TOKENS}, got {s}")
    result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rounds": a.rounds, "calls": a.calls, "rows": []}
    for case in cases(a.lengths, a.head_dims, a.patterns):
        try:
            row = measure(case, a.rounds, a.calls, tuple(a.engines))
            print(line(row, tuple(a.engines)), flush=True)
        except Exception as e:  # noqa: BLE001 - record the failure and go on
            row = {"case": case.name, "error": f"{type(e).__name__}: {e}"[:500]}
            print(case.name, row["error"], flush=True)
        result["rows"].append(row)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
