"""Where a ring-attention step's time goes, from a JAX profiler trace.

    python benchmarks/ring_profile.py --out-dir prof/            # all local GPUs
    python benchmarks/ring_profile.py --out-dir prof/ --layout contiguous

Profiles one compiled forward+backward step of causal ring attention (the step of
benchmarks/ring_bench.py, 32k tokens per GPU by default) and one step of the same local
kernel calls without the ring, and summarises GPU 0's part of each trace:

- busy time per stream (compute, collectives) and the span of the step;
- the ops that take the time, grouped into the flash kernels, NCCL, copies and the
  rest of XLA's work (merges, accumulators, casts), with the largest ones by name;
- idle gaps on the compute stream (where it waits for a transfer or for the host).

The summary goes to <out-dir>/ring_profile.json and is printed; the raw traces
(*.trace.json.gz, viewable in Perfetto) stay under <out-dir>/trace_*.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys

# The repository root (jaxattn, when not installed) and this folder (ring_bench, a sibling script).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import ring_bench  # noqa: E402


def trace_one_call(fn, args, log_dir):
    """Compile, warm up twice, then trace one call; the path of its trace.json.gz."""
    compiled = fn.lower(*args).compile()
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    with jax.profiler.trace(log_dir):
        jax.block_until_ready(compiled(*args))
    paths = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz")),
                   key=os.path.getmtime)
    return paths[-1]


def _category(name):
    low = name.lower()
    if "nccl" in low:
        return "nccl"
    if "memcpy" in low or "memset" in low or low.startswith("copy"):
        return "copy/memset"
    if any(k in low for k in ("_forward_kernel", "_dkdv_kernel", "_dq_kernel", "attention", "flash")):
        return "flash kernels"
    return "other XLA ops"


def summarize(trace_path, process="/device:GPU:0", top=25, gap_us=20.0):
    """One device's streams in a Chrome-format trace: busy time, ops, idle gaps."""
    with gzip.open(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    want = process
    pids = {pid for pid, n in names.items() if n == want or n.startswith(want + " ")}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in pids}
    ops = [e for e in events if e.get("ph") == "X" and e.get("pid") in pids and e.get("dur", 0) > 0]
    if not ops:
        return {"error": f"no GPU events for {want}; processes: {sorted(set(names.values()))[:20]}"}
    start = min(e["ts"] for e in ops)
    end = max(e["ts"] + e["dur"] for e in ops)
    per_stream = collections.defaultdict(lambda: [0.0, 0])
    per_cat = collections.defaultdict(float)
    per_name = collections.defaultdict(lambda: [0.0, 0])
    for e in ops:
        stream = threads.get((e["pid"], e["tid"]), str(e["tid"]))
        per_stream[stream][0] += e["dur"]
        per_stream[stream][1] += 1
        per_cat[_category(e["name"])] += e["dur"]
        label = (e.get("args") or {}).get("hlo_op") or e["name"]
        per_name[label[:120]][0] += e["dur"]
        per_name[label[:120]][1] += 1
    # Idle gaps on the busiest non-NCCL stream: the compute stream.
    compute = max((s for s in per_stream if "nccl" not in s.lower()), key=lambda s: per_stream[s][0],
                  default=None)
    comp = sorted((e for e in ops if threads.get((e["pid"], e["tid"]), str(e["tid"])) == compute
                   and _category(e["name"]) != "nccl"), key=lambda e: e["ts"])
    gaps, t_end, prev = [], None, None
    for e in comp:
        if t_end is not None and e["ts"] - t_end > gap_us:
            gaps.append((e["ts"] - t_end, prev["name"][:60], e["name"][:60], t_end - start))
        if t_end is None or e["ts"] + e["dur"] > t_end:
            t_end, prev = e["ts"] + e["dur"], e
    gaps.sort(reverse=True)
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    return {
        "span_ms": ms(end - start),
        "streams": {s: {"busy_ms": ms(v[0]), "ops": v[1]} for s, v in per_stream.items()},
        "by_category_ms": {k: ms(v) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": k, "ms": ms(v[0]), "count": v[1]}
                    for k, v in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]],
        "compute_stream": compute,
        "compute_idle_ms": ms(sum(g[0] for g in gaps)),
        "largest_gaps": [{"ms": ms(g), "after": a, "before": b, "at_ms": ms(t)} for g, a, b, t in gaps[:12]],
    }


def _print(title, s):
    print(f"\n== {title}: span {s.get('span_ms')} ms")
    if "error" in s:
        print("  ", s["error"])
        return
    for k, v in s["streams"].items():
        print(f"  stream {k[:50]:50s} busy {v['busy_ms']:9.3f} ms  ({v['ops']} ops)")
    print("  by category:", ", ".join(f"{k} {v:.2f} ms" for k, v in s["by_category_ms"].items()))
    print(f"  compute stream idle (gaps > 20 us): {s['compute_idle_ms']} ms")
    for g in s["largest_gaps"][:6]:
        print(f"    gap {g['ms']:.3f} ms at {g['at_ms']:.1f} ms: after {g['after']} / before {g['before']}")
    for o in s["top_ops"][:15]:
        print(f"    {o['ms']:9.3f} ms  x{o['count']:<4d} {o['op'][:90]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--tokens-per-gpu", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"))
    ap.add_argument("--implementation", default=None)
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    impl = ring_bench.pick_implementation(args.implementation)
    p = len(jax.devices())
    t, n, d = args.tokens_per_gpu * p, args.heads, args.head_dim
    mesh = jax.make_mesh((p,), (ring_bench.AXIS,))
    c = t // (2 * p)
    result = {"device_kind": jax.devices()[0].device_kind, "gpus": p, "seq_len": t,
              "layout": args.layout, "implementation": impl, "jax_version": jax.__version__}
    ring_trace = trace_one_call(ring_bench.ring_step(mesh, impl, args.layout),
                                ring_bench._inputs(t, n, d, mesh), os.path.join(args.out_dir, "trace_ring"))
    result["ring"] = summarize(ring_trace)
    # GPU 0 is device 0 of the ring: its full blocks are [c, 2c] (see ring_bench).
    local_trace = trace_one_call(ring_bench.local_blocks_step(impl, c, n, d, p, "c x 2c"),
                                 ring_bench._inputs(2 * c, n, d), os.path.join(args.out_dir, "trace_local"))
    result["local"] = summarize(local_trace)
    _print(f"ring step ({p} GPUs, T={t}, {args.layout} layout), GPU 0", result["ring"])
    _print("the same local kernels without the ring, GPU 0", result["local"])
    with open(os.path.join(args.out_dir, "ring_profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
