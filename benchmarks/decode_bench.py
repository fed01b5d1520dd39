"""Decode attention on one GPU: jaxattn's flash-decoding kernel beside XLA and cuDNN.

    python3 benchmarks/decode_bench.py --out decode.json [--quick] [--tune]

The engine (cases, bytes model, timing with chained steps) is jaxattn/benchmarking/decode.py,
which `jaxattn bench --decode` runs too; this script adds a correctness check against the
float32 reference on small shapes, the whole case grid, and a kernel-config sweep.

Cases: D128 (see --head-dims), N32 with K8 (GQA) and K1 (MQA); B in {1, 8, 64}; context in {4k, 32k, 128k}
(combinations whose cache exceeds ~40 GB are skipped); contiguous and paged caches (pages
of 16 and 64 slots, scattered by a random page table); Tq = 1 and 4; plus a 4k sliding
window over a 128k cache beside a 4k cache. Baselines in the same process:
jax.nn.dot_product_attention(..., key_value_seq_lengths=lengths) with implementation "xla"
and "cudnn" (contiguous caches only; at Tq = 4 they let the 4 new tokens see each other,
which reads the same bytes). --quick runs the cases of the table in issue 12 (K8, Tq 1)
plus the window case; --tune sweeps kernel configs. --head-dims 96 128 runs every selected
case at both head dims (D96 is tiled as 128 columns on chip, K/V read in place with a column
mask), e.g. D96 against D128 and cuDNN at 1 x 32k and 8 x 32k:

    python3 benchmarks/decode_bench.py --out decode_h96.json --head-dims 96 128 \
        --match '^K8 B(1|8) ctx 32k Tq1 contiguous( H96)?$'
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import time

# This checkout's jaxattn, also when another copy is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn import masks as M  # noqa: E402
from jaxattn.benchmarking import decode as D  # noqa: E402
from jaxattn.decode import kernel_decode  # noqa: E402
from pallas_kernels.triton.decode import DecodeConfig, num_cores  # noqa: E402

DTYPE = jnp.bfloat16


def tuned_fn(case, config, num_splits):
    """The Triton decode kernel with an explicit config (for --tune)."""
    def f(q, kc, vc, lengths, table):
        return kernel_decode("pallas_triton", q, kc, vc, lengths, table, M.FullMask() if case.mask() is None else case.mask(),
                             scale=case.head_dim ** -0.5, logits_soft_cap=None, num_splits=num_splits,
                             return_residuals=False, config=config,
                             interpret=jax.default_backend() != "gpu")
    return f


# ------------------------------------------------------------------------------------
# Correctness first
# ------------------------------------------------------------------------------------
def correctness(head_dims=(128,)):
    """Worst row error of the kernel vs the float32 reference, bf16 inputs, small shapes,
    at each head dim."""
    rows = []
    b, tq_set = 3, (1, 4)
    key = jax.random.key(0)
    lengths = jnp.array([1000, 517, 3], jnp.int32)
    cases = [(h, k, tq, layout, mask) for h in head_dims for k in (8, 1) for tq in tq_set
             for layout, mask in (("contiguous", None), ("paged16", None), ("paged64", M.LocalMask(255, 0)))]
    for h, k, tq, layout, mask in cases:
        kc, vc, table = D.make_cache(key, D.DecodeCase(k, b, 1024, tq, layout, head_dim=h), DTYPE)
        q = jax.random.normal(key, (b, tq, 32, h), DTYPE)
        args = (q, kc, vc)
        want = jaxattn.decode_attention(*(x.astype(jnp.float32) for x in args), lengths=lengths,
                                        page_table=table, mask=mask, implementation="reference")
        got = jaxattn.decode_attention(*args, lengths=lengths, page_table=table, mask=mask,
                                       implementation="pallas_triton")
        err = jnp.max(jnp.abs(got.astype(jnp.float32) - want), axis=(1, 2, 3))
        base = jnp.max(jnp.abs(want.astype(DTYPE).astype(jnp.float32) - want), axis=(1, 2, 3))
        worst = float(jnp.max(err))
        ok = bool(jnp.all(err <= 2 * base + 2e-3)) and not bool(jnp.isnan(got).any())
        rows.append(dict(head_dim=h, k=k, tq=tq, layout=layout, mask=repr(mask), worst_row_err=worst,
                         bf16_rounding=float(jnp.max(base)), ok=ok))
        print(f"check H{h} K{k} Tq{tq} {layout:10s} {mask!r:40s} worst row err {worst:.2e} "
              f"{'ok' if ok else 'FAIL'}", flush=True)
    return rows


TUNE_CONFIGS = [DecodeConfig(bk, w, st) for bk in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="write the JSON results here")
    p.add_argument("--quick", action="store_true", help="the issue's table cases only")
    p.add_argument("--tune", action="store_true",
                   help="also sweep DecodeConfig (block_kv, warps, stages) on three cases")
    p.add_argument("--tune-paged", nargs="*", default=(), metavar="LAYOUT",
                   help="sweep DecodeConfig on paged caches of these layouts (e.g. paged16) at "
                        "8 x 128k and 64 x 32k")
    p.add_argument("--splits", type=int, nargs="*", default=None, metavar="N",
                   help="also time the kernel with each of these num_splits on the --split-cases "
                        "(K, Tq and layout from --split-kv-heads, --split-tq, --split-layout): how "
                        "much of a gap the split count explains. The "
                        "whole grid runs beside them (minutes) unless --match narrows it; "
                        "--match '^$' times the splits alone")
    p.add_argument("--split-cases", nargs="*", default=["1x32768", "1x131072"], metavar="BxCTX",
                   help="batch x context of the --splits sweep (default 1x32768 1x131072)")
    p.add_argument("--split-kv-heads", type=int, default=8,
                   help="KV heads of the --splits cases (8: GQA 32/8; 1: MQA)")
    p.add_argument("--split-layout", default="contiguous",
                   help="cache layout of the --splits cases (contiguous, paged16, paged64)")
    p.add_argument("--split-tq", type=int, default=1,
                   help="new tokens per row of the --splits and --configs cases (default 1)")
    p.add_argument("--configs", nargs="*", default=(), metavar="BK,WARPS,STAGES[,SPLITS]",
                   help="also time the kernel with each of these DecodeConfigs (and split count, "
                        "default: the shapes' own) on the --split-cases in the --split-layout, e.g. "
                        "16,4,8 for 16-key tiles, 4 warps, 8 stages")
    p.add_argument("--head-dims", type=int, nargs="*", default=[128], metavar="H",
                   help="run the grid cases (and the check) at each of these head dims, e.g. 96 128: "
                        "a head dim that is not a power of two is tiled as the next power of two "
                        "on chip with masked K/V loads (names of cases with H != 128 end in ' H<H>')")
    p.add_argument("--impls", nargs="*", default=["pallas_triton", "cudnn", "xla"])
    p.add_argument("--budget-s", type=float, default=225.0,
                   help="start no new case after this many seconds (the rest is recorded as skipped)")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--rounds", type=int, default=1,
                   help="with R > 1, build every measurement first, then time them in R interleaved "
                        "rounds (10 waited-for calls each, then --back-to-back ones) and report the median of the round medians and the "
                        "rounds' spread: for gaps between layouts smaller than the spread of one run. "
                        "Every case's caches stay on the device at once (choose cases with --match), "
                        "--budget-s does not apply, and the JSON is rewritten after every round")
    p.add_argument("--max-inner", type=int, default=D.MAX_INNER,
                   help="decode steps per timed executable at most (default %(default)s); small "
                        "cases reach it, and each call's dispatch is shared by that many steps")
    p.add_argument("--back-to-back", type=int, default=D.BACK_TO_BACK_CALLS, metavar="CALLS",
                   help="after the waited-for calls, time this many issued without waiting "
                        "(steady_gbps; 0: skip)")
    p.add_argument("--match", nargs="*", default=None, metavar="REGEX",
                   help="run only the grid cases whose name matches one of these regular "
                        "expressions (names look like 'K1 B8 ctx 32k Tq4 paged16')")
    args = p.parse_args(argv)
    if args.back_to_back < 0:
        p.error(f"--back-to-back: expected a number of calls >= 0 (0 skips them), got {args.back_to_back}")
    dev = jax.devices()[0]
    hbm = D.card_hbm_gbps()
    meta = dict(device=str(dev.device_kind), cores=num_cores(jax.default_backend() != "gpu"), jax=jax.__version__,
                date=datetime.date.today().isoformat(), dtype=str(jnp.dtype(DTYPE)), head_dims=args.head_dims,
                num_heads=32, hbm_gbps=hbm, argv=sys.argv[1:])
    print(f"decode_bench on {meta['device']} ({meta['cores']} SMs), jax {jax.__version__}", flush=True)
    start = time.perf_counter()
    result = dict(meta=meta, check=[] if args.skip_check else correctness(args.head_dims), rows=[],
                  skipped=[])
    grid = D.issue_cases() if args.quick else D.full_cases(DTYPE)
    grid = [dataclasses.replace(c, head_dim=h) for c in grid for h in args.head_dims]
    if args.match:
        grid = [c for c in grid if any(re.search(rx, c.name) for rx in args.match)]
    plan = [(case, impl, None) for case in grid for impl in args.impls]
    if args.tune:
        plan += [(D.DecodeCase(8, b, ctx, tq), "pallas_triton", cfg) for tq in (1, 4)
                 for b, ctx in ((1, 32768), (8, 4096), (64, 32768)) for cfg in TUNE_CONFIGS]
    if args.tune_paged:
        plan += [(D.DecodeCase(8, b, ctx, 1, layout), "pallas_triton", cfg) for layout in args.tune_paged
                 for b, ctx in ((8, 131072), (64, 32768)) for cfg in TUNE_CONFIGS]
    split_cases = [tuple(int(x) for x in c.lower().split("x")) for c in args.split_cases]
    plan += [(D.DecodeCase(args.split_kv_heads, b, ctx, args.split_tq, args.split_layout), "pallas_triton", ("splits", n))
             for b, ctx in split_cases
             for n in args.splits or ()]
    for text in args.configs:
        try:
            fields = [int(x) for x in text.split(",")]
            if len(fields) not in (3, 4):
                raise ValueError(f"{len(fields)} fields")
            cfg = ("config", DecodeConfig(*fields[:3]), fields[3] if len(fields) == 4 else None)
        except (ValueError, TypeError) as e:
            p.error(f"--configs: expected BK,WARPS,STAGES[,SPLITS] with a valid DecodeConfig, got {text!r} ({e})")
        plan += [(D.DecodeCase(args.split_kv_heads, b, ctx, args.split_tq, args.split_layout), "pallas_triton", cfg)
                 for b, ctx in split_cases]

    def timed_fn(case, cfg):
        """The function a plan entry times: None for the default path, else a tuned kernel."""
        if isinstance(cfg, tuple) and cfg[0] == "config":   # ("config", DecodeConfig, n or None)
            return tuned_fn(case, cfg[1], cfg[2])
        if isinstance(cfg, tuple):   # ("splits", n): the default config, n splits
            return tuned_fn(case, None, cfg[1])
        return None if cfg is None else tuned_fn(case, cfg, None)

    def describe(row, case, impl, cfg):
        row["tuned"] = cfg is not None
        if isinstance(cfg, tuple) and cfg[0] == "config":
            row["config"], row["num_splits"] = dataclasses.asdict(cfg[1]), cfg[2]
        elif isinstance(cfg, tuple):
            row["num_splits"] = cfg[1]
        elif cfg is not None:
            row["config"] = dataclasses.asdict(cfg)
        result["rows"].append(row)
        desc = impl if cfg is None else f"{impl} {cfg}"
        spread = (f" (rounds {min(row['round_gbps']):.0f}-{max(row['round_gbps']):.0f})"
                  if "round_gbps" in row else "")
        steady = f", back to back {row['steady_gbps']:.0f} GB/s" if "steady_gbps" in row else ""
        print(f"{case.name:40s} {desc:45s} "
              + (f"{row['gbps']:8.0f} GB/s {row['median_ms']:.4f} ms{spread}{steady}" if "gbps" in row
                 else row["error"][:80]),
              flush=True)

    if args.rounds > 1:   # every entry built first, then timed round after round
        def save(rows):
            result["rows"] = [dict(r, tuned=cfg is not None) for r, (_, _, cfg) in zip(rows, plan)
                              if r is not None]
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)
        rows = D.measure_interleaved([(case, impl, timed_fn(case, cfg)) for case, impl, cfg in plan],
                                     rounds=args.rounds, dtype=DTYPE, hbm_gbps=hbm,
                                     max_inner=args.max_inner, back_to_back=args.back_to_back,
                                     on_round=save)
        result["rows"] = []
        for (case, impl, cfg), row in zip(plan, rows):
            if row is not None:
                describe(row, case, impl, cfg)
    for case, impl, cfg in plan if args.rounds <= 1 else ():
        if time.perf_counter() - start > args.budget_s:
            result["skipped"].append(dict(case=case.name, impl=impl, config=str(cfg)))
            continue
        row = D.measure(case, impl, dtype=DTYPE, fn=timed_fn(case, cfg), hbm_gbps=hbm,
                        max_inner=args.max_inner, back_to_back=args.back_to_back)
        if row is None:
            continue
        describe(row, case, impl, cfg)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    result["wall_s"] = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print()
    untuned = [r for r in result["rows"] if not r["tuned"]]
    print("GB/s (bytes of K and V read / median time of calls waited for):")
    print(D.markdown_table(untuned))
    if any("steady_gbps" in r for r in untuned):
        print(f"GB/s of calls issued back to back ({args.back_to_back} at a time, one wait):")
        print(D.markdown_table(untuned, key="steady_gbps"))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} measurements past --budget-s {args.budget_s}")
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
