"""One GPU call's worth of checks and timings for the Mosaic GPU (Hopper) forward.

    python3 -m benchmarks.mosaic_check --part check   # values/lse vs the float32 oracle
    python3 -m benchmarks.mosaic_check --part bench   # TFLOP/s beside cuDNN and Triton

check: every case compares out and lse per query row (worst row reported) with
jaxattn.reference in float32, fills never-visited keys with NaN (in K; in V too for the
cases marked poison_v, whose NaN sends the call to the Triton fallback of
pallas_kernels/mosaic_gpu/nonfinite_fallback.py), and runs twice to check the result
is bitwise identical.
bench: forward TFLOP/s = 4·B·N·T·S·D·density / t, the median of >= 20 calls after two
warm-ups (and, in parentheses, from 20 calls issued back to back with one wait), for this
kernel (metadata passed as arguments), cuDNN (jax.nn.dot_product_attention), the Triton
backend, and the public entry point under jit ("api": implementation="pallas_mosaic_gpu";
"api_default": implementation=None), all in the same process; "dispatch_us" is the host
time to issue one call (back to back, before the wait). JSON goes to $OUT (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.benchmarking import timing
from jaxattn.benchmarking.cases import HOPPER_GOAL_CASES, BenchCase
from jaxattn import masks
from jaxattn.masks import build_block_metadata
from jaxattn.reference import allowed_pairs, reference_attention
from pallas_kernels import mosaic_gpu, triton as triton_backend
from pallas_kernels.flash_vjp import FlashStatic
from pallas_kernels.triton.common import padded_head_dim as triton_head_dim
from pallas_kernels.triton.config import config_for_head_dim as triton_config


def make_forward(backend, mask, t, s, h, scale, overrides=None, cap=None, bias=None):
    """A jitted (q, k, v) -> (out, lse) through `backend`'s forward with metadata built
    outside the timed region (as the public API caches it for static masks).
    `overrides`: MosaicConfig fields to change (tile/pipeline variants); `cap`: the
    logits soft cap; `bias`: an additive bias [Bb, Hb, T|1, S|1] (a jit argument)."""
    if backend is mosaic_gpu:
        cfg = mosaic_gpu.config_for_head_dim(mosaic_gpu.padded_head_dim(h))
        cfg = dataclasses.replace(cfg, **(overrides or {}))
    else:
        cfg = triton_config(triton_head_dim(h))
    bq, bk = cfg.metadata_tiles()["forward"]
    meta = jax.tree_util.tree_map(jnp.asarray, build_block_metadata(mask, t, s, bq, bk))
    ops = mask.operands()
    static = FlashStatic(backend=backend, scale=scale, logits_soft_cap=cap,
                         mask_fn=None if isinstance(mask, masks.FullMask) else mask.evaluate,
                         operand_kinds=tuple((o.kind, o.layout_block) for o in ops), config=cfg,
                         interpret=False)
    arrays = tuple(jnp.asarray(o.array) for o in ops)
    fn = jax.jit(lambda q, k, v, bias, meta, arrays: backend.forward(static, q, k, v, bias,
                                                                     {"forward": meta}, arrays))
    return lambda q, k, v: fn(q, k, v, bias, meta, arrays)


CHECKS = [
    # name, mask, B, T, S, N, K, H, dtype
    ("full D128", masks.FullMask(), 2, 1024, 1024, 4, 4, 128, jnp.bfloat16),
    ("causal D64 GQA ragged", masks.CausalMask(), 1, 1000, 1000, 4, 2, 64, jnp.bfloat16),
    ("causal D256", masks.CausalMask(), 1, 512, 512, 2, 1, 256, jnp.bfloat16),
    ("local 256 T!=S f16", masks.LocalMask(256, 0), 1, 777, 1300, 4, 1, 128, jnp.float16),
    ("bigbird causal", masks.bigbird_mask(1024, window=128, num_global=64, num_random_blocks=2,
                                          causal=True), 1, 1024, 1024, 2, 2, 128, jnp.bfloat16),
    # 512 items, 132 persistent CTAs: items read from the balanced table (schedule.py)
    ("bigbird S4096 H16 (table deal)", masks.bigbird_mask(4096, window=256, num_global=256,
                                                          num_random_blocks=3),
     1, 4096, 4096, 16, 16, 128, jnp.bfloat16),
    ("strided causal D96", masks.CausalMask() & masks.StridedMask(3), 1, 640, 640, 2, 2, 96,
     jnp.bfloat16),
    ("empty rows (causal offset -300)", masks.CausalMask(offset=-300), 1, 700, 700, 2, 1, 128,
     jnp.bfloat16),
    ("full S1k B4 D64 f16", masks.FullMask(), 4, 1024, 1024, 4, 1, 64, jnp.float16),
    # Segment ids (traced "q"/"kv" operands: read on PARTIAL tiles) and the soft cap; an
    # optional last field holds {"cap": c, "poison_v": True}.
    ("documents causal GQA ragged", masks.causal_document_mask(jnp.asarray(
        np.stack([np.repeat(np.arange(4), [130, 300, 70, 500]),
                  np.repeat(np.arange(2), [640, 360])]))), 2, 1000, 1000, 4, 2, 128, jnp.bfloat16),
    ("documents + window 300, soft cap 30, D64", masks.causal_document_mask(jnp.asarray(
        np.repeat(np.arange(3), [700, 90, 490])[None])) & masks.LocalMask(300, 0),
     1, 1280, 1280, 2, 1, 64, jnp.bfloat16, {"cap": 30.0}),
    ("causal soft cap 20 f16", masks.CausalMask(), 1, 1024, 1024, 4, 4, 128, jnp.float16,
     {"cap": 20.0}),
    ("lengths + NaN V at padding (Triton fallback)", masks.LengthMask(
        kv_lengths=jnp.asarray([700, 850]), q_len=1000, kv_len=1000), 2, 1000, 1000, 2, 1, 128,
     jnp.bfloat16, {"poison_v": True}),
    # An additive bias ({"bias": (shape, dtype)}: [.., T, S] tiles by TMA, [.., 1, S] and
    # [.., T, 1] vectors) and dense mask tiles (DenseMask: a "qkv" operand).
    ("full bias f32, causal GQA ragged", masks.CausalMask(), 2, 1000, 1000, 4, 2, 128, jnp.bfloat16,
     {"bias": ((2, 4, 1000, 1000), jnp.float32)}),
    ("full bias bf16 per head, soft cap 30, D64", masks.FullMask(), 1, 1024, 1024, 4, 4, 64,
     jnp.bfloat16, {"bias": ((1, 4, 1024, 1024), jnp.bfloat16), "cap": 30.0}),
    ("key bias [1,N,1,S], bigbird", masks.bigbird_mask(1024, window=128, num_global=64,
                                                       num_random_blocks=2, causal=True),
     1, 1024, 1024, 2, 2, 128, jnp.bfloat16, {"bias": ((1, 2, 1, 1024), jnp.float32)}),
    ("query bias [B,1,T,1], window T!=S f16", masks.LocalMask(256, 0), 2, 777, 1300, 4, 1, 128,
     jnp.float16, {"bias": ((2, 1, 777, 1), jnp.float32)}),
    ("full bias D256 causal", masks.CausalMask(), 1, 512, 512, 2, 1, 256, jnp.bfloat16,
     {"bias": ((1, 1, 512, 512), jnp.bfloat16)}),
    ("dense mask per head, T!=S", masks.DenseMask(
        np.random.default_rng(3).random((1, 4, 900, 1100)) < 0.3), 1, 900, 1100, 4, 2, 128,
     jnp.bfloat16),
    # 256 work items: each persistent CTA runs two (slot counters carried across items)
    ("dense causal mask + bias, B4 H8 D64 (persistent)", masks.CausalMask() & masks.DenseMask(
        np.random.default_rng(4).random((1024, 1024)) < 0.5), 4, 1024, 1024, 8, 8, 64, jnp.bfloat16,
     {"bias": ((4, 8, 1024, 1024), jnp.bfloat16)}),
]


def run_checks(variants, defaults=True, variant_head_dims=(128,)):
    """Every CHECKS case with the default config, then those of `variant_head_dims`
    with each variant."""
    results = []
    key = jax.random.PRNGKey(0)
    runs = [(c, None) for c in CHECKS] if defaults else []
    runs += [(c, (label, fields)) for label, fields in variants.items() for c in CHECKS
             if c[7] in variant_head_dims]
    for (name, mask, b, t, s, n, kh, h, dtype, *options), variant in runs:
        options = options[0] if options else {}
        cap = options.get("cap")
        key, kq, kk, kv = jax.random.split(key, 4)
        q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
        k = jax.random.normal(kk, (b, s, kh, h), jnp.float32).astype(dtype)
        v = jax.random.normal(kv, (b, s, kh, h), jnp.float32).astype(dtype)
        # Keys no row may see hold NaN in K (and in V where no visited tile holds them).
        seen = np.asarray(allowed_pairs(mask, t, s)).any(axis=(0, 1, 2))
        k = jnp.where(jnp.asarray(seen)[None, :, None, None], k, jnp.nan).astype(dtype)
        if options.get("poison_v"):
            v = jnp.where(jnp.asarray(seen)[None, :, None, None], v, jnp.nan).astype(dtype)
        bias = None
        if "bias" in options:
            key, kb = jax.random.split(key)
            bias = 2.0 * jax.random.normal(kb, options["bias"][0], jnp.float32).astype(options["bias"][1])
        scale = h ** -0.5
        entry = {"case": name, "shape": [b, t, s, n, kh, h], "dtype": jnp.dtype(dtype).name,
                 "variant": variant and variant[0], "cap": cap,
                 "bias": None if bias is None else [list(bias.shape), jnp.dtype(bias.dtype).name]}
        try:
            fwd = make_forward(mosaic_gpu, mask, t, s, h, scale, variant and variant[1], cap, bias)
            out, lse = jax.block_until_ready(fwd(q, k, v))
            out2, lse2 = jax.block_until_ready(fwd(q, k, v))
            ref_out, ref_lse = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                   v.astype(jnp.float32),
                                                   None if bias is None else bias.astype(jnp.float32),
                                                   mask, scale=scale,
                                                   logits_soft_cap=cap, return_residuals=True)
            err = np.abs(np.asarray(out, np.float32) - np.asarray(ref_out))       # [B, T, N, H]
            row_err = err.max(axis=(2, 3))                                        # [B, T]
            ref_lse, lse_np = np.asarray(ref_lse), np.asarray(lse)
            both_inf = np.isneginf(ref_lse) & np.isneginf(lse_np)
            lse_err = np.abs(np.where(both_inf, 0.0, lse_np) - np.where(both_inf, 0.0, ref_lse))
            worst = np.unravel_index(np.argmax(row_err), row_err.shape)
            tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3
            entry.update(
                out_worst_row_err=float(row_err.max()), worst_row=[int(x) for x in worst],
                out_mean_err=float(err.mean()), lse_worst_err=float(np.nan_to_num(lse_err, nan=1e9).max()),
                nan=bool(np.isnan(np.asarray(out, np.float32)).any() or np.isnan(lse_np).any()),
                empty_rows=int(np.isneginf(ref_lse).sum()),
                deterministic=bool(np.array_equal(np.asarray(out), np.asarray(out2))
                                   and np.array_equal(lse_np, np.asarray(lse2), equal_nan=True)))
            entry["ok"] = bool(entry["out_worst_row_err"] <= tol and entry["lse_worst_err"] <= 1e-3
                               and not entry["nan"] and entry["deterministic"])
        except Exception as e:  # noqa: BLE001 - report every case, keep going
            entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:3000])
            traceback.print_exc()
        print(json.dumps(entry), flush=True)
        results.append(entry)
    return results


@dataclasses.dataclass(frozen=True)
class DocumentsCase(BenchCase):
    """Packed documents: `documents` of random lengths (cut points drawn with seed 0),
    causal within each; the ids are a traced "q"/"kv" operand, as from a data loader.
    cuDNN gets the same pairs as a dense mask."""
    documents: int = 8

    def mask(self):
        rng = np.random.default_rng(0)
        cuts = np.sort(rng.choice(np.arange(1, self.seq_len), self.documents - 1, replace=False))
        lengths = np.diff(np.r_[0, cuts, self.seq_len])
        ids = np.repeat(np.arange(self.documents), lengths)[None].repeat(self.batch, 0)
        return masks.causal_document_mask(jnp.asarray(ids, jnp.int32))


@dataclasses.dataclass(frozen=True)
class BiasCase(BenchCase):
    """A bf16 additive bias of shape `bias_shape` (e.g. (1, N, S, S) or (1, N, 1, S))
    beside the mask; every implementation gets the same array. cuDNN gets it as given,
    or broadcast to [1, N, T, S] where it refuses the broadcast shape (then it reads
    that many bytes; the JSON says so)."""
    bias_shape: tuple = ()

    def bias(self):
        return 0.5 * jax.random.normal(jax.random.PRNGKey(7), self.bias_shape, jnp.bfloat16)


BENCH = [
    *HOPPER_GOAL_CASES,
    BenchCase("D128 S16384 B1 H16 bigbird", 1, 16, 16384, 128, "bigbird"),
    # 33 heads × 128 q-blocks = 4224 items = 32 whole rounds of 132 CTAs, against H16's
    # 2048 = 15.5 rounds: what the last, partly filled round of the persistent deal costs.
    BenchCase("D128 S16384 B1 H33 full", 1, 33, 16384, 128, "full"),
    DocumentsCase("D128 S16384 B1 H16 causal documents (8)", 1, 16, 16384, 128, "documents"),
    BiasCase("D128 S4096 B1 H16 causal, bias [1,N,T,S]", 1, 16, 4096, 128, "causal",
             bias_shape=(1, 16, 4096, 4096)),
    BiasCase("D128 S16384 B1 H16 causal, key bias [1,N,1,S]", 1, 16, 16384, 128, "causal",
             bias_shape=(1, 16, 1, 16384)),
]


def cudnn_forward(case, bias=None, entry=None):
    kwargs, dense = case.jax_nn_mask_args()
    dense = None if dense is None else jnp.asarray(dense)
    fn = jax.jit(lambda q, k, v, m, bias: jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=m, implementation="cudnn", **kwargs))
    if bias is not None:
        try:
            shape = (1, case.seq_len, case.heads, case.head_dim)
            fn.lower(*(jax.ShapeDtypeStruct(shape, jnp.bfloat16),) * 3, dense, bias).compile()
        except Exception as e:  # noqa: BLE001 - cuDNN refuses this broadcast: materialise it
            bias = jnp.broadcast_to(bias, (*bias.shape[:2], case.seq_len, case.seq_len))
            if entry is not None:
                entry["cudnn_bias"] = f"broadcast to {list(bias.shape)} ({type(e).__name__})"
    return lambda q, k, v: fn(q, k, v, dense, bias)


def api_forward(case, implementation, bias=None):
    """The public entry point under jit, as a user calls it: a static mask's metadata is
    built once at trace time and travels as constants, not as per-call arguments (the
    bias, when the case has one, is a jit argument)."""
    import jaxattn
    mask = case.mask()
    if bias is None:
        return jax.jit(lambda q, k, v: jaxattn.dot_product_attention(
            q, k, v, mask=mask, implementation=implementation))
    fn = jax.jit(lambda q, k, v, bias: jaxattn.dot_product_attention(
        q, k, v, bias, mask=mask, implementation=implementation))
    return lambda q, k, v: fn(q, k, v, bias)


def parse_variants(spec):
    """"stages=3,block_kv=64;named_barriers=1" -> {"stages=3,block_kv=64": {...}, ...}
    (MosaicConfig fields; 0/1 for the bool ones such as persistent, named_barriers)."""
    bools = {f.name for f in dataclasses.fields(mosaic_gpu.MosaicConfig)
             if f.type in ("bool", bool)}
    out = {}
    for item in filter(None, (spec or "").split(";")):
        fields = {k: int(v) for k, v in (kv.split("=") for kv in item.split(","))}
        fields = {("num_stages" if k == "stages" else k): v for k, v in fields.items()}
        out[item] = {k: bool(v) if k in bools else v for k, v in fields.items()}
    return out


def run_bench(names, repeats, variants, baselines=("cudnn", "triton")):
    results = []
    key = jax.random.PRNGKey(1)
    for case in BENCH:
        if names and not any(x.lower() in case.name.lower() for x in names):
            continue
        b, n, sl, h = case.batch, case.heads, case.seq_len, case.head_dim
        mask = case.mask()
        flops = case.flops("forward")
        shape = (b, sl, n, h)
        nbytes = 4 * int(np.prod(shape)) * 2
        sets = timing.rotation_sets(nbytes)
        inputs = []
        for _ in range(sets):
            key, *ks = jax.random.split(key, 4)
            inputs.append(tuple(jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks))
        entry = {"case": case.name, "flops": flops, "input_sets": sets}
        bias = case.bias() if isinstance(case, BiasCase) else None
        impls = {"mosaic": lambda: make_forward(mosaic_gpu, mask, sl, sl, h, h ** -0.5, bias=bias),
                 "cudnn": lambda: cudnn_forward(case, bias, entry),
                 "triton": lambda: make_forward(triton_backend, mask, sl, sl, h, h ** -0.5,
                                                bias=bias),
                 "api": lambda: api_forward(case, "pallas_mosaic_gpu", bias),
                 "api_default": lambda: api_forward(case, None, bias)}
        impls = {k: f for k, f in impls.items() if k == "mosaic" or k in baselines}
        for label, fields in variants.items():
            impls[f"mosaic[{label}]"] = (lambda f=fields: make_forward(mosaic_gpu, mask, sl, sl, h,
                                                                       h ** -0.5, f, bias=bias))
        for impl, build in impls.items():
            try:
                fn = build()
                jax.block_until_ready(fn(*inputs[0]))
                tm = timing.time_call(fn, inputs, repeats=repeats)
                # Back to back: `repeats` calls, one wait at the end (no per-call dispatch
                # gap; matters for sub-millisecond kernels). fn was just timed: no warm-up.
                b2b = timing.time_back_to_back(fn, inputs, repeats=repeats, warmup=0)
                entry[impl] = {"ms": tm.median_s * 1e3, "tflops": flops / tm.median_s / 1e12,
                               "min_ms": tm.min_s * 1e3, "back_to_back_ms": b2b.per_call_s * 1e3,
                               "back_to_back_tflops": flops / b2b.per_call_s / 1e12,
                               "dispatch_us": b2b.issue_s * 1e6}
            except Exception as e:  # noqa: BLE001
                entry[impl] = {"error": f"{type(e).__name__}: {e}"[:1500]}
        print(json.dumps(entry), flush=True)
        results.append(entry)
    return results


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=("check", "bench"), required=True)
    p.add_argument("--cases", nargs="*", default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--baselines", default="cudnn,triton")
    p.add_argument("--only-variants", action="store_true", help="check: skip the default config")
    p.add_argument("--variants", default="", help='MosaicConfig variants, e.g. "stages=3;block_kv=64"')
    p.add_argument("--variant-head-dims", default="128",
                   help="check: head dims of the cases run with each variant, e.g. 64,96,128,256")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(meta), flush=True)
    t0 = time.time()
    variants = parse_variants(args.variants)
    if args.part == "check":
        res = run_checks(variants, defaults=not args.only_variants,
                         variant_head_dims=tuple(int(d) for d in args.variant_head_dims.split(",")))
    else:
        res = run_bench(args.cases, args.repeats, variants, tuple(args.baselines.split(",")))
    meta["wall_s"] = time.time() - t0
    with open(os.path.join(args.out, f"mosaic_{args.part}.json"), "w") as f:
        json.dump({"meta": meta, "results": res}, f, indent=1)
    if args.part == "check":
        print("CHECK", "PASS" if all(r.get("ok") for r in res) else "FAIL",
              sum(bool(r.get("ok")) for r in res), "/", len(res))
    else:
        for r in res:
            row = [r["case"]] + [f"{impl} {r[impl].get('tflops', float('nan')):.0f}"
                                 f" ({r[impl].get('back_to_back_tflops', float('nan')):.0f})"
                                 for impl in r if isinstance(r[impl], dict)]
            print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
