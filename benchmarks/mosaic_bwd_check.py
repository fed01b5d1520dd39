"""Check and time the Mosaic GPU backward kernels on a Hopper GPU, one JSON out.

    python benchmarks/mosaic_bwd_check.py correctness OUT.json [CASE ...]
    python benchmarks/mosaic_bwd_check.py timing OUT.json [CASE ...]
    python benchmarks/mosaic_bwd_check.py variants OUT.json [CASE ...]

correctness (MOSAIC_BWD_FUSED=1: the fused kernel, 0: the two kernels): dQ, dK, dV of
the kernels (driven directly, with out/lse from the float32 reference) against jax.vjp of jaxattn.reference in float32, worst row of each tensor;
two runs bitwise identical. timing: the backward kernels alone vs cuDNN's backward
(jax.vjp of jax.nn.dot_product_attention(implementation="cudnn"), backward call only),
TFLOP/s = 2.5 · 4·B·N·T·S·D·density / t; the default config, then the two-kernel and
the fused backward (backward_fused.py) each, the fused one's two runs compared bitwise.
variants: the two-kernel backward alone under each of VARIANTS (the default persistent
kernels, the per-block ones; the memory warpgroup's registers, hence the compute warpgroups'), each one's dQ,
dK, dV compared with the default's; with MOSAIC_GPU_DUMP_PTXAS=1 ptxas reports each variant's registers and
spills as it compiles (in that order).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.benchmarking.cases import (BIGBIRD_BLOCK, BIGBIRD_GLOBAL, BIGBIRD_RANDOM_BLOCKS,
                              BIGBIRD_WINDOW)
from jaxattn.masks import (CausalMask, FullMask, LocalMask, bigbird_mask, build_block_metadata,
                           causal_document_mask)
from jaxattn.masks.structured import GlobalMask
from jaxattn.reference import reference_attention
from pallas_kernels.flash_vjp import FlashStatic, backward_lse
from pallas_kernels.mosaic_gpu import backward_kernels as mb

RESULTS: dict = {}
ONLY: tuple = ()     # case names given after OUT.json on the command line (all if none)
# correctness: MOSAIC_BWD_FUSED=1 checks the fused kernel, 0 the two kernels, unset the
# default config's choice.
FUSED = {"1": True, "0": False}.get(os.environ.get("MOSAIC_BWD_FUSED", ""))


@dataclasses.dataclass(frozen=True)
class ConfigHolder:
    """Stands in for the backend config: the backward reads its `backward` field."""
    backward: object


def _dump(path):
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1)


def prepare(mask, t, s, h, cap, scale, fused=None):
    """fused: None = the default config's choice, else MosaicBackwardConfig.fused."""
    cfg = mb.default_backward_config(mb.padded_head_dim(h))
    if fused is not None:
        cfg = dataclasses.replace(cfg, fused=fused)
    metas = {n: jax.tree_util.tree_map(jnp.asarray, build_block_metadata(mask, t, s, *tl))
             for n, tl in cfg.metadata_tiles().items()}
    operands = mask.operands()
    static = FlashStatic(backend=None, scale=scale, logits_soft_cap=cap,
                         mask_fn=None if isinstance(mask, FullMask) else mask.evaluate,
                         operand_kinds=tuple((o.kind, o.layout_block) for o in operands),
                         config=ConfigHolder(cfg), interpret=False)
    return static, metas, tuple(jnp.asarray(o.array) for o in operands)


def kernel_backward(static, metas, operands):
    @jax.jit
    def run(q, k, v, out, lse, do):
        delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), out.astype(jnp.float32))
        dq, dk, dv, _ = mb.backward(static, q, k, v, None, out, backward_lse(lse), do, delta,
                                    metas, operands, parts=("dq", "dkdv"))
        return dq, dk, dv
    return run


def worst_row(a, r):
    """max over rows of |a − r|₂ / max(|r|₂, 5e-2·rms row norm) (rows = all but the
    last axis; see tests/test_mosaic_gpu_backward.py for the floor)."""
    a = np.asarray(a, np.float32).reshape(-1, a.shape[-1])
    r = np.asarray(r, np.float32).reshape(-1, r.shape[-1])
    num = np.linalg.norm(a - r, axis=-1)
    den = np.linalg.norm(r, axis=-1)
    floor = 5e-2 * np.sqrt(np.mean(den ** 2)) + 1e-30
    return float(np.max(num / np.maximum(den, floor))), bool(np.all(np.isfinite(a)))


def correctness_case(name, mask, b, t, s, n, kh, h, dtype=jnp.bfloat16, cap=None):
    key = jax.random.PRNGKey(zlib.crc32(name.encode()))   # the same inputs every run
    kq, kk, kv, ko = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, kh, h), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, kh, h), jnp.float32).astype(dtype)
    do = jax.random.normal(ko, (b, t, n, h), jnp.float32).astype(dtype)
    scale = h ** -0.5
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = lambda q_, k_, v_: reference_attention(q_, k_, v_, None, mask, scale=scale,  # noqa: E731
                                                 logits_soft_cap=cap, return_residuals=True)
    (out, lse), vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
    rdq, rdk, rdv = vjp((f32(do), jnp.zeros_like(lse)))
    static, metas, operands = prepare(mask, t, s, h, cap, scale, FUSED)
    run = kernel_backward(static, metas, operands)
    t0 = time.time()
    # D = rowsum(dO ∘ O) from the float32 output: the kernels' own error, not that of
    # a bf16-rounded O (which alone moves rows with near-zero gradient by up to ~9 %).
    dq, dk, dv = jax.block_until_ready(run(q, k, v, out, lse, do))
    compile_s = time.time() - t0
    dq2, dk2, dv2 = jax.block_until_ready(run(q, k, v, out, lse, do))
    same = all(bool(jnp.array_equal(x, y)) for x, y in ((dq, dq2), (dk, dk2), (dv, dv2)))
    res = {"shape": [b, t, s, n, kh, h], "dtype": jnp.dtype(dtype).name, "cap": cap,
           "deterministic": same, "first_call_s": round(compile_s, 2)}
    for nm, got, want in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        err, finite = worst_row(got, want)
        res[nm + "_worst_row"] = err
        res[nm + "_finite"] = finite
    res["ok"] = bool(same and all(res[x + "_finite"] and res[x + "_worst_row"] < 0.03
                                  for x in ("dq", "dk", "dv")))
    return res


def correctness(path):
    cases = [
        ("full_d64", FullMask(), 1, 256, 256, 2, 2, 64),
        ("causal_d128", CausalMask(), 2, 512, 512, 2, 2, 128),
        ("local_gqa_d128", LocalMask(100, 30), 1, 384, 384, 4, 2, 128),
        ("causal_ragged_d64", CausalMask(), 1, 300, 200, 4, 1, 64),
        ("full_ragged_TneS_d128", FullMask(), 1, 200, 333, 2, 1, 128),
        ("longformer_causal_d128", (LocalMask(64, 64) | GlobalMask(32)) & CausalMask(), 1, 640, 640, 2, 1, 128),
        ("empty_rows_ragged_d128", CausalMask(offset=-50), 1, 300, 200, 2, 1, 128),
        ("empty_programs_d64", CausalMask(), 1, 256, 512, 2, 1, 64),
        ("bigbird_gqa_d128", bigbird_mask(640, window=64, num_global=32, num_random_blocks=1,
                                          block_size=128, causal=True), 1, 640, 640, 4, 2, 128),
        ("documents_d64", causal_document_mask(jnp.asarray(
            np.repeat(np.arange(3), [100, 250, 162])[None].repeat(2, 0))), 2, 512, 512, 2, 1, 64),
        ("causal_softcap_d128", CausalMask(), 1, 256, 256, 2, 2, 128, jnp.bfloat16, 20.0),
        ("causal_f16_d96", CausalMask(), 1, 256, 256, 2, 2, 96, jnp.float16),
    ]
    for case in cases:
        name = case[0]
        if ONLY and name not in ONLY:
            continue
        try:
            RESULTS[name] = correctness_case(*case)
        except Exception as e:  # noqa: BLE001 - record and go on
            RESULTS[name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                             "trace": traceback.format_exc()[-3000:]}
        print(name, RESULTS[name], flush=True)
        _dump(path)


def _median_time(fn, args, reps=20):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def timing_case(name, mask, t, window, b=1, n=16, h=128):
    dtype = jnp.bfloat16
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(kk, (b, t, n, h), dtype) for kk in ks)
    scale = h ** -0.5
    sparse = mask is BIGBIRD_16K      # no cuDNN equivalent: dense residuals, timing only
    causal = not isinstance(mask, FullMask) and not sparse
    local = None if window is None else (window - 1, 0)
    cudnn = lambda q_, k_, v_: jax.nn.dot_product_attention(  # noqa: E731
        q_, k_, v_, scale=scale, is_causal=causal, local_window_size=local,
        implementation="cudnn")
    out, vjp = jax.vjp(cudnn, q, k, v)
    _, lse = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                          local_window_size=local, implementation="cudnn",
                                          return_residual=True)
    lse = jnp.swapaxes(lse, 1, 2).astype(jnp.float32)         # [B, T, N] -> [B, N, T]
    cudnn_bwd = jax.jit(lambda do_: vjp(do_))
    i = np.arange(t)
    if sparse:
        density = float(np.mean(mask.to_dense(t, t)))
    else:
        allowed = (np.minimum(i + 1, window) if window else (i + 1 if causal else np.full(t, t)))
        density = float(allowed.sum()) / (t * t)
    flops = 2.5 * 4 * b * n * t * t * h * density
    res = {"shape": [b, t, t, n, h], "density": density}
    try:
        if not sparse:
            tc = _median_time(cudnn_bwd, (do,))
            res.update(cudnn_ms=tc * 1e3, cudnn_tflops=flops / tc / 1e12)
    except Exception as e:  # noqa: BLE001
        res["cudnn_error"] = f"{type(e).__name__}: {e}"[:1000]
    static, metas, operands = prepare(mask, t, t, h, None, scale)
    run = kernel_backward(static, metas, operands)
    try:
        tm = _median_time(run, (q, k, v, out, lse, do))
        res.update(mosaic_ms=tm * 1e3, mosaic_tflops=flops / tm / 1e12)
        two = run(q, k, v, out, lse, do)
        for fused in (False, True):
            holder = ConfigHolder(mb.MosaicBackwardConfig(fused=fused))
            run_f = kernel_backward(dataclasses.replace(static, config=holder), metas, operands)
            tf = _median_time(run_f, (q, k, v, out, lse, do))
            label = "fused" if fused else "two_kernels"
            res.update({f"{label}_ms": tf * 1e3, f"{label}_tflops": flops / tf / 1e12})
            if fused:
                a, b_ = run_f(q, k, v, out, lse, do), run_f(q, k, v, out, lse, do)
                res["fused_bitwise_repeat"] = all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b_))
                res["fused_vs_two_kernels_max_abs"] = [
                    float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                    for x, y in zip(a, two)]
        if os.environ.get("MOSAIC_BWD_FUSED_BREAKDOWN"):
            # Where the fused kernel's time goes: its dQ adds unordered, or left out.
            from pallas_kernels.mosaic_gpu import backward_fused
            holder = ConfigHolder(mb.MosaicBackwardConfig(fused=True))
            try:
                for adds in ("unordered", "skip"):
                    backward_fused.DQ_ADDS = adds   # read when the kernel is traced
                    run_f = kernel_backward(dataclasses.replace(static, config=holder), metas,
                                            operands)
                    res[f"fused_{adds}_ms"] = _median_time(run_f, (q, k, v, out, lse, do)) * 1e3
            finally:
                backward_fused.DQ_ADDS = "ordered"
        static2 = static
        for part in ("dq", "dkdv"):
            one = jax.jit(lambda q_, k_, v_, o_, l_, d_, part=part: mb.backward(
                static2, q_, k_, v_, None, o_, backward_lse(l_), d_,
                jnp.zeros(l_.shape, jnp.float32), metas, operands, parts=(part,)))
            res[part + "_ms"] = _median_time(one, (q, k, v, out, lse, do)) * 1e3
    except Exception as e:  # noqa: BLE001
        res["mosaic_error"] = f"{type(e).__name__}: {e}"[:2000]
    return res


# The BigBird case of benchmarks/cases.py (the Triton backend's numbers use the same).
BIGBIRD_16K = bigbird_mask(16384, window=BIGBIRD_WINDOW, num_global=BIGBIRD_GLOBAL,
                           num_random_blocks=BIGBIRD_RANDOM_BLOCKS, block_size=BIGBIRD_BLOCK, seed=0)


TIMING_CASES = [("full_d128_s16k", FullMask(), 16384, None),
                ("causal_d128_s16k", CausalMask(), 16384, None),
                ("causal_window2048_s32k", LocalMask(2047, 0), 32768, 2048),
                ("causal_window256_s32k", LocalMask(255, 0), 32768, 256),
                ("bigbird_causal_s16k", BIGBIRD_16K, 16384, None)]

# The variants also time the one part of the strided & causal plan at 32k (D128 H16,
# stride 256): 256 residue classes of 128 causal rows, as 4096 heads.
VARIANT_CASES = TIMING_CASES + [("strided256_causal_part_s32k", CausalMask(), 128, None, 4096)]

# name -> MosaicBackwardConfig fields
VARIANTS = {"default": {}, "per_block": {"persistent": False},
            "registers_24": {"memory_registers": 24}}
ROUNDS = int(os.environ.get("MOSAIC_BWD_ROUNDS", "5"))


def variants(path):
    """Each variant compiled once, then timed in ROUNDS interleaved rounds (10 calls each;
    the median of the rounds' medians), so that clock changes over the run (the H200's
    power cap) fall on every variant alike."""
    for name, mask, t, _, *heads in VARIANT_CASES:
        if ONLY and name not in ONLY:
            continue
        b, n, h = 1, heads[0] if heads else 16, 128
        ks = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, do = (jax.random.normal(x, (b, t, n, h), jnp.bfloat16) for x in ks)
        out = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
        lse = jnp.full((b, n, t), 8.0, jnp.float32)
        args = (q, k, v, out, lse, do)
        static, metas, operands = prepare(mask, t, t, h, None, h ** -0.5)
        res, runs, first = {}, {}, None
        for label, fields in VARIANTS.items():
            holder = ConfigHolder(mb.MosaicBackwardConfig(**fields))
            try:
                print(f"ptxas follows for {name} {label}", file=sys.stderr, flush=True)
                run = kernel_backward(dataclasses.replace(static, config=holder), metas, operands)
                grads = jax.block_until_ready(run(*args))
                if label == "default":
                    first = grads
                if first is not None:
                    res[label + "_max_abs_vs_default"] = max(
                        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                        for x, y in zip(grads, first))
                runs[label] = run
            except Exception as e:  # noqa: BLE001
                res[label + "_error"] = f"{type(e).__name__}: {e}"[:1000]
        rounds = {label: [] for label in runs}
        for _ in range(ROUNDS):
            for label, run in runs.items():
                rounds[label].append(_median_time(run, args, reps=10) * 1e3)
        for label, times in rounds.items():
            res[label + "_ms"] = float(np.median(times))
            res[label + "_rounds"] = times   # ms
        RESULTS[name] = res
        print(name, {k: round(v, 3) for k, v in res.items() if k.endswith("_ms")}, flush=True)
        _dump(path)


def timing(path):
    cases = TIMING_CASES
    for name, mask, t, window in cases:
        if ONLY and name not in ONLY:
            continue
        try:
            RESULTS[name] = timing_case(name, mask, t, window)
        except Exception as e:  # noqa: BLE001
            RESULTS[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(name, RESULTS[name], flush=True)
        _dump(path)


if __name__ == "__main__":
    mode, path, ONLY = sys.argv[1], sys.argv[2], tuple(sys.argv[3:])
    RESULTS["meta"] = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "mode": mode}
    {"correctness": correctness, "timing": timing, "variants": variants}[mode](path)
    _dump(path)
