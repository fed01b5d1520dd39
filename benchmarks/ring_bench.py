"""Ring attention (jaxattn.ring_attention) on the GPUs of one host: scaling, length, overlap.

    python benchmarks/ring_bench.py --out ring.json              # all local GPUs
    python benchmarks/ring_bench.py --out ring.json --max-devices 2
    python benchmarks/ring_bench.py --out smoke.json --smoke     # tiny sizes, 4 CPU devices

Three measurements, causal self-attention, B=1, N=K=16 heads, D=128, bfloat16, each a
jitted forward+backward step (jax.vjp of ring_attention with a fixed dO):

1. weak scaling: T = 32k tokens per GPU on 1, 2, 4, ... GPUs. Per-GPU attention work
   grows with P at fixed tokens per GPU (it is quadratic in T), so the efficiency is
   FLOP-normalised: TFLOP/s per GPU at P over TFLOP/s on 1 GPU (1 GPU = one plain
   dot_product_attention call). The raw times are recorded too.
2. longest causal sequence that trains: T doubles from 128k on all GPUs until a step
   fails (out of memory) or --max-seq; each length is timed with a few calls.
3. overlap at 32k tokens per GPU: the ring step vs the same local kernel calls without
   any communication (one [2c, 2c] causal block and P-1 full blocks, c = T/(2P): what
   zigzag gives each device, [2c, c] on device P-1 and [c, 2c] on device 0, both timed;
   the slower is the baseline, as the ring waits for its slowest device), and vs the
   K/V(+dK/dV) transfers alone. overlap_ratio = ring / local: 1.0 means communication
   is completely hidden.

FLOP model (jaxattn/benchmarking/flops.py): forward 4·B·N·T²·D·½ for causal, backward
2.5× forward, so a step is 3.5× forward. Times are medians after 2 warm-up calls
(jaxattn/benchmarking/timing.py). The implementation of the local blocks is "pallas_triton" when
registered (else cuDNN through jax.nn). A short table is printed last.

If overlap_ratio is well above 1 while comm_only_ms is small next to local_kernels_ms,
the transfers are being serialised with the kernels: rerun with
XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true and compare.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--max-devices", type=int, default=None, help="use at most this many GPUs")
    ap.add_argument("--tokens-per-gpu", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--start-seq", type=int, default=131072, help="first length of the longest-sequence search")
    ap.add_argument("--max-seq", type=int, default=4 * 1048576, help="stop the search here")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--long-repeats", type=int, default=3, help="timed calls per length in the search")
    ap.add_argument("--implementation", default=None, help="per-block implementation (default: best)")
    ap.add_argument("--skip", nargs="*", default=(), choices=("weak", "longest", "overlap"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on 4 simulated CPU devices")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke:  # must precede the jax import
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datetime  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn.benchmarking.timing import time_call  # noqa: E402

AXIS = "ctx"


def pick_implementation(requested):
    if requested is not None:
        return requested
    if jax.default_backend() != "gpu":
        return "reference"
    return "pallas_triton" if "pallas_triton" in jaxattn.available_implementations() else "cudnn"


def causal_step_flops(t, n, d, b=1):
    return 3.5 * 4 * b * n * t * t * d * 0.5


def _inputs(t, n, d, mesh=None, seed=0):
    """q, k, v, dO [1, T, N, D] bf16, generated directly in their shards (a 1M-token
    array does not fit one GPU before sharding)."""
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(None, AXIS))
    make = jax.jit(lambda key: jax.random.normal(key, (1, t, n, d), jnp.bfloat16),
                   out_shardings=sharding)
    return tuple(make(key) for key in jax.random.split(jax.random.key(seed), 4))


def ring_step(mesh, impl, layout="contiguous"):
    """Compiled fwd+bwd of causal ring attention (plain attention on a 1-device mesh).
    layout="zigzag": activations already in zigzag order (no permutation in or out)."""
    def attn(q, k, v):
        return jaxattn.ring_attention(q, k, v, is_causal=True, mesh=mesh, axis_name=AXIS,
                                      implementation=impl, sequence_layout=layout)

    def step(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return vjp(do)
    return jax.jit(step)


def local_blocks_step(impl, c, n, d, p, shape="2c x c"):
    """The kernel calls one device makes in a P-way zigzag causal ring, without the ring:
    a causal [2c, 2c] block and P-1 full blocks, each forward + backward. The full blocks
    are [2c, c] (both query chunks against the early K/V chunk: device P-1's steps) or,
    with shape="c x 2c", [c, 2c] (the late query chunk against both K/V chunks: device
    0's steps); devices between make some of each."""
    def attn(q, k, v, causal):
        return jaxattn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    def step(q, k, v, do):
        grads = []
        _, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, True), q, k, v)
        grads.append(vjp(do))
        for i in range(p - 1):
            # Distinct inputs per block (a cheap roll by i rows): identical slices would be
            # merged by XLA's common-subexpression elimination, and the baseline would then
            # time fewer blocks than the ring computes (seen: 120 ms for 4/3 of the work).
            qq, kk, vv, dd = (jnp.roll(x, i, axis=1) for x in (q, k, v, do))
            if shape == "2c x c":
                kk, vv = kk[:, i % 2 * c:(i % 2 + 1) * c], vv[:, i % 2 * c:(i % 2 + 1) * c]
            else:
                qq, dd = qq[:, c:], dd[:, c:]
            _, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, False), qq, kk, vv)
            grads.append(vjp(dd))
        return grads
    return jax.jit(step)


def comm_only_step(mesh, p):
    """The ring's transfers alone: P-1 hops of K/V (forward), P-1 of K/V plus P of the
    float32 dK/dV accumulators (backward)."""
    perm = [(i, (i + 1) % p) for i in range(p)]

    def body(k, v):
        for _ in range(p - 1):
            k, v = jax.lax.ppermute((k, v), AXIS, perm)
        dk, dv = k.astype(jnp.float32), v.astype(jnp.float32)
        for s in range(p):
            if s + 1 < p:
                k, v = jax.lax.ppermute((k, v), AXIS, perm)
            dk, dv = jax.lax.ppermute((dk, dv), AXIS, perm)
        return dk + k, dv + v
    spec = PartitionSpec(None, AXIS)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec),
                                 check_vma=False))


def _timed(fn, args, repeats):
    compiled = fn.lower(*args).compile()
    t = time_call(compiled, [args], repeats=repeats)
    return t.median_s


def weak_scaling(impl, counts, cfg, repeats):
    rows = []
    for p in counts:
        mesh = jax.make_mesh((p,), (AXIS,), devices=jax.devices()[:p])
        t = cfg["tokens_per_gpu"] * p
        args = _inputs(t, cfg["heads"], cfg["head_dim"], mesh)
        try:
            sec = _timed(ring_step(mesh, impl), args, repeats)
        except Exception as e:  # noqa: BLE001 - record and go on
            rows.append({"gpus": p, "seq_len": t, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        tflops = causal_step_flops(t, cfg["heads"], cfg["head_dim"]) / p / sec / 1e12
        rows.append({"gpus": p, "seq_len": t, "time_ms": sec * 1e3, "tflops_per_gpu": tflops})
        print(f"weak scaling: {p} GPU(s), T={t}: {sec * 1e3:.1f} ms, {tflops:.0f} TFLOP/s/GPU", flush=True)
    base = next((r for r in rows if r["gpus"] == 1 and "time_ms" in r), None)
    for r in rows:
        if base is not None and "time_ms" in r:
            r["efficiency_vs_1gpu"] = r["tflops_per_gpu"] / base["tflops_per_gpu"]
            r["time_ratio_vs_1gpu"] = r["time_ms"] / base["time_ms"]
    return rows


def longest(impl, p, cfg, repeats):
    mesh = jax.make_mesh((p,), (AXIS,), devices=jax.devices()[:p])
    tried, t = [], cfg["start_seq"]
    while t <= cfg["max_seq"]:
        try:
            args = _inputs(t, cfg["heads"], cfg["head_dim"], mesh)
            sec = _timed(ring_step(mesh, impl), args, repeats)
            tflops = causal_step_flops(t, cfg["heads"], cfg["head_dim"]) / p / sec / 1e12
            tried.append({"seq_len": t, "ok": True, "time_ms": sec * 1e3, "tflops_per_gpu": tflops})
            print(f"longest: T={t} on {p} GPU(s) trains: {sec * 1e3:.0f} ms/step", flush=True)
        except Exception as e:  # noqa: BLE001 - out of memory ends the search
            tried.append({"seq_len": t, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"longest: T={t} failed: {type(e).__name__}", flush=True)
            break
        finally:
            args = None
        t *= 2
    ok = [r["seq_len"] for r in tried if r["ok"]]
    return {"gpus": p, "max_seq_len": max(ok) if ok else None, "tried": tried}


def overlap(impl, p, cfg, repeats):
    t = cfg["tokens_per_gpu"] * p
    n, d = cfg["heads"], cfg["head_dim"]
    mesh = jax.make_mesh((p,), (AXIS,), devices=jax.devices()[:p])
    ring_s = _timed(ring_step(mesh, impl), _inputs(t, n, d, mesh), repeats)
    ring_zz_s = _timed(ring_step(mesh, impl, "zigzag"), _inputs(t, n, d, mesh), repeats)
    c = t // (2 * p)
    # The ring's step lasts as long as its slowest device's kernels: time both extremes.
    local = {shape: _timed(local_blocks_step(impl, c, n, d, p, shape), _inputs(2 * c, n, d), repeats)
             for shape in ("2c x c", "c x 2c")}
    local_s = max(local.values())
    kv = _inputs(t, n, d, mesh)[:2]
    comm_s = _timed(comm_only_step(mesh, p), kv, repeats)
    out = {"gpus": p, "seq_len": t, "ring_ms": ring_s * 1e3, "local_kernels_ms": local_s * 1e3,
           "local_kernels_2c_x_c_ms": local["2c x c"] * 1e3, "local_kernels_c_x_2c_ms": local["c x 2c"] * 1e3,
           "comm_only_ms": comm_s * 1e3, "overlap_ratio": ring_s / local_s,
           "ring_zigzag_layout_ms": ring_zz_s * 1e3, "overlap_ratio_zigzag_layout": ring_zz_s / local_s,
           "overlap_ratio_vs_2c_x_c": ring_s / local["2c x c"],
           "overlap_ratio_zigzag_layout_vs_2c_x_c": ring_zz_s / local["2c x c"]}
    print(f"overlap: ring {ring_s * 1e3:.1f} ms (zigzag layout in/out: {ring_zz_s * 1e3:.1f} ms), "
          f"local kernels {local_s * 1e3:.1f} ms (blocks [2c, c]: {local['2c x c'] * 1e3:.1f} ms, "
          f"[c, 2c]: {local['c x 2c'] * 1e3:.1f} ms), transfers alone {comm_s * 1e3:.1f} ms", flush=True)
    return out


def main(args):
    if args.smoke:
        args.tokens_per_gpu, args.heads, args.head_dim = 64, 2, 16
        args.start_seq, args.max_seq, args.repeats, args.long_repeats = 256, 512, 3, 1
    impl = pick_implementation(args.implementation)
    n_dev = len(jax.devices()) if args.max_devices is None else min(args.max_devices, len(jax.devices()))
    counts = [p for p in (1, 2, 4, 8, 16) if p <= n_dev]
    cfg = {"tokens_per_gpu": args.tokens_per_gpu, "heads": args.heads, "head_dim": args.head_dim,
           "dtype": "bfloat16", "batch": 1, "mask": "causal", "start_seq": args.start_seq,
           "max_seq": args.max_seq}
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device_kind": jax.devices()[0].device_kind, "num_devices": n_dev,
              "jax_version": jax.__version__, "implementation": impl, "config": cfg,
              "flop_model": "step = 3.5 x 4*B*N*T^2*D*0.5 (causal)"}

    sections = (("weak", lambda: weak_scaling(impl, counts, cfg, args.repeats)),
                ("overlap", lambda: overlap(impl, counts[-1], cfg, args.repeats) if counts[-1] > 1 else None),
                ("longest", lambda: longest(impl, counts[-1], cfg, args.long_repeats)))
    for name, run in sections:
        if name in args.skip:
            continue
        try:
            result[{"weak": "weak_scaling", "overlap": "overlap", "longest": "longest"}[name]] = run()
        except Exception:  # noqa: BLE001 - keep the other sections
            result[name + "_error"] = traceback.format_exc()[-2000:]
            print(result[name + "_error"], file=sys.stderr)
        with open(args.out, "w") as f:  # after every section: a crash keeps what was measured
            json.dump(result, f, indent=2)

    print(f"\nring attention, {impl}, causal, D{args.head_dim} H{args.heads} bf16, "
          f"{result['device_kind']} x{n_dev}")
    for r in result.get("weak_scaling", []):
        if "time_ms" in r:
            print(f"  weak  {r['gpus']} GPU  T={r['seq_len']:>8}  {r['time_ms']:9.1f} ms  "
                  f"{r['tflops_per_gpu']:6.0f} TFLOP/s/GPU  efficiency {r.get('efficiency_vs_1gpu', float('nan')):.2f}")
        else:
            print(f"  weak  {r['gpus']} GPU  T={r['seq_len']:>8}  failed: {r['error'][:80]}")
    ov = result.get("overlap")
    if ov:
        print(f"  overlap {ov['gpus']} GPU  ring {ov['ring_ms']:.1f} ms / local kernels "
              f"{ov['local_kernels_ms']:.1f} ms = {ov['overlap_ratio']:.2f}  (transfers alone "
              f"{ov['comm_only_ms']:.1f} ms)")
    lg = result.get("longest")
    if lg:
        print(f"  longest causal sequence that trains on {lg['gpus']} GPU(s): {lg['max_seq_len']}")
    print(f"  JSON: {args.out}")
    return result


if __name__ == "__main__":
    main(ARGS)
