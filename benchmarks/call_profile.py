"""Where a short call's wall time goes: the host's issue, the device's kernels, the wait.

    PYTHONPATH=$PWD python3 benchmarks/call_profile.py --out-dir prof/

For each case (issue 16's strided masks at 32k by default, `implementation=None` or
--implementation), the forward and the forward+backward are compiled, warmed up, then
called --calls times
one at a time (each waited for) under `jax.profiler.trace` with a Perfetto trace. Saved:
the trace (`perfetto_trace.json.gz`, also copied to the output folder's top), each
compiled program's optimized HLO (its
kernels and copies), and per call the host's issue time (until the call returns) and
wall time (until its result is ready). `summarize` reads the trace back: per call,
the device kernels' total time, the first kernel's start after the call began, and
the idle gaps between kernels. --floor adds a program of one XLA kernel with inputs and
output the size of the attention's (q + 1): the runtime's own cost of a waited-for call.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {   # name -> the mask, built from jaxattn.masks
    "strided_causal": lambda M: M.StridedMask(256) & M.CausalMask(),
    "union": lambda M: (M.LocalMask(256, 0) | M.StridedMask(256)) & M.CausalMask(),
    "local256": lambda M: M.LocalMask(256, 0) & M.CausalMask(),
}


def run(args):
    import jax
    import jax.numpy as jnp
    import jaxattn
    from jaxattn import masks as M
    os.makedirs(args.out_dir, exist_ok=True)
    shape = (1, args.seq, args.heads, args.head_dim)
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(x, shape, jnp.bfloat16) for x in ks)
    programs = []
    for name in args.cases:
        mask = CASES[name](M)

        def attn(q, k, v, mask=mask):
            return jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=args.implementation)

        def train(q, k, v, do, attn=attn):
            _, vjp = jax.vjp(attn, q, k, v)
            return vjp(do)
        for mode, fn, call_args in (("fwd", attn, (q, k, v)), ("fwd_bwd", train, (q, k, v, do))):
            compiled = jax.jit(fn).lower(*call_args).compile()
            with open(os.path.join(args.out_dir, f"{name}_{mode}.hlo.txt"), "w") as f:
                f.write(compiled.as_text())
            for _ in range(3):
                jax.block_until_ready(compiled(*call_args))
            programs.append((f"{name}_{mode}", compiled, call_args))
    if args.floor:
        compiled = jax.jit(lambda q: q + 1).lower(q).compile()
        for _ in range(3):
            jax.block_until_ready(compiled(q))
        programs.append(("floor_q_plus_1", compiled, (q,)))
    calls = []
    with jax.profiler.trace(os.path.join(args.out_dir, "trace"), create_perfetto_trace=True):
        for label, compiled, call_args in programs:
            for i in range(args.calls):
                with jax.profiler.TraceAnnotation(f"call {label} {i}"):
                    start = time.perf_counter_ns()
                    out = compiled(*call_args)
                    issued = time.perf_counter_ns()
                    jax.block_until_ready(out)
                    done = time.perf_counter_ns()
                calls.append(dict(label=label, call=i, issue_us=(issued - start) / 1e3,
                                  wall_us=(done - start) / 1e3))
                del out
    with open(os.path.join(args.out_dir, "calls.json"), "w") as f:
        json.dump(calls, f, indent=1)
    for path in glob.glob(os.path.join(args.out_dir, "trace", "**", "perfetto_trace.json.gz"),
                          recursive=True):
        shutil.copy(path, os.path.join(args.out_dir, "perfetto_trace.json.gz"))
    for c in calls:
        print(f"{c['label']:24s} {c['call']} issue {c['issue_us']:7.1f} µs  wall {c['wall_us']:7.1f} µs")


def summarize(out_dir):
    """Per annotated call: kernels on the device (count, busy µs), from the call's start to
    the first kernel, from the last kernel's end to the call's end, and the gaps."""
    path = glob.glob(os.path.join(out_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = [e for e in events if "/device:GPU" in procs.get(e["pid"], "")
              and "Stream" in threads.get((e["pid"], e["tid"]), "")]
    annotations = [e for e in events if e["name"].startswith("call ")]
    rows = []
    for a in sorted(annotations, key=lambda e: e["ts"]):
        t0, t1 = a["ts"], a["ts"] + a["dur"]
        kernels = sorted((e for e in device if t0 <= e["ts"] <= t1), key=lambda e: e["ts"])
        if not kernels:
            rows.append(dict(call=a["name"], wall_us=a["dur"], kernels=0))
            continue
        busy = sum(e["dur"] for e in kernels)
        gaps = [b["ts"] - (p["ts"] + p["dur"]) for p, b in zip(kernels, kernels[1:])]
        rows.append(dict(call=a["name"], wall_us=a["dur"], kernels=len(kernels), busy_us=busy,
                         to_first_us=kernels[0]["ts"] - t0,
                         after_last_us=t1 - (kernels[-1]["ts"] + kernels[-1]["dur"]),
                         gaps_us=sum(g for g in gaps if g > 0),
                         names=[(e["name"][:60], round(e["dur"], 1)) for e in kernels]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="call_profile")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--implementation", default=None, help="as dot_product_attention's (default: None)")
    p.add_argument("--floor", action="store_true", help="also time q + 1 (the runtime's floor)")
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args(argv)
    if not args.summarize_only:
        run(args)
    rows = summarize(args.out_dir)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:
        if r["kernels"]:
            print(f"{r['call']:28s} wall {r['wall_us']:7.1f}  kernels {r['kernels']:2d} "
                  f"busy {r['busy_us']:7.1f}  to first {r['to_first_us']:6.1f}  "
                  f"gaps {r['gaps_us']:6.1f}  after last {r['after_last_us']:6.1f}")
        else:
            print(f"{r['call']:28s} wall {r['wall_us']:7.1f}  no kernels seen")
    return 0


if __name__ == "__main__":
    sys.exit(main())
