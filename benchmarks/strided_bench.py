"""Strided and dilated masks on the GPU: today's tile walk, the planner, cuDNN with the
dense mask, in one process.

    python3 benchmarks/strided_bench.py --out results/strided_bench.json

Cases are issue 16's table: D128, B1, H16, S = T = 32768, bf16. Useful TFLOP/s count
the allowed pairs only: forward 4·B·N·T·S·D·density, forward+backward 3.5× that.
Engines:
  today  jaxattn pallas_triton with the planner off (jaxattn.planned.planning(False))
  plan   jaxattn pallas_triton as dispatch chooses (the plan of jaxattn.masks.explain)
  today_mosaic  (only when named) jaxattn pallas_mosaic_gpu with the planner off
  plan_mosaic  the same plan on the pallas_mosaic_gpu kernels (Hopper only; their forward
         tiles are 128 x 128, so explain's tile counts differ)
  default  implementation=None: what dispatch picks for the plan's parts (each part may
         go to a different implementation)
  cudnn  jax.nn.dot_product_attention(implementation="cudnn") with the dense [T, S] mask
  cudnn_native  (only when named) jaxattn's "cudnn" implementation: jax.nn with the mask's
         own form (a causal window as local_window_size), for the window cases
  default_unchecked  (only when named) the default engine compiled with the Mosaic
         kernels' finite-input checks switched off (pallas_kernels/mosaic_gpu/
         nonfinite_fallback.py): what those checks cost a plan whose parts leave keys or
         queries unattended in PARTIAL tiles (the union's second part does). A measurement
         only: this bench's inputs are finite; a user's call keeps the checks
  default_merge_differentiated  (only when named) the default engine with a union's
         merge differentiated by autodiff (each part's own backward on its weighted dO),
         instead of the merge's own VJP (each part's backward kernels on the merged
         residuals, jaxattn/planned.py): what that VJP saves
Times are medians of 20 calls after 2 warm-ups (jaxattn/benchmarking/timing.py), and
per call of 20 issued back to back (`b2b_*`: what the device takes when the host's
dispatch is not waited for); one input set
(3 × 128 MB exceeds the L2). Each row also records the planned tiles and the largest
difference between the plan's and today's forward outputs.
"""

from __future__ import annotations

import argparse
import contextlib
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
import numpy as np  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn import masks as M  # noqa: E402
from jaxattn.benchmarking.flops import allowed_pairs as allowed_pair_count  # noqa: E402
from jaxattn.benchmarking.timing import time_back_to_back, time_call  # noqa: E402
from jaxattn import planned  # noqa: E402
from jaxattn.planned import planning  # noqa: E402
from jaxattn.reference import allowed_pairs  # noqa: E402
from pallas_kernels.mosaic_gpu import nonfinite_fallback as fallback  # noqa: E402

ENGINES = ("today", "plan", "plan_mosaic", "default", "cudnn")
# "cudnn_native" (run only when named) is jaxattn's "cudnn" implementation: jax.nn with the
# mask's native form (a causal window as local_window_size), where jax.nn has one.
IMPLEMENTATION = dict(today="pallas_triton", today_mosaic="pallas_mosaic_gpu", plan="pallas_triton", plan_mosaic="pallas_mosaic_gpu", default=None,
                      cudnn_native="cudnn", default_unchecked=None, default_merge_differentiated=None)
# Engines whose gradients a row compares with each other (the same dispatch, the union's
# merge under its own VJP and differentiated by autodiff).
GRADIENTS_COMPARED = ("default", "default_merge_differentiated")
# Engines whose forward output a row compares with today's path.
COMPARED_WITH_TODAY = ("plan", "plan_mosaic", "default", "default_unchecked",
                       "default_merge_differentiated")


@contextlib.contextmanager
def finite_checks_off():
    """While tracing inside: the Mosaic kernels run without their finite-input checks
    (and so without the cond between them and the Triton fallback). jaxattn's inner jitted
    functions are cached by their static arguments, so the caches are cleared on the way
    in and out: no trace made with the checks reaches this block, nor one made without
    them the code after it."""
    saved = fallback.forward_needs_check, fallback.backward_needs_check
    jax.clear_caches()
    fallback.forward_needs_check = lambda *args: False
    fallback.backward_needs_check = lambda *args: False
    try:
        yield
    finally:
        fallback.forward_needs_check, fallback.backward_needs_check = saved
        jax.clear_caches()


@contextlib.contextmanager
def merge_differentiated():
    """While tracing inside: a planned union's merge is differentiated by autodiff, as
    when its parts run on different implementations."""
    saved = planned._kernels_serve_all
    planned._kernels_serve_all = lambda *args: False
    try:
        yield
    finally:
        planned._kernels_serve_all = saved


def cases():
    return {
        "strided 256 causal": M.StridedMask(256) & M.CausalMask(),
        "(local 256 | strided 256) causal": (M.LocalMask(256, 0) | M.StridedMask(256)) & M.CausalMask(),
        "dilated window 2048 stride 4": M.LocalMask(2048, 0) & M.StridedMask(4),
        "local 256 causal (reference point)": M.LocalMask(256, 0) & M.CausalMask(),
    }


def window_cases(seq: int = 32768):
    """Cases run only when named: plain causal windows (where the Mosaic kernels overtake
    cuDNN, for default dispatch's choice between them) and causal packed documents (8 of
    random lengths, seed 0: segment ids on the Mosaic kernels behind their finite-input
    check, beside the Triton kernels)."""
    out = {f"local {w} causal": M.LocalMask(w, 0) & M.CausalMask() for w in (256, 512, 1024, 2048)}
    # `jaxattn compare`'s strided method (non-causal), at its default window
    out["local 256 both ways | strided 256"] = M.LocalMask(256, 256) | M.StridedMask(256)
    out["full"] = M.FullMask()   # flash attention, beside it (engines today / today_mosaic)
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, seq), 7, replace=False))
    ids = np.searchsorted(cuts, np.arange(seq), side="right").astype(np.int32)[None]
    out["8 documents causal"] = M.causal_document_mask(jnp.asarray(ids))
    return out


def _functions(engine, mask):
    """(fwd, fwd_bwd) taking (q, k, v, extra..., [do]); extra is the dense mask for cuDNN."""
    if engine == "cudnn":
        def attn(q, k, v, allowed):
            return jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation="cudnn")
    else:
        def attn(q, k, v):
            return jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=IMPLEMENTATION[engine])

    def loss(*args):
        *inputs, do = args
        return jnp.sum(attn(*inputs).astype(jnp.float32) * do.astype(jnp.float32))
    return attn, jax.grad(loss, argnums=(0, 1, 2))


def run_case(name, mask, *, b, n, s, d, engines):
    t0 = time.perf_counter()
    pairs = allowed_pair_count(mask, s, s)
    density = pairs / (s * s)
    flops_fwd = 4 * b * n * s * s * d * density
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(x, (b, s, n, d), jnp.bfloat16) for x in ks)
    row = dict(case=name, mask=repr(mask), b=b, n=n, s=s, d=d, density=density,
               allowed_pairs=pairs, flops_fwd=flops_fwd)
    if not mask.is_dynamic:   # explain takes static masks (no segment ids)
        explanation = M.explain(mask, s, s, block_q=128, block_kv=64)
        row.update(plain_tiles=explanation.plan.plain_tiles, planned_tiles=explanation.plan.tiles,
                   planned=explanation.plan.planned, explain=str(explanation))
    outs, grads = {}, {}
    for engine in engines:
        try:
            extra = (allowed_pairs(mask, s, s),) if engine == "cudnn" else ()
            fwd, fwd_bwd = _functions(engine, mask)
            # The planner's switch is read while tracing: compile inside it.
            variant = (finite_checks_off() if engine == "default_unchecked" else merge_differentiated()
                       if engine == "default_merge_differentiated" else contextlib.nullcontext())
            with planning(not engine.startswith("today")), variant:
                fwd_c = jax.jit(fwd).lower(q, k, v, *extra).compile()
                bwd_c = jax.jit(fwd_bwd).lower(q, k, v, *extra, do).compile()
            tf = time_call(fwd_c, [(q, k, v, *extra)]).median_s
            tfb = time_call(bwd_c, [(q, k, v, *extra, do)]).median_s
            row[engine] = dict(fwd_ms=tf * 1e3, fwd_bwd_ms=tfb * 1e3,
                               fwd_tflops=flops_fwd / tf / 1e12,
                               fwd_bwd_tflops=3.5 * flops_fwd / tfb / 1e12)
            # Sub-millisecond calls wait on the host's dispatch in the median; calls
            # issued back to back show what the device takes per call (their outputs
            # all alive at once: a failure here keeps the medians).
            try:
                bf = time_back_to_back(fwd_c, [(q, k, v, *extra)], warmup=0)
                bfb = time_back_to_back(bwd_c, [(q, k, v, *extra, do)], warmup=0)
                row[engine].update(
                    b2b_fwd_ms=bf.per_call_s * 1e3, b2b_fwd_bwd_ms=bfb.per_call_s * 1e3,
                    b2b_fwd_tflops=flops_fwd / bf.per_call_s / 1e12,
                    b2b_fwd_bwd_tflops=3.5 * flops_fwd / bfb.per_call_s / 1e12,
                    issue_fwd_ms=bf.issue_s * 1e3, issue_fwd_bwd_ms=bfb.issue_s * 1e3)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at long lengths
                row[engine]["b2b_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if engine != "cudnn":
                outs[engine] = fwd_c(q, k, v).astype(jnp.float32)
            if engine in GRADIENTS_COMPARED:
                grads[engine] = bwd_c(q, k, v, do)
            del extra
        except Exception as e:  # an engine that cannot run this case (OOM, unsupported)
            row[engine] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    if all(e in grads for e in GRADIENTS_COMPARED):   # the merge's VJP against autodiff's
        row["max_abs_grad_diff_merge_vjp_vs_differentiated"] = max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            for a, b in zip(*(grads[e] for e in GRADIENTS_COMPARED)))
    for engine in COMPARED_WITH_TODAY:
        if engine in outs and "today" in outs:
            row[f"max_abs_diff_{engine}_vs_today"] = float(jnp.max(jnp.abs(outs[engine] - outs["today"])))
    row["case_s"] = time.perf_counter() - t0
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="strided_bench.json")
    p.add_argument("--cases", nargs="*", default=None, help=f"names among {list(cases()) + list(window_cases())}")
    p.add_argument("--engines", nargs="*", default=list(ENGINES), choices=list(IMPLEMENTATION) + ["cudnn"])
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)
    all_cases = {**cases(), **window_cases(args.seq)}
    meta = dict(device=str(jax.devices()[0].device_kind), date=datetime.date.today().isoformat(),
                jax=jax.__version__, b=1, n=16, d=args.head_dim, dtype="bfloat16")
    rows = []
    for name in args.cases or list(cases()):
        try:
            row = run_case(name, all_cases[name], b=1, n=16, s=args.seq, d=args.head_dim, engines=args.engines)
        except Exception:
            traceback.print_exc()
            row = dict(case=name, error=traceback.format_exc()[-500:])
        rows.append(row)
        cells = [f"{name} ({row.get('density', float('nan')):.2%})"]
        for engine in args.engines:
            r = row.get(engine, {})
            b2b = (f"; back to back {r['b2b_fwd_tflops']:.1f}/{r['b2b_fwd_bwd_tflops']:.1f}"
                   if "b2b_fwd_tflops" in r else "")
            cells.append(f"{engine} {r['fwd_tflops']:.1f}/{r['fwd_bwd_tflops']:.1f} TFLOP/s "
                         f"({r['fwd_ms']:.2f}/{r['fwd_bwd_ms']:.2f} ms{b2b})" if "fwd_tflops" in r
                         else f"{engine}: {r.get('error', '-')[:80]}")
        if "max_abs_grad_diff_merge_vjp_vs_differentiated" in row:
            cells.append(f"|grads merge VJP - differentiated| "
                         f"{row['max_abs_grad_diff_merge_vjp_vs_differentiated']:.1e}")
        for engine in COMPARED_WITH_TODAY:
            if f"max_abs_diff_{engine}_vs_today" in row:
                cells.append(f"|{engine} - today| {row[f'max_abs_diff_{engine}_vs_today']:.1e}")
        print(" | ".join(cells), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
