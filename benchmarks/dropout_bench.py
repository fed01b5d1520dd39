"""What attention dropout costs: jaxattn's Triton kernels and cuDNN, each with and without
dropout, in one process.

    python3 benchmarks/dropout_bench.py --out results/dropout_bench.json

Cases: D128, B1, H16, T = S = 16384 (--seq), bf16, the full and the causal mask, forward
and forward+backward. Engines:
  pallas_triton  jaxattn.dot_product_attention(implementation="pallas_triton"), the
                 keep-mask regenerated per tile from a traced uint32 seed
  cudnn          jax._src.cudnn.fused_attention_stablehlo.dot_product_attention with
                 dropout_rate (jax.nn.dot_product_attention has no dropout argument;
                 rate 0 is the same call jax.nn's implementation="cudnn" makes)
each at dropout rate 0 and --rate (0.1). TFLOP/s count the allowed pairs' matmuls only
(forward 4·B·N·pairs·D, forward+backward 3.5× that), with or without dropout, so a
slower dropout run shows as fewer TFLOP/s. Times are medians of --repeats calls after 2
warm-ups (jaxattn.benchmarking.timing.time_call). An engine that cannot run (no cuDNN
on the CPU, a private jax path that moved) gives an error row, not a crash.

On a machine without a GPU the Triton kernels run in Pallas interpret mode: only a
smoke test (e.g. --seq 256 --repeats 1), the times mean nothing.
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

ENGINES = ("pallas_triton", "cudnn")
MASKS = ("full", "causal")
CUDNN_SEED = 42   # cuDNN's dropout seed is a static int


def _attention(engine, causal, rate):
    """attn(q, k, v, seed) -> out for one engine, mask and dropout rate."""
    if engine == "pallas_triton":
        def attn(q, k, v, seed):
            return jaxattn.dot_product_attention(q, k, v, is_causal=causal, dropout_rate=rate,
                                                 dropout_seed=seed, implementation="pallas_triton")
        return attn
    if engine == "cudnn":
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        def attn(q, k, v, seed):
            del seed
            mask_type = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
            return cudnn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                               mask_type=mask_type, seed=CUDNN_SEED,
                                               dropout_rate=rate, qkv_layout="BTNH")
        return attn
    raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}.")


def _functions(engine, causal, rate):
    """(fwd, fwd_bwd): fwd(q, k, v, seed) and the gradients of <out, dO> w.r.t. q, k, v."""
    attn = _attention(engine, causal, rate)

    def loss(q, k, v, seed, do):
        return jnp.sum(attn(q, k, v, seed).astype(jnp.float32) * do.astype(jnp.float32))
    return attn, jax.grad(loss, argnums=(0, 1, 2))


def run_case(mask, engine, rate, *, b, n, s, d, repeats, inputs):
    """One row: times and TFLOP/s of the forward and forward+backward, or an error."""
    causal = mask == "causal"
    pairs = s * (s + 1) // 2 if causal else s * s
    flops_fwd = 4 * b * n * pairs * d
    row = dict(mask=mask, engine=engine, dropout_rate=rate, b=b, n=n, s=s, d=d,
               allowed_pairs=pairs, flops_fwd=flops_fwd)
    t0 = time.perf_counter()
    q, k, v, do = inputs
    seed = jnp.uint32(1234)
    try:
        fwd, fwd_bwd = _functions(engine, causal, rate)
        fwd_c = jax.jit(fwd).lower(q, k, v, seed).compile()
        bwd_c = jax.jit(fwd_bwd).lower(q, k, v, seed, do).compile()
        tf = time_call(fwd_c, [(q, k, v, seed)], repeats=repeats).median_s
        tfb = time_call(bwd_c, [(q, k, v, seed, do)], repeats=repeats).median_s
        row.update(fwd_ms=tf * 1e3, fwd_bwd_ms=tfb * 1e3, fwd_tflops=flops_fwd / tf / 1e12,
                   fwd_bwd_tflops=3.5 * flops_fwd / tfb / 1e12)
    except Exception as e:  # noqa: BLE001 - an engine that cannot run here (no cuDNN, OOM)
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row["case_s"] = time.perf_counter() - t0
    return row


def _line(row):
    head = f"{row['mask']:6s} {row['engine']:13s} dropout {row['dropout_rate']:.2f}"
    if "error" in row:
        return f"{head} | error: {row['error'][:120]}"
    return (f"{head} | fwd {row['fwd_ms']:8.2f} ms {row['fwd_tflops']:6.1f} TFLOP/s"
            f" | fwd+bwd {row['fwd_bwd_ms']:8.2f} ms {row['fwd_bwd_tflops']:6.1f} TFLOP/s")


def _costs(rows):
    """Per (mask, engine): time with dropout / time without, forward and fwd+bwd."""
    by_key = {(r["mask"], r["engine"], r["dropout_rate"]): r for r in rows}
    costs = []
    for (mask, engine, rate), r in by_key.items():
        base = by_key.get((mask, engine, 0.0))
        if rate and base and "fwd_ms" in r and "fwd_ms" in base:
            costs.append(dict(mask=mask, engine=engine, dropout_rate=rate,
                              fwd_ratio=r["fwd_ms"] / base["fwd_ms"],
                              fwd_bwd_ratio=r["fwd_bwd_ms"] / base["fwd_bwd_ms"]))
    return costs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="dropout_bench.json", help="JSON file written after every row")
    p.add_argument("--seq", type=int, default=16384, help="T = S (default 16384)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rate", type=float, default=0.1, help="the dropout rate compared with 0")
    p.add_argument("--masks", nargs="*", default=list(MASKS), choices=MASKS)
    p.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    args = p.parse_args(argv)
    if not 0 < args.rate < 1:
        p.error(f"--rate: expected a rate in (0, 1), got {args.rate}.")
    b, n, s, d = args.batch, args.heads, args.seq, args.head_dim
    meta = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                date=datetime.date.today().isoformat(), jax=jax.__version__, b=b, n=n, s=s, d=d,
                dtype="bfloat16", repeats=args.repeats,
                interpret=jax.default_backend() != "gpu")
    ks = jax.random.split(jax.random.key(0), 4)
    inputs = tuple(jax.random.normal(x, (b, s, n, d), jnp.bfloat16) for x in ks)
    rows = []
    for mask in args.masks:
        for engine in args.engines:
            for rate in (0.0, args.rate):
                try:
                    row = run_case(mask, engine, rate, b=b, n=n, s=s, d=d, repeats=args.repeats,
                                   inputs=inputs)
                except Exception:  # noqa: BLE001 - keep the other rows
                    traceback.print_exc()
                    row = dict(mask=mask, engine=engine, dropout_rate=rate,
                               error=traceback.format_exc()[-500:])
                rows.append(row)
                print(_line(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump(dict(meta=meta, rows=rows, dropout_cost=_costs(rows)), f, indent=1)
    for c in _costs(rows):
        print(f"dropout cost {c['mask']:6s} {c['engine']:13s}: fwd ×{c['fwd_ratio']:.2f}, "
              f"fwd+bwd ×{c['fwd_bwd_ratio']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
