"""Decode attention on one GPU: jaxattn's flash-decoding kernel beside XLA and cuDNN.

    python3 benchmarks/decode_bench.py --out decode.json [--quick] [--tune]

Decoding is memory-bound, so the figure of merit is GB/s = bytes of K and V the call
must read / time (full-length rows: B · context · K · H · 2 bytes · 2 tensors; a window
of w keys counts w keys per row), next to the HBM's 4.8 TB/s on an H200.

Cases: D128, N32 with K8 (GQA) and K1 (MQA); B in {1, 8, 64}; context in {4k, 32k, 128k}
(combinations whose cache exceeds ~40 GB are skipped); contiguous and paged caches (pages
of 16 and 64 slots, scattered by a random page table); Tq = 1 and 4; plus a 4k sliding
window over a 128k cache beside a 4k cache. Baselines in the same process:
jax.nn.dot_product_attention(..., key_value_seq_lengths=lengths) with implementation "xla"
and "cudnn" (contiguous caches only; at Tq = 4 they let the 4 new tokens see each other,
which reads the same bytes).

Timing: every executable runs `inner` (<= 8) calls back to back (each on its own query,
so XLA cannot merge them; enough calls for ~2 ms of work, so launch overhead stays small)
on cache copies that together exceed the 50 MB L2 where they fit; the median over >= 20
executions after 2 warm-ups, divided by `inner`. A correctness
check against the float32 reference on small shapes runs first. --quick runs the cases
of the table in issue 12 (K8, Tq 1) plus the window case; --tune sweeps kernel configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import traceback

# This checkout's jaxattn, also when another copy is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn import masks as M  # noqa: E402
from jaxattn.benchmarking.timing import rotation_sets, time_call  # noqa: E402
from jaxattn.decode import kernel_decode, key_bounds  # noqa: E402
from pallas_kernels.triton.decode import (DecodeConfig, default_decode_config,  # noqa: E402
                                          default_num_splits, num_cores)

H, N = 128, 32
HBM_GBPS = 4800.0
MAX_CACHE_BYTES = 40e9
DTYPE = jnp.bfloat16
TARGET_EXEC_S = 2e-3   # work per timed execution, so dispatch overhead stays small...
MAX_INNER = 8          # ...with at most this many calls (each one is lowered separately)


def kv_bytes(b, keys, k):
    return 2 * b * keys * k * H * jnp.dtype(DTYPE).itemsize


# ------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------
def make_cache(key, b, ctx, k, layout):
    """(key_cache, value_cache, page_table or None); paged caches scatter each row's
    pages over the pool with a random permutation."""
    kk, kv, kp = jax.random.split(key, 3)
    if layout == "contiguous":
        shape = (b, ctx, k, H)
        table = None
    else:
        page = int(layout.removeprefix("paged"))
        pages_per_row = ctx // page
        shape = (b * pages_per_row, page, k, H)
        table = jax.random.permutation(kp, b * pages_per_row).reshape(b, pages_per_row).astype(jnp.int32)
    kc = jax.random.normal(kk, shape, DTYPE)
    vc = jax.random.normal(kv, shape, DTYPE)
    return kc, vc, table


def make_queries(key, inner, b, tq):
    return [jax.random.normal(k, (b, tq, N, H), DTYPE) for k in jax.random.split(key, inner)]


# ------------------------------------------------------------------------------------
# Implementations: f(q, kc, vc, lengths, table) -> out
# ------------------------------------------------------------------------------------
def jaxattn_fn(mask=None, num_splits=None, config=None):
    mask = M.FullMask() if mask is None else mask

    def f(q, kc, vc, lengths, table):
        return kernel_decode("pallas_triton", q, kc, vc, lengths, table, mask, scale=H ** -0.5,
                             logits_soft_cap=None, num_splits=num_splits, return_residuals=False,
                             config=config, interpret=jax.default_backend() != "gpu")   # CPU: a smoke run
    return f


def jax_nn_fn(implementation):
    def f(q, kc, vc, lengths, table):
        assert table is None
        return jax.nn.dot_product_attention(q, kc, vc, key_value_seq_lengths=lengths,
                                            implementation=implementation)
    return f


def time_impl(fn, queries, caches, lengths):
    """Seconds per call: one executable runs len(queries) calls, cache set i % len(caches)."""
    def many(qs, cs, lengths):
        return [fn(q, cs[i % len(cs)][0], cs[i % len(cs)][1], lengths, cs[i % len(cs)][2])
                for i, q in enumerate(qs)]
    compiled = jax.jit(many).lower(queries, caches, lengths).compile()
    timing = time_call(compiled, [(queries, caches, lengths)], warmup=2, repeats=20)
    return timing.median_s / len(queries), timing


# ------------------------------------------------------------------------------------
# Correctness first
# ------------------------------------------------------------------------------------
def correctness():
    """Worst row error of the kernel vs the float32 reference, bf16 inputs, small shapes."""
    rows = []
    b, tq_set = 3, (1, 4)
    key = jax.random.key(0)
    lengths = jnp.array([1000, 517, 3], jnp.int32)
    for k in (8, 1):
        for tq in tq_set:
            for layout, mask in (("contiguous", None), ("paged16", None), ("paged64", M.LocalMask(255, 0))):
                kc, vc, table = make_cache(key, b, 1024, k, layout)
                q = make_queries(key, 1, b, tq)[0]
                args = (q, kc, vc)
                want = jaxattn.decode_attention(*(x.astype(jnp.float32) for x in args), lengths=lengths,
                                                page_table=table, mask=mask, implementation="reference")
                got = jaxattn.decode_attention(*args, lengths=lengths, page_table=table, mask=mask,
                                               implementation="pallas_triton")
                err = jnp.max(jnp.abs(got.astype(jnp.float32) - want), axis=(1, 2, 3))
                base = jnp.max(jnp.abs(want.astype(DTYPE).astype(jnp.float32) - want), axis=(1, 2, 3))
                worst = float(jnp.max(err))
                ok = bool(jnp.all(err <= 2 * base + 2e-3)) and not bool(jnp.isnan(got).any())
                rows.append(dict(k=k, tq=tq, layout=layout, mask=repr(mask), worst_row_err=worst,
                                 bf16_rounding=float(jnp.max(base)), ok=ok))
                print(f"check K{k} Tq{tq} {layout:10s} {mask!r:40s} worst row err {worst:.2e} "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
    return rows


# ------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------
def cases(quick):
    out = []
    if quick:
        grid = [(8, 1, 32768), (8, 1, 131072), (8, 8, 4096), (8, 8, 131072), (8, 64, 32768)]
        tqs, layouts = (1,), ("contiguous", "paged16", "paged64")
    else:
        grid = [(k, b, c) for k in (8, 1) for b in (1, 8, 64) for c in (4096, 32768, 131072)]
        tqs, layouts = (1, 4), ("contiguous", "paged16", "paged64")
    for k, b, ctx in grid:
        if kv_bytes(b, ctx, k) > MAX_CACHE_BYTES:
            continue
        for tq in tqs:
            for layout in layouts:
                out.append(dict(k=k, b=b, ctx=ctx, tq=tq, layout=layout, window=None))
    # A 4k sliding window over a 128k cache should cost what a 4k cache costs.
    for ctx, window in ((4096, None), (131072, 4096)):
        out.append(dict(k=8, b=8, ctx=ctx, tq=1, layout="contiguous", window=window, tag="window"))
    return out


def run_case(case, impls, key, configs=None):
    k, b, ctx, tq, layout, window = (case[x] for x in ("k", "b", "ctx", "tq", "layout", "window"))
    keys = ctx if window is None else window
    nbytes = kv_bytes(b, keys, k)
    inner = int(min(MAX_INNER, max(1, math.ceil(TARGET_EXEC_S * HBM_GBPS * 1e9 / nbytes))))
    sets = min(inner, rotation_sets(kv_bytes(b, ctx, k), max_sets=MAX_INNER))
    caches = [make_cache(jax.random.fold_in(key, i), b, ctx, k, layout) for i in range(sets)]
    queries = make_queries(key, inner, b, tq)
    lengths = jnp.full((b,), ctx, jnp.int32)
    mask = None if window is None else M.LocalMask(window - 1, 0)
    rows = []
    todo = [(name, None) for name in impls]
    for cfg in configs or ():
        todo.append(("pallas_triton", cfg))
    for name, cfg in todo:
        if name in ("xla", "cudnn") and (layout != "contiguous" or window is not None):
            continue   # jax.nn takes no page table, and aligns a window with query position 0
        if name == "pallas_triton":
            config, splits = (None, None) if cfg is None else (cfg[0], cfg[1])
            fn = jaxattn_fn(mask, num_splits=splits, config=config)
        else:
            fn = jax_nn_fn(name)
        row = dict(case, impl=name, bytes=nbytes, inner=inner, input_sets=sets)
        if name == "pallas_triton":
            cfg_used = config or default_decode_config(max(16, tq * N // k), interpret=False)
            span = key_bounds(M.FullMask() if mask is None else mask).span(tq)
            tiles = -(-min(ctx, span or ctx) // cfg_used.block_kv)
            row.update(config=dataclasses.asdict(cfg_used),
                       num_splits=splits or default_num_splits(
                           b, k, tiles, cores=num_cores(jax.default_backend() != "gpu")))
        try:
            seconds, timing = time_impl(fn, queries, caches, lengths)
            row.update(median_ms=seconds * 1e3, gbps=nbytes / seconds / 1e9,
                       pct_hbm=100 * nbytes / seconds / 1e9 / HBM_GBPS, timing=timing.as_dict())
        except Exception as e:  # noqa: BLE001 - record and continue with the next one
            row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc(limit=2)
        rows.append(row)
        desc = f"{name}{'' if cfg is None else ' ' + str(cfg)}"
        print(f"K{k} B{b:<3d} ctx{ctx:>7d} Tq{tq} {layout:10s} w={window} {desc:45s} "
              + (f"{row['gbps']:8.0f} GB/s {row['median_ms']:.4f} ms" if "gbps" in row else row["error"][:80]),
              flush=True)
    del caches
    return rows


def table(rows):
    cols = ["pallas_triton/contiguous", "pallas_triton/paged16", "pallas_triton/paged64",
            "xla/contiguous", "cudnn/contiguous"]
    grouped = {}
    for r in rows:
        if r.get("tuned"):
            continue
        key = (r["k"], r["b"], r["ctx"], r["tq"], r["window"])
        grouped.setdefault(key, {})[f"{r['impl']}/{r['layout']}"] = r.get("gbps")
    lines = ["| K | B | context | Tq | window | " + " | ".join(cols) + " |",
             "|---|---|---|---|---|" + "---|" * len(cols)]
    for (k, b, ctx, tq, window), vals in grouped.items():
        cells = [("n/a" if vals.get(c) is None else f"{vals[c]:.0f}") if c in vals else "-" for c in cols]
        lines.append(f"| {k} | {b} | {ctx // 1024}k | {tq} | {window or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TUNE_CONFIGS = [(DecodeConfig(bk, w, st), None) for bk in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="write the JSON results here")
    p.add_argument("--quick", action="store_true", help="the issue's table cases only")
    p.add_argument("--tune", action="store_true",
                   help="also sweep DecodeConfig (block_kv, warps, stages) on three cases")
    p.add_argument("--impls", nargs="*", default=["pallas_triton", "cudnn", "xla"])
    p.add_argument("--budget-s", type=float, default=225.0,
                   help="start no new case after this many seconds (the rest is recorded as skipped)")
    p.add_argument("--skip-check", action="store_true")
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    meta = dict(device=str(dev.device_kind), cores=num_cores(jax.default_backend() != "gpu"), jax=jax.__version__,
                date=datetime.date.today().isoformat(), dtype=str(jnp.dtype(DTYPE)), head_dim=H,
                num_heads=N, hbm_gbps=HBM_GBPS, argv=sys.argv[1:])
    print(f"decode_bench on {meta['device']} ({meta['cores']} SMs), jax {jax.__version__}", flush=True)
    start = time.perf_counter()
    result = dict(meta=meta, check=[] if args.skip_check else correctness(), rows=[], skipped=[])
    key = jax.random.key(1)
    plan = cases(args.quick)
    if args.tune:
        for tq in (1, 4):
            for b, ctx in ((1, 32768), (8, 4096), (64, 32768)):
                plan.append(dict(k=8, b=b, ctx=ctx, tq=tq, layout="contiguous", window=None, tag="tune",
                                 configs=TUNE_CONFIGS))
    for case in plan:
        if time.perf_counter() - start > args.budget_s:
            result["skipped"].append({k: v for k, v in case.items() if k != "configs"})
            continue
        configs = case.pop("configs", None)
        impls = [] if configs else args.impls
        rows = run_case(case, impls, key, configs)
        for r in rows:
            r["tuned"] = bool(configs)
        result["rows"] += rows
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    result["wall_s"] = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print()
    print("GB/s (bytes of K and V read / median time):")
    print(table(result["rows"]))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} cases past --budget-s {args.budget_s}")
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
