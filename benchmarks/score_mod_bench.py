"""score_mod and sinks on the GPU: their cost next to the plain kernel, the bias= path and
cuDNN, in one process.

    python3 benchmarks/score_mod_bench.py --out benchmarks/results/score_mod_bench.json

Shape: D128, B1, N16 (K16), S = T = --seq (default 16384), causal, bf16. Cases:
  plain            jaxattn pallas_triton, causal
  alibi_score_mod  + score_mod=jaxattn.alibi(slopes): s + slopes[n]·(j − i) inside the tiles
  alibi_float_distance  the same with the position vectors converted to float before
                   they meet (kv_pos.astype(f32) − q_pos.astype(f32)): one float subtract per
                   score instead of the recipe's int subtract and conversion (an A/B of the
                   recipe's form; the H200 measured no difference)
  alibi_learned    the same with the slopes differentiated too (forward+backward only
                   differs: the dK/dV kernel also sums d slopes)
  alibi_bias_row   + bias [1, N, 1, S] = slopes[n]·j. Equal outputs to ALiBi (the −slopes[n]·i
                   part is constant along a row, and softmax ignores it; the lse differs by
                   it): the cheapest honest bias= form of ALiBi at full length
  alibi_bias_dense + bias [1, N, T, S] = slopes[n]·(j − i), the general bias= path. At 16k
                   that bias alone is N·T·S·2 B = 8 GB in bf16, so it runs at
                   --dense-bias-seq (default 4096) and its row says which S it used
  sinks            + sinks=[N] (learned: differentiated in forward+backward)
  cudnn            jax.nn.dot_product_attention(implementation="cudnn", is_causal=True):
                   the baseline
TFLOP/s count the allowed (causal) pairs: forward 4·B·N·T·S·D·density with density
(S+1)/(2S), forward+backward 3.5× that. Times are medians of --repeats calls after 2
warm-ups (jaxattn.benchmarking.timing.time_call), one input set (at 16k the inputs exceed
the L2). One line per case is printed and all rows are written as JSON to --out.

On a machine without a GPU, the jaxattn cases run the kernels in Pallas interpret mode
(slow: use e.g. --seq 256 --repeats 2 to check that the script runs) and cuDNN reports
an error row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

# This checkout's jaxattn, also when another copy is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn.benchmarking.timing import time_call  # noqa: E402

CASES = ("plain", "alibi_score_mod", "alibi_float_distance", "alibi_learned", "alibi_bias_row", "alibi_bias_dense", "sinks",
         "cudnn")


def _alibi_float_distance(score, batch, head, q_pos, kv_pos, slopes):
    """ALiBi with the position vectors converted before they meet (the A/B case)."""
    distance = kv_pos.astype(score.dtype) - q_pos.astype(score.dtype)
    return score + slopes[head].astype(score.dtype) * distance


def _attention(case, n, s):
    """(attention fn of (q, k, v, extra), extra arrays, which extras are differentiated)."""
    slopes = jnp.asarray(jaxattn.alibi_slopes(n))
    kernel = dict(is_causal=True, implementation="pallas_triton")
    if case == "plain":
        return (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, **kernel)), (), False
    if case == "alibi_float_distance":
        mod = jaxattn.ScoreMod(_alibi_float_distance, slopes)
        return (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, score_mod=mod, **kernel)), (), False
    if case in ("alibi_score_mod", "alibi_learned"):
        def attn(q, k, v, slopes):
            return jaxattn.dot_product_attention(q, k, v, score_mod=jaxattn.alibi(slopes), **kernel)
        return attn, (slopes,), case == "alibi_learned"
    if case in ("alibi_bias_row", "alibi_bias_dense"):
        j = jnp.arange(s, dtype=jnp.float32)
        if case == "alibi_bias_row":
            bias = (slopes[:, None, None] * j[None, None, :])[None]                       # [1, N, 1, S]
        else:
            bias = (slopes[:, None, None] * (j[None, None, :] - j[None, :, None]))[None]  # [1, N, T, S]
        bias = bias.astype(jnp.bfloat16)
        return (lambda q, k, v, bias: jaxattn.dot_product_attention(q, k, v, bias, **kernel)), (bias,), False
    if case == "sinks":
        sinks = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)
        return (lambda q, k, v, sinks: jaxattn.dot_product_attention(q, k, v, sinks=sinks, **kernel)), \
            (sinks,), True
    if case == "cudnn":
        return (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                             implementation="cudnn")), (), False
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def compile_case(case, *, b, n, s, d):
    """(row, timers): the case's compiled forward and forward+backward and their inputs,
    or a row with an error (no GPU for cuDNN, out of memory)."""
    density = (s + 1) / (2 * s)
    flops_fwd = 4 * b * n * s * s * d * density
    row = dict(case=case, b=b, n=n, s=s, d=d, causal=True, dtype="bfloat16", density=density,
               flops_fwd=flops_fwd)
    try:
        attn, extra, extra_grad = _attention(case, n, s)
        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v, do = (jax.random.normal(x, (b, s, n, d), jnp.bfloat16) for x in ks)

        def loss(q, k, v, *rest):
            *extra, do = rest
            return jnp.sum(attn(q, k, v, *extra).astype(jnp.float32) * do.astype(jnp.float32))
        argnums = (0, 1, 2) + tuple(range(3, 3 + len(extra)) if extra_grad else ())
        fwd_c = jax.jit(attn).lower(q, k, v, *extra).compile()
        bwd_c = jax.jit(jax.grad(loss, argnums=argnums)).lower(q, k, v, *extra, do).compile()
        row["differentiated_extras"] = bool(extra_grad)
        return row, ((fwd_c, (q, k, v, *extra)), (bwd_c, (q, k, v, *extra, do)))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row, None


def time_round(row, timers, repeats):
    """One measurement of both directions; appends the medians to the row's per-round lists."""
    (fwd_c, fwd_args), (bwd_c, bwd_args) = timers
    row.setdefault("fwd_ms_rounds", []).append(time_call(fwd_c, [fwd_args], repeats=repeats).median_s * 1e3)
    row.setdefault("fwd_bwd_ms_rounds", []).append(time_call(bwd_c, [bwd_args], repeats=repeats).median_s * 1e3)
    # The row's time is the median over rounds (each round is a median of `repeats` calls).
    row["fwd_ms"] = float(sorted(row["fwd_ms_rounds"])[len(row["fwd_ms_rounds"]) // 2])
    row["fwd_bwd_ms"] = float(sorted(row["fwd_bwd_ms_rounds"])[len(row["fwd_bwd_ms_rounds"]) // 2])
    row["fwd_tflops"] = row["flops_fwd"] / row["fwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = 3.5 * row["flops_fwd"] / row["fwd_bwd_ms"] / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="score_mod_bench.json", help="JSON file for all rows")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES, metavar="CASE",
                   help=f"cases to run (default all): {', '.join(CASES)}")
    p.add_argument("--seq", type=int, default=16384, help="T = S")
    p.add_argument("--dense-bias-seq", type=int, default=4096,
                   help="T = S for alibi_bias_dense (a dense [1, N, T, S] bias is 8 GB at 16k)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every case this many times, interleaved; report the median round")
    args = p.parse_args(argv)
    meta = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                date=datetime.date.today().isoformat(), jax=jax.__version__, b=args.batch,
                n=args.heads, d=args.head_dim, seq=args.seq, dense_bias_seq=args.dense_bias_seq,
                dtype="bfloat16", causal=True, rounds=args.rounds, repeats=args.repeats)
    compiled = []
    for case in args.cases:
        s = min(args.seq, args.dense_bias_seq) if case == "alibi_bias_dense" else args.seq
        t0 = time.perf_counter()
        compiled.append((*compile_case(case, b=args.batch, n=args.heads, s=s, d=args.head_dim), t0))
    rows = [row for row, _, _ in compiled]
    # Rounds interleave the cases, so a slow stretch of the machine touches every case alike.
    for r in range(args.rounds):
        for row, timers, t0 in compiled:
            if timers is None:
                if r == 0:
                    print(f"{row['case']:18s} S={row['s']:6d}  error: {row.get('error', '?')[:120]}", flush=True)
                continue
            try:
                time_round(row, timers, args.repeats)
            except Exception:
                traceback.print_exc()
                row["error"] = traceback.format_exc()[-500:]
                continue
            print(f"round {r} {row['case']:18s} S={row['s']:6d}  fwd {row['fwd_ms_rounds'][-1]:8.3f} ms | "
                  f"fwd+bwd {row['fwd_bwd_ms_rounds'][-1]:8.3f} ms", flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    for row in rows:
        if "fwd_tflops" in row:
            print(f"{row['case']:18s} S={row['s']:6d}  fwd {row['fwd_ms']:8.3f} ms {row['fwd_tflops']:6.1f} "
                  f"TFLOP/s | fwd+bwd {row['fwd_bwd_ms']:8.3f} ms {row['fwd_bwd_tflops']:6.1f} TFLOP/s "
                  f"(median of {len(row['fwd_ms_rounds'])} rounds)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
