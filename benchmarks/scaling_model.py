"""Scaling model of jaxattn.ring_attention: the arithmetic behind docs/scaling.md.

    python benchmarks/scaling_model.py            # prints the tables docs/scaling.md quotes
    python benchmarks/scaling_model.py --json model.json

Causal self-attention, B=1, N=K=16 heads, D=128, bf16 (the configuration of
benchmarks/ring_bench.py), T tokens on P GPUs, L = T/P tokens per GPU.

Measured inputs (benchmarks/results/ring_*_4xh100_*.json, 4 H100 SXM, one host, 2026-11-27):
  R      kernel rate of a ring step's blocks: FLOPs per device / local_kernels_ms (the same
         kernel calls without any communication); below 16k tokens per GPU scaled down
         by pallas_triton's measured fwd+bwd curve (flash_bench_2026-11-27_h100.json, D128).
  gamma  overhead of a step whose transfer is hidden: zigzag-layout ring / local kernels − 1
         (NCCL's kernels share the SMs, merges and packing), mean of the three runs of the
         current code.
  perm   contiguous-layout cost (zigzag permutation in and out, not hidden), ms per byte
         moved over the link: (ring − ring_zigzag_layout) / permuted bytes, same runs.
  eff    measured NVLink efficiency: the ring's transfers alone (comm_only_ms) against
         their bytes, over the datasheet bandwidth.
Datasheet inputs (vendor figures, not measured here):
  NVLink 4 (H100 / H200 SXM): 900 GB/s per GPU, both directions together: 450 GB/s each way.
  InfiniBand NDR: 400 Gb/s = 50 GB/s per port and direction, typically one port per GPU.
  Cross-host transfers are assumed to reach the same fraction `eff` of their line rate as
  NVLink does here (not measured: no multi-host run yet).

What travels (jaxattn.parallel: one packed buffer per hop, each hop overlapping one
step's kernels): forward, P−1 hops of the K and V shards (bf16: 4·L·K·D bytes); backward,
hop 0 K/V, hops 1..P−2 K/V plus the float32 dK/dV sums (12·L·K·D), hop P−1 the sums alone
(8·L·K·D), then the sums home in bf16 (4·L·K·D) overlapping the last dQ kernel.
A step is max(kernels · (1 + gamma), hop bytes / bandwidth): compute per hop grows as L²,
bytes as L, so below a crossover L* the transfers stop hiding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
H100_RUNS = ("ring_bench_2026-11-27_4xh100_one_buffer_per_hop.json",
             "ring_bench_2026-11-27_4xh100_overlap_lean_permutation.json",
             "ring_bench_2026-11-27_4xh100_overlap_bf16_last_hop.json")
WEAK_AND_LONGEST = ("ring_bench_2026-11-27_4xh100_one_buffer_per_hop.json",
                    "ring_bench_2026-11-27_4xh100_longest_1m.json")
FLASH_BENCH = "flash_bench_2026-11-27_h100.json"

NVLINK_GBPS = 450.0     # per direction, per GPU (datasheet: 900 GB/s bidirectional)
IB_NDR_GBPS = 50.0      # per direction, per port (datasheet: 400 Gb/s)
GPUS_PER_HOST = 8
BACKWARD_FACTOR = 2.5   # backward FLOPs / forward FLOPs (benchmarks/flops.py)
DQ_SHARE = 3 / 7        # the dQ kernel's share of a block backward (3 of its 7 matmuls)

# Measured on H200s on 2026-11-29 with benchmarks/ring_bench.py (quoted from that run;
# its JSON is not in benchmarks/results): causal, 32k tokens per GPU.
H200_ANCHORS = {"tflops_1gpu": 379.0, "tflops_2gpu": 348.0, "ratio_2gpu": 1.09,
                "seconds_1m_tokens_2gpu": 21.0}

HEADS, KV_HEADS, HEAD_DIM, BYTES = 16, 16, 128, 2  # the benchmarked configuration
# The most tokens per GPU a step was seen to train with (H200, 141 GB: 1M tokens on 2 GPUs).
MEASURED_TOKENS_PER_GPU = 1 << 19


def _load(name):
    return json.loads((RESULTS / name).read_text())


def causal_flops(t, n=HEADS, d=HEAD_DIM):
    """Forward + backward FLOPs of causal attention over T tokens (ring_bench's model)."""
    return (1 + BACKWARD_FACTOR) * 4 * n * t * t * d * 0.5


@dataclasses.dataclass(frozen=True)
class Inputs:
    rate_tflops: float          # R at >= 16k tokens per GPU
    rate_curve: tuple           # ((tokens, fraction of R), ...) below that
    gamma: float
    perm_s_per_byte: float
    nvlink_efficiency: float
    sources: dict

    def rate(self, tokens_per_gpu):
        """Kernel rate (FLOP/s) of a ring step's blocks at L tokens per GPU."""
        pts = sorted(self.rate_curve)
        if tokens_per_gpu >= pts[-1][0]:
            return self.rate_tflops * 1e12
        if tokens_per_gpu <= pts[0][0]:
            return self.rate_tflops * 1e12 * pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 <= tokens_per_gpu <= x1:  # linear in log2(tokens)
                w = math.log2(tokens_per_gpu / x0) / math.log2(x1 / x0)
                return self.rate_tflops * 1e12 * (y0 + w * (y1 - y0))
        raise AssertionError


def zigzag_moved_fraction(p):
    """Share of a device's 2 chunks that the contiguous -> zigzag permutation sends to
    another device (chunk k goes to device k if k < P, else to 2P-1-k)."""
    dest = lambda k: k if k < p else 2 * p - 1 - k  # noqa: E731
    return sum(dest(k) != k // 2 for k in range(2 * p)) / (2 * p)


def permuted_bytes(tokens_per_gpu, p, n=HEADS, kh=KV_HEADS, d=HEAD_DIM):
    """Bytes one device sends to others for the contiguous layout: q, k, v in and the
    output back (forward), dO in and dq, dk, dv back (backward)."""
    per_token = (n + 2 * kh + n) * d * BYTES * 2
    return zigzag_moved_fraction(p) * tokens_per_gpu * per_token


def measured_inputs():
    runs = [_load(name)["overlap"] for name in H100_RUNS]
    p, t = runs[0]["gpus"], runs[0]["seq_len"]
    l = t // p
    per_device_flops = causal_flops(t) / p
    local_s = [r["local_kernels_ms"] / 1e3 for r in runs]
    rate = sum(per_device_flops / s for s in local_s) / len(runs) / 1e12
    gamma = sum(r["overlap_ratio_zigzag_layout"] for r in runs) / len(runs) - 1
    perm_s = sum(r["ring_ms"] - r["ring_zigzag_layout_ms"] for r in runs) / len(runs) / 1e3
    e = l * KV_HEADS * HEAD_DIM  # elements of one K shard
    comm_bytes = (4 * e * (p - 1)) * 2 + 8 * e * p  # comm_only_step: fwd + bwd K/V hops, P dK/dV hops
    comm_s = sum(r["comm_only_ms"] for r in runs) / len(runs) / 1e3
    efficiency = comm_bytes / comm_s / (NVLINK_GBPS * 1e9)
    rows = {r["s"]: r["pallas_triton"]["fwd_bwd_tflops"] for r in _load(FLASH_BENCH)["rows"]
            if r["d"] == HEAD_DIM and r["case"].endswith("full")}
    top = rows[max(rows)]
    curve = tuple((s, min(1.0, v / top)) for s, v in sorted(rows.items()))
    return Inputs(rate, curve, gamma, perm_s / permuted_bytes(l, p), efficiency,
                  {"ring runs": list(H100_RUNS), "kernel curve": FLASH_BENCH,
                   "tokens_per_gpu": l, "gpus": p})


# ---------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------
def ring_step(inp: Inputs, t, p, link_gbps, *, layout="zigzag", rate=None):
    """(ring seconds, local-kernel seconds) of one causal fwd+bwd step, T tokens, P GPUs,
    the slowest hop at `link_gbps` (GB/s per direction, before efficiency)."""
    l = t / p
    r = rate if rate is not None else inp.rate(l)
    kf = (causal_flops(t) / p) / (1 + BACKWARD_FACTOR) / p / r   # forward kernels per step
    kb = BACKWARD_FACTOR * kf
    local = p * (kf + kb)
    if p == 1:
        return local, local
    bw = link_gbps * 1e9 * inp.nvlink_efficiency
    e = l * KV_HEADS * HEAD_DIM
    fwd_hops = [4 * e] * (p - 1) + [0]
    bwd_hops = [4 * e] + [12 * e] * (p - 2) + [8 * e]
    ring = sum(max(kf * (1 + inp.gamma), x / bw) for x in fwd_hops)
    ring += sum(max(kb * (1 + inp.gamma), x / bw) for x in bwd_hops)
    ring += max(0.0, 4 * e / bw - DQ_SHARE * kb)  # the sums home, behind the last dQ kernel
    if layout == "contiguous":
        ring += inp.perm_s_per_byte * permuted_bytes(l, p) * (NVLINK_GBPS / link_gbps)
    return ring, local


def crossover_tokens(inp: Inputs, link_gbps, n=HEADS, kh=KV_HEADS):
    """L* (tokens per GPU, per ring member) below which a middle backward hop (12·L·K·D
    bytes) outlasts its step's kernels (2.5 · 2·N·D·L² FLOPs) at the plateau rate."""
    bw = link_gbps * 1e9 * inp.nvlink_efficiency
    return 12 * kh * inp.rate_tflops * 1e12 / (BACKWARD_FACTOR * 2 * n * bw * (1 + inp.gamma))


def hybrid_step(inp: Inputs, t, p, link_gbps=IB_NDR_GBPS, group=GPUS_PER_HOST):
    """Head-parallel inside a host, ring across hosts (not in jaxattn): an all-to-all over
    NVLink turns each host's T/H tokens x all heads into all of them x N/G heads per GPU;
    the ring then runs over H = P/G hosts, each GPU sending its own heads over its own
    NIC: per GPU the ring of an H-GPU job with G times the tokens and 1/G of the heads.
    Returns (seconds, local-kernel seconds)."""
    hosts = p // group
    l_host = t / hosts
    # One GPU's share: L_host tokens, N/G heads: per-step FLOPs and bytes scale as N/G, K/G.
    scale = 1 / group
    ring, local = ring_step(inp, t, hosts, link_gbps, rate=inp.rate(l_host))
    ring, local = ring * scale, local * scale
    if hosts == 1:
        ring = local * (1 + inp.gamma)
    # All-to-all in (q, k, v) and out (o), and the same for the cotangents, over NVLink.
    a2a_bytes = (group - 1) / group * (t / p) * (HEADS + 2 * KV_HEADS + HEADS) * HEAD_DIM * BYTES * 2
    ring += a2a_bytes / (NVLINK_GBPS * 1e9 * inp.nvlink_efficiency)
    return ring, local


def predictions(inp: Inputs, gpus=(8, 16, 64), tokens=tuple(2 ** k * 32768 for k in range(9))):
    """Rows: gpus, T, layout, ratio (ring / local kernels), TFLOP/s per GPU."""
    rows = []
    for p in gpus:
        for t in tokens:
            if t % (2 * p):
                continue
            plans = {}
            if p <= GPUS_PER_HOST:
                plans["ring on NVLink"] = ring_step(inp, t, p, NVLINK_GBPS)
            else:
                plans["ring across hosts (IB hop)"] = ring_step(inp, t, p, IB_NDR_GBPS)
                plans["all-to-all in host + ring across hosts"] = hybrid_step(inp, t, p)
            for name, (ring, local) in plans.items():
                rows.append({"gpus": p, "tokens": t, "tokens_per_gpu": t // p, "plan": name,
                             "ratio": ring / local,
                             "tflops_per_gpu": causal_flops(t) / p / ring / 1e12,
                             "step_s": ring})
    return rows


def checks(inp: Inputs):
    """The model against the measurements it was not calibrated on (and the 4-GPU ones)."""
    out = []
    weak = {r["gpus"]: r for r in _load(WEAK_AND_LONGEST[0])["weak_scaling"]}
    one = weak[1]["tflops_per_gpu"]
    for p in (1, 2, 4):
        t = weak[p]["seq_len"]
        rate = inp.rate_tflops * 1e12 if p > 1 else one * 1e12
        ring, _ = ring_step(inp, t, p, NVLINK_GBPS, layout="contiguous", rate=rate)
        out.append({"what": f"H100 {p} GPU(s), {t // 1024}k tokens, TFLOP/s per GPU (contiguous)",
                    "model": causal_flops(t) / p / ring / 1e12, "measured": weak[p]["tflops_per_gpu"]})
    longest = _load(WEAK_AND_LONGEST[1])["longest"]
    t = longest["max_seq_len"]
    ring, _ = ring_step(inp, t, longest["gpus"], NVLINK_GBPS, layout="contiguous")
    out.append({"what": f"H100 4 GPUs, {t // 1024}k tokens, seconds per step (contiguous)",
                "model": ring, "measured": longest["tried"][-1]["time_ms"] / 1e3})
    # H200: same compute as the H100; its own kernel rate from its 1-GPU number.
    h200 = dataclasses.replace(inp, rate_tflops=inp.rate_tflops * H200_ANCHORS["tflops_1gpu"] / one)
    for layout in ("zigzag", "contiguous"):
        ring, local = ring_step(h200, 65536, 2, NVLINK_GBPS, layout=layout)
        out.append({"what": f"H200 2 GPUs, 64k tokens, ring / local kernels ({layout})",
                    "model": ring / local, "measured": H200_ANCHORS["ratio_2gpu"]})
    ring, _ = ring_step(h200, 65536, 2, NVLINK_GBPS, layout="contiguous")
    out.append({"what": "H200 2 GPUs, 64k tokens, TFLOP/s per GPU (contiguous)",
                "model": causal_flops(65536) / 2 / ring / 1e12, "measured": H200_ANCHORS["tflops_2gpu"]})
    ring, _ = ring_step(h200, 1 << 20, 2, NVLINK_GBPS, layout="contiguous")
    out.append({"what": "H200 2 GPUs, 1024k tokens, seconds per step (contiguous)",
                "model": ring, "measured": H200_ANCHORS["seconds_1m_tokens_2gpu"]})
    for row in out:
        row["error"] = row["model"] / row["measured"] - 1
    return out


def report(inp: Inputs):
    lines = ["## Measured inputs", "",
             f"- kernel rate R of a ring step's blocks: {inp.rate_tflops:.0f} TFLOP/s (H100, "
             f"{inp.sources['tokens_per_gpu'] // 1024}k tokens per GPU)",
             f"- hidden-step overhead gamma: {inp.gamma:.3f}",
             f"- NVLink efficiency: {inp.nvlink_efficiency:.2f} of {NVLINK_GBPS:.0f} GB/s = "
             f"{inp.nvlink_efficiency * NVLINK_GBPS:.0f} GB/s per direction",
             f"- permutation (contiguous layout): {inp.perm_s_per_byte * 1e12:.2f} ms per GB moved "
             f"({1 / inp.perm_s_per_byte / 1e9:.0f} GB/s)",
             "- kernel rate below 16k tokens per GPU (fraction of R): "
             + ", ".join(f"{s // 1024}k: {f:.2f}" for s, f in sorted(inp.rate_curve)),
             ""]
    l = inp.sources["tokens_per_gpu"]
    e = l * KV_HEADS * HEAD_DIM
    kf = 2 * HEADS * HEAD_DIM * l * l / (inp.rate_tflops * 1e12)
    bw = NVLINK_GBPS * 1e9 * inp.nvlink_efficiency
    lines += [f"## One ring step at {l // 1024}k tokens per GPU (N=K={HEADS}, D={HEAD_DIM}, bf16)", "",
              "| hop | bytes | transfer at the measured NVLink rate | kernels of the step | headroom |",
              "|---|---|---|---|---|"]
    for name, nbytes, kernels in (("forward: K, V", 4 * e, kf),
                                  ("backward: K, V + float32 dK, dV", 12 * e, BACKWARD_FACTOR * kf),
                                  ("backward, last: float32 dK, dV", 8 * e, BACKWARD_FACTOR * kf),
                                  ("home: dK, dV in bf16 (behind the last dQ kernel)", 4 * e,
                                   DQ_SHARE * BACKWARD_FACTOR * kf)):
        lines.append(f"| {name} | {nbytes / 1e6:.0f} MB | {nbytes / bw * 1e3:.2f} ms | {kernels * 1e3:.1f} ms | "
                     f"{kernels * bw / nbytes:.1f}x |")
    lines += ["", "## Crossover: tokens per GPU (per ring member) below which transfers show", ""]
    for name, gbps in (("NVLink", NVLINK_GBPS), ("InfiniBand NDR, one port per GPU", IB_NDR_GBPS)):
        lines.append(f"- {name} ({gbps:.0f} GB/s datasheet): L* = {crossover_tokens(inp, gbps):,.0f} "
                     f"(at the full datasheet rate: {crossover_tokens(inp, gbps) * inp.nvlink_efficiency:,.0f})")
    lines += ["", "## Checks against measurements", "", "| measurement | model | measured | error |",
              "|---|---|---|---|"]
    for c in checks(inp):
        lines.append(f"| {c['what']} | {c['model']:.3g} | {c['measured']:.3g} | {100 * c['error']:+.1f} % |")
    lines += ["", "## Predictions (causal, N=K=16, D=128, bf16, zigzag layout)", "",
              f"†: more tokens per GPU than any measured step ({MEASURED_TOKENS_PER_GPU // 1024}k): memory unverified.",
              "", "| GPUs | tokens | per GPU | plan | ring / local kernels | TFLOP/s per GPU | step |",
              "|---|---|---|---|---|---|---|"]
    for r in predictions(inp):
        mark = " †" if r["tokens_per_gpu"] > MEASURED_TOKENS_PER_GPU else ""
        lines.append(f"| {r['gpus']} | {r['tokens'] // 1024}k | {r['tokens_per_gpu'] / 1024:g}k{mark} | "
                     f"{r['plan']} | {r['ratio']:.2f} | {r['tflops_per_gpu']:.0f} | {r['step_s']:.3g} s |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write inputs, checks and predictions here")
    args = ap.parse_args(argv)
    inp = measured_inputs()
    print(report(inp))
    if args.json:
        Path(args.json).write_text(json.dumps({"inputs": dataclasses.asdict(inp), "checks": checks(inp),
                                               "predictions": predictions(inp)}, indent=1))


if __name__ == "__main__":
    main()
