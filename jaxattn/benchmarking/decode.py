"""Decode attention from a KV cache, timed: jaxattn's flash-decoding kernel beside jax.nn
(`jaxattn bench --decode` and benchmarks/decode_bench.py).

Decoding is memory-bound, so the figure of merit is GB/s = bytes of K and V the call must
read / time: full-length rows read B · context · K · H · itemsize · 2 bytes (a window of w
keys counts w keys per row), compared with the card's HBM bandwidth.

Timing: one executable runs `inner` (≤ 32) decode steps back to back, enough for ~2 ms of
work so that each call's dispatch is shared by many steps (on an H200 a 1 × 32k step
measured 77 µs with at most 8 steps per call and 52 µs with 32 for jaxattn, 65 and 56 µs
for cuDNN: BENCHMARKS.md, 2026-11-30). Each step's query depends on the previous step's
output (q + 0 · out, as in real decoding), so no compiler can merge the steps into one
pass over the cache (XLA's dot merger joins independent dots that share an operand: a
run without the chain credited XLA with more than the HBM's bandwidth). Cache copies
rotate so that together they exceed the L2 where they fit; median over the repeats.

Two figures per row. `gbps`: each call waited for (`jax.block_until_ready`), so every
`inner` steps also carry one call's issue and wait (0.2–0.5 ms a call on an H200:
BENCHMARKS.md, twelfth run), which weighs most where a step is long and `inner` small. `steady_gbps`:
`BACK_TO_BACK_CALLS` calls issued without waiting and one wait at the end, the host ahead
of the device as in a serving loop that does not stop to look at every token: the
time the device spends per step (one such batch per row, or per round and row in
interleaved rounds, whose median it then is).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import traceback

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import masks as M
from jaxattn.benchmarking.timing import rotation_sets, time_back_to_back, time_call, time_rounds

IMPLEMENTATIONS = ("pallas_triton", "cudnn", "xla")
LAYOUTS = ("contiguous", "paged16", "paged64")
HBM_GBPS = {"H200": 4800.0, "H100": 3350.0}   # peak HBM bandwidth by card (for % of peak)
TARGET_EXEC_S = 2e-3
MAX_INNER = 32
MAX_SETS = 8          # cache copies rotated through at most (device memory)
MAX_CACHE_BYTES = 40e9
BACK_TO_BACK_CALLS = 10   # executables of `inner` steps issued without waiting (steady_gbps)


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """One decode shape: `tq` new tokens per row against a cache of `context` slots (all
    valid), `kv_heads` K/V heads shared by `num_heads` query heads."""
    kv_heads: int
    batch: int
    context: int
    tq: int = 1
    layout: str = "contiguous"       # "contiguous" or "paged<page size>"
    window: int | None = None        # sliding window of this many keys (the newest)
    num_heads: int = 32
    head_dim: int = 128

    @property
    def name(self) -> str:
        ctx = f"{self.context // 1024}k" if self.context % 1024 == 0 else str(self.context)
        window = "" if self.window is None else f" window {self.window}"
        head_dim = "" if self.head_dim == 128 else f" H{self.head_dim}"
        return f"K{self.kv_heads} B{self.batch} ctx {ctx} Tq{self.tq} {self.layout}{window}{head_dim}"

    def keys_read(self) -> int:
        return self.context if self.window is None else min(self.window, self.context)

    def kv_bytes(self, dtype, keys: int | None = None) -> int:
        keys = self.keys_read() if keys is None else keys
        return 2 * self.batch * keys * self.kv_heads * self.head_dim * jnp.dtype(dtype).itemsize

    def mask(self):
        return None if self.window is None else M.LocalMask(self.window - 1, 0)


def issue_cases() -> tuple[DecodeCase, ...]:
    """The table of the decode issue (K8, Tq 1, three layouts) and a 4k window over a 128k
    cache beside a 4k cache."""
    grid = ((1, 32768), (1, 131072), (8, 4096), (8, 131072), (64, 32768))
    out = [DecodeCase(8, b, ctx, 1, layout) for b, ctx in grid for layout in LAYOUTS]
    out += [DecodeCase(8, 8, 4096), DecodeCase(8, 8, 131072, window=4096)]
    return tuple(out)


def full_cases(dtype=jnp.bfloat16) -> tuple[DecodeCase, ...]:
    """K in {8, 1}, B in {1, 8, 64}, context in {4k, 32k, 128k}, Tq in {1, 4}, every
    layout (caches over MAX_CACHE_BYTES left out), and the window pair."""
    out = [DecodeCase(k, b, ctx, tq, layout)
           for k in (8, 1) for b in (1, 8, 64) for ctx in (4096, 32768, 131072)
           for tq in (1, 4) for layout in LAYOUTS]
    out = [c for c in out if c.kv_bytes(dtype) <= MAX_CACHE_BYTES]
    return tuple(out) + issue_cases()[-2:]


SMOKE_CASES = (DecodeCase(2, 1, 256, 1, "contiguous", num_heads=4, head_dim=64),
               DecodeCase(2, 1, 256, 2, "paged16", num_heads=4, head_dim=64))


def make_cache(key, case: DecodeCase, dtype):
    """(key_cache, value_cache, page_table or None); a paged cache scatters each row's
    pages over the pool with a random permutation."""
    kk, kv, kp = jax.random.split(key, 3)
    if case.layout == "contiguous":
        shape, table = (case.batch, case.context, case.kv_heads, case.head_dim), None
    else:
        page = int(case.layout.removeprefix("paged"))
        pages = case.context // page
        shape = (case.batch * pages, page, case.kv_heads, case.head_dim)
        table = jax.random.permutation(kp, case.batch * pages).reshape(case.batch, pages).astype(jnp.int32)
    return jax.random.normal(kk, shape, dtype), jax.random.normal(kv, shape, dtype), table


def decode_fn(impl: str, case: DecodeCase):
    """f(q, k_cache, v_cache, lengths, page_table) -> out, or None when `impl` cannot
    take the case (jax.nn has no page table and aligns windows with query position 0)."""
    if impl in ("xla", "cudnn"):
        if case.layout != "contiguous" or case.window is not None:
            return None

        def f(q, kc, vc, lengths, table):
            return jax.nn.dot_product_attention(q, kc, vc, key_value_seq_lengths=lengths,
                                                implementation=impl)
        return f
    mask = case.mask()

    def g(q, kc, vc, lengths, table):
        return jaxattn.decode_attention(q, kc, vc, lengths=lengths, page_table=table, mask=mask,
                                        implementation=impl)
    return g


def chained_steps(fn, n_steps: int):
    """One function running `n_steps` decode steps, each step's query made to depend on
    the previous step's output (q + 0 · out), over rotating cache copies."""
    def steps(queries, caches, lengths):
        outs, previous = [], None
        for i, q in enumerate(queries[:n_steps]):
            if previous is not None:
                q = q + (previous * 0).astype(q.dtype)
            kc, vc, table = caches[i % len(caches)]
            previous = fn(q, kc, vc, lengths, table)
            outs.append(previous)
        return outs
    return steps


def prepare(case: DecodeCase, impl: str, *, dtype=jnp.bfloat16, key=None, fn=None,
            max_inner: int = MAX_INNER):
    """(row, compiled chained steps or None, their arguments, steps per call): the
    measurement's inputs and executable, built but not timed. None when `impl` cannot
    take the case; a row with "error" (and no executable) when building it failed."""
    fn = fn or decode_fn(impl, case)
    if fn is None:
        return None
    key = jax.random.key(1) if key is None else key
    nbytes = case.kv_bytes(dtype)
    inner = int(min(max_inner, max(1, math.ceil(TARGET_EXEC_S * 4800e9 / nbytes))))
    sets = min(inner, rotation_sets(case.kv_bytes(dtype, case.context), max_sets=MAX_SETS))
    row = dict(case=case.name, **dataclasses.asdict(case), impl=impl, bytes=nbytes, inner=inner,
               input_sets=sets)
    try:
        caches = [make_cache(jax.random.fold_in(key, i), case, dtype) for i in range(sets)]
        shape = (case.batch, case.tq, case.num_heads, case.head_dim)
        queries = [jax.random.normal(k, shape, dtype) for k in jax.random.split(key, inner)]
        lengths = jnp.full((case.batch,), case.context, jnp.int32)
        compiled = jax.jit(chained_steps(fn, inner)).lower(queries, caches, lengths).compile()
    except Exception as e:  # noqa: BLE001 - record and go on with the next measurement
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc(limit=2)
        return row, None, None, inner
    return row, compiled, (queries, caches, lengths), inner


def _record(row, seconds_per_call, inner, hbm_gbps):
    """GB/s and time per step of the waited-for calls."""
    seconds = seconds_per_call / inner
    row.update(median_ms=seconds * 1e3, gbps=row["bytes"] / seconds / 1e9)
    if hbm_gbps:
        row["pct_hbm"] = 100 * row["bytes"] / seconds / 1e9 / hbm_gbps


def _record_steady(row, seconds_per_call, issue_s_per_call, inner, hbm_gbps):
    """GB/s and time per step of the calls issued back to back (`steady_*`), and the
    host's time to issue a step: where it reaches steady_ms the host, not the device,
    set the pace."""
    step = seconds_per_call / inner
    row.update(steady_ms=step * 1e3, steady_gbps=row["bytes"] / step / 1e9,
               steady_issue_ms=issue_s_per_call / inner * 1e3)
    if hbm_gbps:
        row["steady_pct_hbm"] = 100 * row["bytes"] / step / 1e9 / hbm_gbps


def measure(case: DecodeCase, impl: str, *, dtype=jnp.bfloat16, key=None, warmup=2, repeats=20,
            fn=None, hbm_gbps: float | None = None, max_inner: int = MAX_INNER,
            back_to_back: int = BACK_TO_BACK_CALLS) -> dict | None:
    """One row: GB/s of `impl` on `case` (None when the implementation cannot take it).
    `fn` overrides the function timed (a tuned kernel config); `max_inner` caps the steps
    per executable (each call's dispatch is shared by that many steps); `back_to_back`
    calls issued without waiting give `steady_gbps` (0: not timed)."""
    prepared = prepare(case, impl, dtype=dtype, key=key, fn=fn, max_inner=max_inner)
    if prepared is None:
        return None
    row, compiled, args, inner = prepared
    if compiled is None:
        return row
    try:
        timing = time_call(compiled, [args], warmup=warmup, repeats=repeats)
        _record(row, timing.median_s, inner, hbm_gbps)
        row["timing"] = timing.as_dict()
        if back_to_back:   # all its calls' outputs alive at once: may fail where one call did not
            b2b = time_back_to_back(compiled, [args], repeats=back_to_back, warmup=0)
            _record_steady(row, b2b.per_call_s, b2b.issue_s, inner, hbm_gbps)
            row["timing"]["back_to_back"] = b2b.as_dict()
    except Exception as e:  # noqa: BLE001 - record and go on with the next measurement
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc(limit=2)
    return row


def measure_interleaved(plan, *, rounds: int, dtype=jnp.bfloat16, repeats=10,
                        hbm_gbps: float | None = None, max_inner: int = MAX_INNER,
                        back_to_back: int = BACK_TO_BACK_CALLS, on_round=None) -> list[dict | None]:
    """One row per entry of `plan`, a list of (case, impl, fn or None), in its order (None
    where the implementation cannot take the case): every entry built first, then all
    timed in `rounds` interleaved rounds (timing.time_rounds: `repeats` waited-for calls
    each, then `back_to_back` calls issued without waiting). A row reports the median of
    its round medians (`gbps`, `median_ms`; `steady_gbps`, `steady_ms`) and every round's
    GB/s (`round_gbps`, `round_steady_gbps`); `on_round(rows)` sees the rows after each
    round. Every entry's caches stay on the device for the whole run: plan what fits."""
    prepared = [prepare(case, impl, dtype=dtype, fn=fn, max_inner=max_inner) for case, impl, fn in plan]
    timed = [p for p in prepared if p is not None and p[1] is not None]

    def record(r, times):
        for (row, _, _, inner), t in zip(timed, times):
            _record(row, statistics.median(t.waited_s), inner, hbm_gbps)
            row["round_gbps"] = [row["bytes"] / (s / inner) / 1e9 for s in t.waited_s]
            if t.back_to_back_s:
                _record_steady(row, statistics.median(t.back_to_back_s),
                               statistics.median(t.back_to_back_issue_s), inner, hbm_gbps)
                row["round_steady_gbps"] = [row["bytes"] / (s / inner) / 1e9 for s in t.back_to_back_s]
            row["rounds"] = len(t.waited_s)
        if on_round is not None:
            on_round([None if p is None else p[0] for p in prepared])

    time_rounds([(compiled, args) for _, compiled, args, _ in timed], rounds=rounds,
                repeats=repeats, back_to_back=back_to_back, on_round=record)
    return [None if p is None else p[0] for p in prepared]


def card_hbm_gbps() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for name, v in HBM_GBPS.items() if name in kind), None)


def markdown_table(rows, key: str = "gbps") -> str:
    """GB/s per case (rows) and implementation/layout (columns): `key` "gbps" (calls
    waited for) or "steady_gbps" (calls issued back to back)."""
    cols, grouped = [], {}
    for r in rows:
        col = r["impl"] if r["layout"] == "contiguous" else f"{r['impl']} {r['layout']}"
        if col not in cols:
            cols.append(col)
        case = (r["kv_heads"], r["batch"], r["context"], r["tq"], r["head_dim"], r["window"])
        grouped.setdefault(case, {})[col] = r.get(key)
    lines = ["| K | B | context | Tq | H | window | " + " | ".join(cols) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(cols)]
    for (k, b, ctx, tq, h, window), vals in grouped.items():
        cells = [("error" if vals[c] is None else f"{vals[c]:.0f}") if c in vals else "-" for c in cols]
        lines.append(f"| {k} | {b} | {ctx} | {tq} | {h} | {window or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
