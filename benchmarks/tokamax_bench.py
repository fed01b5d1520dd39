"""jaxattn's Hopper kernels and default dispatch beside tokamax's Mosaic kernels and cuDNN, in one process.

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/tokamax_bench.py --out tokamax.json

Engines (--engines):
  jaxattn  `jaxattn.dot_product_attention(..., implementation="pallas_mosaic_gpu")` with
           the case's Mask;
  default  the same call with `implementation=None`: what dispatch picks. The row records
           the order dispatch tries (`default_runs`, from
           `jaxattn.implementations.default_order`; the first that serves the call runs)
           and, for every engine, the custom calls of its compiled programs
           (`custom_calls`), which name the kernels that actually ran;
  tokamax  `tokamax.dot_product_attention(..., implementation="mosaic")` (0.0.17, with its
           dependencies, carried as wheels: the GPU image has no package index);
  cudnn    `jax.nn.dot_product_attention(..., implementation="cudnn")`;
  triton_backward  the Hopper forward with the Triton backward (the head dim's
           MosaicConfig with `backward` set to the Triton config): what a head dim the
           Mosaic backward kernels did not serve ran before they did (named only);
  duplicated_products  the Hopper kernels at head dim 256 with both dK/dV warpgroups
           forming Sᵀ and dPᵀ (MosaicBackwardConfig.share_products off: what calls with a
           soft cap run, and the D256 default before it was on; named only).
tokamax and cuDNN take jax.nn's is_causal / local_window_size arguments, or, for a mask
those cannot express (BigBird), the same pairs as a dense bool [1, 1, S, S] mask passed
as a jit argument.

Cases: issue 11's table (bf16, D128): the six of HOPPER_GOAL_CASES, BigBird at 16k and
causal attention at 512k tokens. Useful TFLOP/s: forward 4·B·N·T·S·D·density,
forward+backward 3.5× that; medians of --repeats calls after 2 warm-ups (--long-repeats
after 1 at 256k tokens and more, where one forward+backward call takes seconds), and,
below 256k tokens, the time per call of --repeats calls issued back to back (`b2b_*`);
one input set per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn import implementations  # noqa: E402
from jaxattn.benchmarking.cases import HOPPER_GOAL_CASES, BenchCase  # noqa: E402
from jaxattn.benchmarking.timing import (DEFAULT_REPEATS, DEFAULT_WARMUP, time_back_to_back,  # noqa: E402
                                        time_call)
from jaxattn.masks import canonical_mask  # noqa: E402

CASES = (
    *HOPPER_GOAL_CASES,
    BenchCase("D128 S16384 B1 H16 bigbird", 1, 16, 16384, 128, "bigbird"),
    BenchCase("D128 S524288 B1 H8 causal", 1, 8, 524288, 128, "causal"),
)
ENGINES = ("jaxattn", "default", "tokamax", "cudnn")
# engines timed only when named (--engines)
OPTIONAL_ENGINES = ("triton_backward", "duplicated_products")

# From this many tokens per sequence one forward+backward call takes seconds: time
# --long-repeats calls after LONG_WARMUP warm-ups.
LONG_SEQ_LEN = 256 * 1024
LONG_WARMUP = 1
DEFAULT_LONG_REPEATS = 3

# Custom-call targets in a compiled program, and the implementation each one belongs to.
KERNEL_TARGETS = (("mosaic_gpu", "pallas_mosaic_gpu"), ("cudnn", "cudnn"), ("triton", "pallas_triton"))


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


@functools.lru_cache(maxsize=1)
def jax_nn_arguments(case):
    """jax.nn's keyword arguments for the case and its dense mask as a device array (or
    None), built once per case: BigBird's at 16k is 256 MiB of bools."""
    kwargs, dense = case.jax_nn_mask_args()
    return kwargs, None if dense is None else jnp.asarray(dense)


def attention(engine, case):
    """(fn(q, k, v, *mask_args), mask_args): jaxattn's engines close over the case's Mask
    (static; its tile metadata is built at trace time, as a user's jit does); tokamax and
    cuDNN get a dense mask, where the case needs one, as a jit argument, so that it is
    read from memory as a user's would be, not folded into the program as a constant."""
    if engine in ("jaxattn", "default"):
        mask = case.mask()
        implementation = "pallas_mosaic_gpu" if engine == "jaxattn" else None
        return (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, mask=mask,
                                                              implementation=implementation)), ()
    if engine in OPTIONAL_ENGINES:
        from jaxattn.flash import pallas_attention
        from pallas_kernels import mosaic_gpu
        from pallas_kernels.triton.config import config_for_head_dim as triton_config
        hp = mosaic_gpu.padded_head_dim(case.head_dim)
        config = mosaic_gpu.config_for_head_dim(hp)
        if engine == "triton_backward":
            backward = triton_config(hp)
        elif getattr(config.backward, "split_columns", False):
            backward = dataclasses.replace(config.backward, share_products=False)
        else:
            raise ValueError(f"engine {engine!r} runs head dim 256 (its dK/dV column split), "
                             f"got head dim {case.head_dim}: pass --head-dims 256.")
        config = dataclasses.replace(config, backward=backward)
        mask = canonical_mask(case.mask())
        return (lambda q, k, v: pallas_attention(
            "pallas_mosaic_gpu", q, k, v, None, mask, scale=case.head_dim ** -0.5,
            logits_soft_cap=None, return_residuals=False, config=config)), ()
    kwargs, dense = jax_nn_arguments(case)
    if engine == "tokamax":
        tokamax = import_tokamax()
        call = functools.partial(tokamax.dot_product_attention, implementation="mosaic", **kwargs)
    elif engine == "cudnn":
        call = functools.partial(jax.nn.dot_product_attention, implementation="cudnn", **kwargs)
    else:
        raise ValueError(f"engine: expected one of {list(ENGINES + OPTIONAL_ENGINES)}, got {engine!r}.")
    if dense is None:
        return call, ()
    return (lambda q, k, v, mask: call(q, k, v, mask=mask)), (dense,)


def default_runs(case):
    """The implementations `implementation=None` tries for this case's call, in order
    (the first that serves it runs), as jaxattn's dispatch lists them on this platform."""
    return list(implementations.default_order(canonical_mask(case.mask()), jnp.bfloat16, None,
                                              case.head_dim, has_bias=False,
                                              q_len=case.seq_len, kv_len=case.seq_len))


def custom_calls(compiled) -> list[str]:
    """The custom-call targets of a compiled program: the kernels it launches."""
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))


def kernels_of(targets) -> list[str]:
    """The implementations whose kernels a list of custom-call targets holds."""
    return [name for key, name in KERNEL_TARGETS if any(key in t for t in targets)]


def timing_plan(case, repeats, long_repeats):
    """(warm-up calls, timed calls) for a case."""
    if case.seq_len >= LONG_SEQ_LEN:
        return LONG_WARMUP, long_repeats
    return DEFAULT_WARMUP, repeats


def make_inputs(case):
    ks = jax.random.split(jax.random.key(0), 4)
    shape = (case.batch, case.seq_len, case.heads, case.head_dim)
    return tuple(jax.random.normal(x, shape, jnp.bfloat16) for x in ks)


def run(case, engine, inputs, *, warmup, repeats):
    """Compile and time one engine's forward and forward+backward on one case; returns the
    row entry and the forward's output (bf16)."""
    attn, mask_args = attention(engine, case)
    q, k, v, do = inputs

    def loss(q, k, v, do, *mask_args):
        return jnp.sum(attn(q, k, v, *mask_args).astype(jnp.float32) * do.astype(jnp.float32))
    fwd = jax.jit(attn).lower(q, k, v, *mask_args).compile()
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, do, *mask_args).compile()
    flops = case.flops("forward")
    tf = time_call(fwd, [(q, k, v, *mask_args)], warmup=warmup, repeats=repeats).median_s
    tb = time_call(bwd, [(q, k, v, do, *mask_args)], warmup=warmup, repeats=repeats).median_s
    out = fwd(q, k, v, *mask_args)
    calls = dict(forward=custom_calls(fwd), forward_backward=custom_calls(bwd))
    entry = dict(fwd_ms=tf * 1e3, fwd_bwd_ms=tb * 1e3, fwd_tflops=flops / tf / 1e12,
                 fwd_bwd_tflops=3.5 * flops / tb / 1e12, custom_calls=calls)
    if case.seq_len < LONG_SEQ_LEN:
        # A sub-millisecond call waits on the host's dispatch in the median; issued back
        # to back, the device's own time per call shows.
        bf = time_back_to_back(fwd, [(q, k, v, *mask_args)], repeats=repeats, warmup=0)
        bb = time_back_to_back(bwd, [(q, k, v, do, *mask_args)], repeats=repeats, warmup=0)
        entry.update(b2b_fwd_ms=bf.per_call_s * 1e3, b2b_fwd_bwd_ms=bb.per_call_s * 1e3,
                     b2b_fwd_tflops=flops / bf.per_call_s / 1e12,
                     b2b_fwd_bwd_tflops=3.5 * flops / bb.per_call_s / 1e12)
    if engine != "tokamax":   # tokamax's Mosaic kernels share jaxattn's custom-call target
        entry["kernels"] = kernels_of(calls["forward"] + calls["forward_backward"])
    return entry, out


@jax.jit
def max_abs_diff(a, b):
    return jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def summary(case, row, engines):
    """One line per case: forward / forward+backward TFLOP/s per engine (the default
    engine with the kernels it ran)."""
    def cell(e):
        entry = row.get(e, {})
        if "fwd_tflops" not in entry:
            return f"{e}: {entry.get('error', '-')[:100]}"
        label = f"{e}[{'+'.join(entry['kernels']) or '?'}]" if e == "default" else e
        b2b = (f" (b2b {entry['b2b_fwd_tflops']:.0f}/{entry['b2b_fwd_bwd_tflops']:.0f})"
               if "b2b_fwd_tflops" in entry else "")
        return f"{label} {entry['fwd_tflops']:.0f}/{entry['fwd_bwd_tflops']:.0f}{b2b}"
    return case.name + " | " + " | ".join(cell(e) for e in engines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tokamax_bench.json")
    p.add_argument("--cases", nargs="*", default=None, help="substrings of case names")
    p.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES + OPTIONAL_ENGINES)
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help=f"timed calls per measurement (after {DEFAULT_WARMUP} warm-ups)")
    p.add_argument("--long-repeats", type=int, default=DEFAULT_LONG_REPEATS,
                   help=f"timed calls per measurement at {LONG_SEQ_LEN} tokens and more "
                        f"(after {LONG_WARMUP} warm-up)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.long_repeats < 1:
        p.error(f"--repeats and --long-repeats: expected >= 1, got {args.repeats} and {args.long_repeats}")
    return args


def selected_cases(names):
    return [c for c in CASES if not names or any(n.lower() in c.name.lower() for n in names)]


def main(argv=None):
    args = parse_args(argv)
    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                date=datetime.date.today().isoformat(), dtype="bfloat16",
                repeats=args.repeats, long_repeats=args.long_repeats, long_seq_len=LONG_SEQ_LEN)
    try:
        tokamax = import_tokamax()
        meta["tokamax"] = getattr(tokamax, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - reported, the other engines still run
        meta["tokamax"] = f"import failed: {type(e).__name__}: {e}"[:300]
    rows = []
    for case in selected_cases(args.cases):
        warmup, repeats = timing_plan(case, args.repeats, args.long_repeats)
        row, outs, t0 = dict(case=case.name), {}, time.perf_counter()
        row.update(warmup=warmup, repeats=repeats, flops_forward=case.flops("forward"))
        if "default" in args.engines:
            row["default_runs"] = default_runs(case)
        inputs = make_inputs(case)
        for engine in args.engines:
            try:
                row[engine], outs[engine] = run(case, engine, inputs, warmup=warmup, repeats=repeats)
            except Exception as e:  # noqa: BLE001 - one engine failing keeps the others
                row[engine] = dict(error=f"{type(e).__name__}: {e}"[:400])
                traceback.print_exc()
        for engine in outs:
            if engine != "cudnn" and "cudnn" in outs:
                row[f"max_abs_diff_{engine}_vs_cudnn"] = float(max_abs_diff(outs[engine], outs["cudnn"]))
        del inputs, outs
        jax_nn_arguments.cache_clear()
        row["case_s"] = time.perf_counter() - t0
        rows.append(row)
        print(summary(case, row, args.engines), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
