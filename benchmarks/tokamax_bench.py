"""jaxattn's Hopper kernels beside tokamax's Mosaic GPU kernels and cuDNN, in one process.

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/tokamax_bench.py --out tokamax.json

tokamax (0.0.17, with its dependencies, carried as wheels: the GPU image has no package
index) is called as `tokamax.dot_product_attention(..., implementation="mosaic")` with
the same is_causal / local_window_size arguments jax.nn takes; jaxattn as
`dot_product_attention(..., implementation="pallas_mosaic_gpu")` with the case's mask;
cuDNN as `jax.nn.dot_product_attention(..., implementation="cudnn")`. Cases: issue 11's
table (bf16, D128). Useful TFLOP/s: forward 4·B·N·T·S·D·density, forward+backward 3.5×
that; medians of --repeats calls after 2 warm-ups, one input set per case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn.benchmarking.cases import HOPPER_GOAL_CASES  # noqa: E402
from jaxattn.benchmarking.timing import time_call  # noqa: E402

CASES = HOPPER_GOAL_CASES
ENGINES = ("jaxattn", "tokamax", "cudnn")


def import_tokamax():
    """tokamax, importable without xprof: tokamax's own benchmarking module imports
    xprof's kernel-stats tool at import time (a profiler, never used by the attention op,
    with a long list of dependencies of its own); a placeholder module stands in for it
    when xprof is not installed."""
    try:
        import xprof.cli.tools  # noqa: F401
    except ImportError:
        import types
        for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
    import tokamax
    return tokamax


def attention(engine, case):
    kwargs, dense = case.jax_nn_mask_args()
    if dense is not None:
        raise ValueError(f"{case.name}: a dense mask is not a like-for-like call for tokamax")
    if engine == "jaxattn":
        mask = case.mask()
        return lambda q, k, v: jaxattn.dot_product_attention(q, k, v, mask=mask,
                                                             implementation="pallas_mosaic_gpu")
    if engine == "tokamax":
        tokamax = import_tokamax()
        return lambda q, k, v: tokamax.dot_product_attention(q, k, v, implementation="mosaic", **kwargs)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)


def run(case, engine, repeats):
    attn = attention(engine, case)
    ks = jax.random.split(jax.random.key(0), 4)
    shape = (case.batch, case.seq_len, case.heads, case.head_dim)
    q, k, v, do = (jax.random.normal(x, shape, jnp.bfloat16) for x in ks)

    def loss(q, k, v, do):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    fwd = jax.jit(attn).lower(q, k, v).compile()
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, do).compile()
    flops = case.flops("forward")
    tf = time_call(fwd, [(q, k, v)], repeats=repeats).median_s
    tb = time_call(bwd, [(q, k, v, do)], repeats=repeats).median_s
    out = fwd(q, k, v).astype(jnp.float32)
    return dict(fwd_ms=tf * 1e3, fwd_bwd_ms=tb * 1e3, fwd_tflops=flops / tf / 1e12,
                fwd_bwd_tflops=3.5 * flops / tb / 1e12), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tokamax_bench.json")
    p.add_argument("--cases", nargs="*", default=None, help="substrings of case names")
    p.add_argument("--engines", nargs="*", default=list(ENGINES))
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                date=datetime.date.today().isoformat(), dtype="bfloat16")
    try:
        tokamax = import_tokamax()
        meta["tokamax"] = getattr(tokamax, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - reported, the other engines still run
        meta["tokamax"] = f"import failed: {type(e).__name__}: {e}"[:300]
    rows = []
    for case in CASES:
        if args.cases and not any(c.lower() in case.name.lower() for c in args.cases):
            continue
        row, outs, t0 = dict(case=case.name), {}, time.perf_counter()
        for engine in args.engines:
            try:
                row[engine], outs[engine] = run(case, engine, args.repeats)
            except Exception as e:  # noqa: BLE001 - one engine failing keeps the others
                row[engine] = dict(error=f"{type(e).__name__}: {e}"[:400])
                traceback.print_exc()
        for engine in outs:
            if engine != "cudnn" and "cudnn" in outs:
                row[f"max_abs_diff_{engine}_vs_cudnn"] = float(jnp.max(jnp.abs(outs[engine] - outs["cudnn"])))
        row["case_s"] = time.perf_counter() - t0
        rows.append(row)
        print(case.name + " | " + " | ".join(
            f"{e} {row[e]['fwd_tflops']:.0f}/{row[e]['fwd_bwd_tflops']:.0f}" if "fwd_tflops" in row.get(e, {})
            else f"{e}: {row.get(e, {}).get('error', '-')[:100]}" for e in args.engines), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
