"""GPU correctness + speed of the Pallas-Triton kernels beside cuDNN and XLA, same process.

    python benchmarks/flash_bench.py --out results.json [--cases NAME ...] [--tune]

TFLOP/s follow the FLOP model of jaxattn/benchmarking/flops.py: forward 4·B·N·T·S·D ×
(fraction of allowed pairs; plain causal counts ½ here, as in the FlashAttention papers),
backward 2.5× forward, so forward+backward is 3.5× forward. Masked
cases count useful work only. Times are medians of >= 20 calls after 2 warm-ups, inputs
rotated among 3 sets so that L2 does not hold them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

# This checkout's jaxattn, also when another copy is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn import masks as M  # noqa: E402
from jaxattn.benchmarking import flops  # noqa: E402
from jaxattn.benchmarking.timing import time_call  # noqa: E402
from jaxattn.flash import pallas_attention  # noqa: E402
from pallas_kernels.triton.config import TritonConfig  # noqa: E402


def allowed_fraction(mask, t, s):
    """Fraction of allowed pairs from the repo's one FLOP model (jaxattn/benchmarking/flops.py),
    except plain causal, which counts ½ as the FlashAttention papers do."""
    if isinstance(mask, M.CausalMask) and mask.offset == 0 and t == s:
        return 0.5
    return flops.allowed_fraction(mask, t, s)


def cases():
    d = 128
    out = {}
    for dh in (64, 128):
        for s in (1024, 4096, 16384):
            for causal in (False, True):
                name = f"D{dh} S{s} {'causal' if causal else 'full'}"
                out[name] = dict(b=16384 // s, n=2048 // dh, s=s, d=dh,
                                 mask=M.CausalMask() if causal else M.FullMask())
    out["D128 S32768 B1 H16 causal window 256"] = dict(
        b=1, n=16, s=32768, d=d, mask=M.CausalMask() & M.LocalMask(256, 0))
    out["D128 S32768 B1 H16 causal window 2048"] = dict(
        b=1, n=16, s=32768, d=d, mask=M.CausalMask() & M.LocalMask(2048, 0))
    out["D128 S16384 B1 H16 bigbird causal"] = dict(
        b=1, n=16, s=16384, d=d, mask=M.bigbird_mask(16384, window=1024, num_global=256,
                                                     num_random_blocks=3, block_size=128,
                                                     causal=True))
    # Cost must follow the number of non-empty tiles: random block-sparse layouts of
    # 128×128 blocks keeping a given share of tiles, beside the dense FullMask.
    rng = np.random.default_rng(0)
    for share in (0.125, 0.25, 0.5):
        layout = rng.random((128, 128)) < share
        out[f"D128 S16384 B1 H16 blocksparse {share:.1%} of tiles"] = dict(
            b=1, n=16, s=16384, d=d, mask=M.BlockSparseMask(layout, 128, 128))
    out["D128 S16384 B1 H16 full"] = dict(b=1, n=16, s=16384, d=d, mask=M.FullMask())
    # An additive bias as an input: a per-head [1, N, T, S] one (relative-position style)
    # and a [1, 1, 1, S] row (key padding style). "fwd+bwd" differentiates q, k, v only;
    # "fwd+bwd+dbias" also the bias.
    for causal in (False, True):
        out[f"D128 S4096 B4 H16 {'causal' if causal else 'full'} bias[1,N,T,S]"] = dict(
            b=4, n=16, s=4096, d=d, mask=M.CausalMask() if causal else M.FullMask(),
            bias=(1, 16, 4096, 4096))
    out["D128 S16384 B1 H16 causal bias[1,1,1,S]"] = dict(
        b=1, n=16, s=16384, d=d, mask=M.CausalMask(), bias=(1, 1, 1, 16384))
    return out


def make_fns(impl, mask, config=None, with_bias=False):
    """fwd(q, k, v[, bias]) and fwd_bwd(q, k, v[, bias], do) -> grads of q, k, v; with
    `with_bias` also a third function that differentiates the bias too."""
    if impl == "jax_pallas_mha":
        # jax's own (deprecated) Pallas-Triton FlashAttention: full and causal only.
        from jax.experimental.pallas.ops.gpu import attention as jax_mha
        if not isinstance(mask, (M.FullMask, M.CausalMask)):
            raise NotImplementedError("jax_pallas_mha supports full and causal only")

        if with_bias:
            raise NotImplementedError("jax_pallas_mha takes no bias")

        def attn(q, k, v):
            return jax_mha.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5,
                               causal=isinstance(mask, M.CausalMask))
    elif impl.startswith("pallas"):
        def attn(q, k, v, bias=None):
            return pallas_attention("pallas_triton", q, k, v, bias, mask, scale=q.shape[-1] ** -0.5,
                                    logits_soft_cap=None, return_residuals=False, config=config)
    else:
        kwargs = {}
        if isinstance(mask, M.CausalMask):
            kwargs["is_causal"] = True
        elif isinstance(mask, M.AndMask) and len(mask.parts) == 2 and isinstance(mask.parts[1], M.LocalMask) \
                and isinstance(mask.parts[0], M.CausalMask):
            kwargs["is_causal"] = True
            kwargs["local_window_size"] = (mask.parts[1].left, 0)
        elif not isinstance(mask, M.FullMask):
            kwargs["mask"] = "dense"

        def attn(q, k, v, bias=None):
            kw = dict(kwargs)
            if kw.get("mask") == "dense":
                kw["mask"] = jaxattn.reference.allowed_pairs(mask, q.shape[1], k.shape[1])
            return jax.nn.dot_product_attention(q, k, v, bias, implementation=impl, **kw)
    fwd = jax.jit(attn)

    def loss(*args):
        *inputs, do = args
        return jnp.sum(attn(*inputs).astype(jnp.float32) * do.astype(jnp.float32))
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    if with_bias:
        return fwd, fwd_bwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return fwd, fwd_bwd


def run_case(name, c, impls, config=None, check=True):
    b, n, s, d, mask = c["b"], c["n"], c["s"], c["d"], c["mask"]
    frac = allowed_fraction(mask, s, s)
    flops_fwd = 4 * b * n * s * s * d * frac
    key = jax.random.key(0)
    args = []
    for i in range(3):
        ks = jax.random.split(jax.random.fold_in(key, i), 4)
        q = jax.random.normal(ks[0], (b, s, n, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, s, n, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, s, n, d), jnp.bfloat16)
        do = jax.random.normal(ks[3], (b, s, n, d), jnp.bfloat16)
        bias = (0.5 * jax.random.normal(jax.random.fold_in(ks[3], 1), c["bias"], jnp.bfloat16),) \
            if "bias" in c else ()
        args.append((q, k, v, *bias, do))
    row = dict(case=name, b=b, n=n, s=s, d=d, allowed_fraction=frac, flops_fwd=flops_fwd)
    if "bias" in c:
        row["bias_shape"] = list(c["bias"])
    for impl in impls:
        try:
            fns = make_fns(impl, mask, config if impl.startswith("pallas") else None,
                           with_bias="bias" in c)
            tf = time_call(fns[0], [a[:-1] for a in args], warmup=2, repeats=20).median_s
            tfb = time_call(fns[1], args, warmup=2, repeats=20).median_s
            row[impl] = dict(fwd_ms=tf * 1e3, fwd_bwd_ms=tfb * 1e3,
                             fwd_tflops=flops_fwd / tf / 1e12,
                             fwd_bwd_tflops=3.5 * flops_fwd / tfb / 1e12)
            if len(fns) == 3:  # the bias's gradient as well
                tfbb = time_call(fns[2], args, warmup=2, repeats=20).median_s
                row[impl].update(fwd_bwd_dbias_ms=tfbb * 1e3,
                                 fwd_bwd_dbias_tflops=3.5 * flops_fwd / tfbb / 1e12)
        except Exception as e:  # a baseline that cannot run this case (OOM, unsupported)
            row[impl] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    if check and s <= 4096:
        q, k, v, *bias, _ = args[0]
        f32 = [x[:1].astype(jnp.float32) for x in (q, k, v)]
        ref = jaxattn.dot_product_attention(*f32, *[x.astype(jnp.float32) for x in bias],
                                            mask=mask, implementation="reference")
        got = make_fns("pallas", mask, config, with_bias=bool(bias))[0](
            q[:1], k[:1], v[:1], *bias).astype(jnp.float32)
        row["rel_err_vs_f32_reference"] = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    return row


def tune(args):
    """Time several TritonConfigs on the given cases; print one line per (case, config)."""
    all_cases = cases()
    rows = []
    for name in args.cases:
        for cfg_json in args.tune:
            cfg = TritonConfig(**json.loads(cfg_json))
            try:
                row = run_case(name, all_cases[name], ["pallas_triton"], cfg, check=False)
            except Exception as e:
                row = dict(case=name, error=str(e)[:300])
            row["config"] = cfg_json
            rows.append(row)
            r = row.get("pallas_triton", {})
            print(f"{name} | {cfg_json} | {r.get('fwd_tflops', float('nan')):.0f}/"
                  f"{r.get('fwd_bwd_tflops', float('nan')):.0f} {r.get('error', '')[:200]}", flush=True)
            with open(args.out, "w") as f:
                json.dump(dict(rows=rows), f, indent=1)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="flash_bench.json")
    p.add_argument("--cases", nargs="*", default=None)
    p.add_argument("--impls", nargs="*", default=["pallas_triton", "cudnn", "xla"])
    p.add_argument("--config", default=None, help="TritonConfig fields as JSON")
    p.add_argument("--tune", nargs="*", default=None,
                   help="TritonConfig JSONs to time (pallas only) on --cases")
    args = p.parse_args(argv)
    if args.tune:
        return tune(args)
    config = TritonConfig(**json.loads(args.config)) if args.config else None
    all_cases = cases()
    names = args.cases or list(all_cases)
    rows = []
    meta = dict(device=str(jax.devices()[0].device_kind), date=datetime.date.today().isoformat(),
                jax=jax.__version__, config=str(config))
    for name in names:
        try:
            row = run_case(name, all_cases[name], args.impls, config)
        except Exception:
            traceback.print_exc()
            row = dict(case=name, error=traceback.format_exc()[-500:])
        rows.append(row)
        line = [name]
        for impl in args.impls:
            r = row.get(impl, {})
            dbias = f" (+dbias {r['fwd_bwd_dbias_tflops']:.0f})" if "fwd_bwd_dbias_tflops" in r else ""
            line.append(f"{impl}: {r.get('fwd_tflops', float('nan')):.0f}/{r.get('fwd_bwd_tflops', float('nan')):.0f}{dbias}"
                        if "fwd_tflops" in r else f"{impl}: {r.get('error', '-')[:60]}")
        if "rel_err_vs_f32_reference" in row:
            line.append(f"err {row['rel_err_vs_f32_reference']:.1e}")
        print(" | ".join(line), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
