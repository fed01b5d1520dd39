"""The length sweep behind `jaxattn compare`.

For every sequence length n and method (cases.COMPARE_METHODS) it records: time per call
(median after warm-up, each call waited for; and issued back to back, one wait for all, which
takes the host's per-call dispatch out of sub-millisecond kernels' times), peak memory
(device statistics when the backend keeps them, else XLA's compiled-memory estimate,
labelled per row), the FLOPs the mask needs (flops.py), and two errors of the method's
output, both against the jnp reference computed in float32 on the same inputs:

* ``err_*``: against the reference *with the same mask*: the implementation's error;
* ``dev_*``: against *full* attention: how far the pattern's result is from full
  attention (zero for full and flash; by design not zero for local and sparse).

Each case (one length, one method) is compiled, run, timed and checked before the next one
starts, so a run stopped with Ctrl-C keeps every case that finished. On devices with memory
statistics the cases go in order of increasing expected memory, so that each one can raise
the process-wide peak counter and be measured (the counter cannot be reset); elsewhere they
go by length, then method.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.benchmarking import flops, timing
from jaxattn.benchmarking.cases import COMPARE_METHODS, PatternParams
from jaxattn.benchmarking.report import is_oom, short_error

# Lengths up to this get their error measured on every query row; longer ones on three
# windows of ERROR_WINDOW rows (start, middle, end), so the float32 oracle stays small.
ERROR_ALL_ROWS_MAX = 4096
ERROR_WINDOW = 256
_ORACLE_DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    seq_lens: tuple[int, ...]
    methods: tuple[tuple[str, str | None], ...]  # (method, implementation or None = resolved)
    batch: int
    heads: int
    head_dim: int
    dtype: str
    params: PatternParams
    implementation: str | None = None  # --implementation (local, sparse and flash methods)
    warmup: int = 2
    repeats: int = 20
    min_repeats: int = 3
    budget_s: float | None = None
    interpret_max_len: int | None = None  # cap for Pallas interpret mode (CPU), None = no cap
    seed: int = 0


@dataclasses.dataclass
class Plan:
    method: str
    implementation: str | None
    reason: str = ""  # why implementation is None


def resolve_plan(config: CompareConfig, available: tuple[str, ...]) -> list[Plan]:
    """Which implementation each method runs with.

    full: "reference" (the definition). flash: --implementation, else "pallas_triton".
    local and sparse: --implementation, else "pallas_triton" when registered, else
    "xla" (jax.nn with a dense mask: computes every pair). ``method:impl`` wins over both.
    """
    plans = []
    for method, explicit in config.methods:
        family = COMPARE_METHODS[method].family
        if explicit is not None:
            impl = explicit
        elif family == "full":
            impl = "reference"
        elif config.implementation is not None:
            impl = config.implementation
        elif "pallas_triton" in available:
            impl = "pallas_triton"
        elif family == "flash":
            plans.append(Plan(method, None, "pallas_triton is not registered in this installation "
                                            f"(available: {', '.join(available)})"))
            continue
        else:
            impl = "xla"
        if impl not in available:
            plans.append(Plan(method, None, f"implementation {impl!r} is not available "
                                            f"(available: {', '.join(available)})"))
            continue
        plans.append(Plan(method, impl))
    return plans


def _is_interpret(impl: str | None) -> bool:
    return impl is not None and impl.startswith("pallas") and jax.default_backend() != "gpu"


def make_inputs(config: CompareConfig, n: int, n_sets: int):
    dtype = jnp.dtype(config.dtype)
    shape = (config.batch, n, config.heads, config.head_dim)
    sets = []
    for s in range(n_sets):
        keys = jax.random.split(jax.random.key(config.seed * 1_000_003 + n * 101 + s), 3)
        sets.append(tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys))
    return sets


def error_rows(n: int) -> list[tuple[int, int]] | None:
    """None (all rows) or the row windows the errors are measured on."""
    if n <= ERROR_ALL_ROWS_MAX:
        return None
    w = ERROR_WINDOW
    return [(0, w), (n // 2 - w // 2, n // 2 + w // 2), (n - w, n)]


def oracle(q, k, v, mask, windows) -> jax.Array:
    """float32 reference output on the rows of ``windows`` (all rows when None), with the
    mask evaluated at absolute positions."""
    q, k, v = (x.astype(_ORACLE_DTYPE) for x in (q, k, v))
    with jax.default_matmul_precision("highest"):  # no TF32 in the oracle on GPUs
        if windows is None:
            return jaxattn.dot_product_attention(q, k, v, mask=mask, implementation="reference")
        outs = []
        for r0, r1 in windows:
            allowed = flops.evaluate_window(mask, np.arange(r0, r1), np.arange(k.shape[1]))
            outs.append(jaxattn.dot_product_attention(q[:, r0:r1], k, v, mask=jnp.asarray(allowed),
                                                      implementation="reference"))
        return jnp.concatenate(outs, axis=1)


def take_rows(x, windows):
    if windows is None:
        return x
    return jnp.concatenate([x[:, r0:r1] for r0, r1 in windows], axis=1)


def error_stats(out, ref) -> tuple[float, float]:
    """(max |out - ref|, ||out - ref|| / ||ref||), in float64 on the host."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    diff = out - ref
    if not np.all(np.isfinite(out)):
        return math.inf, math.inf
    norm = float(np.linalg.norm(ref))
    return float(np.max(np.abs(diff))), float(np.linalg.norm(diff) / norm) if norm else 0.0


def memory_estimate(compiled) -> int | None:
    """argument + output + temp (- aliased) bytes of a compiled call, from XLA."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)


def device_memory_stats() -> dict | None:
    try:
        return jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None


def build_call(mask, impl: str) -> Callable:
    return jax.jit(functools.partial(jaxattn.dot_product_attention, mask=mask, implementation=impl))


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement of the sweep: a method at one length."""
    seq_len: int
    plan: Plan


def plan_cases(config: CompareConfig, plans: list[Plan], *, by_memory: bool) -> list[Case]:
    """The cases in run order: by length, then method; with ``by_memory``, by the memory
    each is expected to need (dense implementations hold B·N·n² float32 logits, the
    kernels only their inputs and outputs), so each run can raise the device's peak."""
    cases = [Case(n, plan) for n in config.seq_lens for plan in plans]
    if by_memory:
        cases.sort(key=lambda c: _expected_bytes(config, c))  # stable: ties keep length order
    return cases


def _expected_bytes(config: CompareConfig, case: Case) -> int:
    n = case.seq_len
    io = 4 * config.batch * n * config.heads * config.head_dim * jnp.dtype(config.dtype).itemsize
    if case.plan.implementation in ("reference", "xla"):
        return io + 4 * config.batch * config.heads * n * n
    return io


def run_compare(config: CompareConfig, *, on_start: Callable[[Case], None] | None = None,
                on_row: Callable[[dict, list[dict]], None] | None = None) -> tuple[list[dict], bool]:
    """Measure every case, one after the other: compile, run (peak memory), time, then the
    errors against the float32 oracles. ``on_start(case)`` is called as a case begins and
    ``on_row(row, rows)`` once its row is final. Returns (finished rows, interrupted):
    Ctrl-C stops at once and keeps every finished row."""
    plans = resolve_plan(config, jaxattn.available_implementations())
    measure_device = device_memory_stats() is not None
    cache_bytes = timing.L2_BYTES if jax.default_backend() == "gpu" else 0
    rows: list[dict] = []
    inputs: dict[int, list] = {}   # the input sets of the length being run
    oracles: dict = {}             # float32 references of that length, by mask
    try:
        for case in plan_cases(config, plans, by_memory=measure_device):
            if on_start is not None:
                on_start(case)
            n = case.seq_len
            if n not in inputs:
                inputs.clear()
                oracles.clear()
            row = _measure_case(config, case, inputs, oracles, measure_device, cache_bytes)
            rows.append(row)
            if on_row is not None:
                on_row(row, rows)
    except KeyboardInterrupt:
        return rows, True
    return rows, False


def _base_row(config, n, plan, mask, fraction):
    method = COMPARE_METHODS[plan.method]
    return {
        "method": plan.method, "family": method.family, "implementation": plan.implementation,
        "seq_len": n, "mask": repr(mask), "allowed_fraction": fraction,
        "flops_forward": flops.attention_flops(batch=config.batch, heads=config.heads, q_len=n, kv_len=n,
                                               head_dim=config.head_dim, fraction=fraction),
        "status": "ok", "reason": "",
        "time_ms": None, "back_to_back_ms": None, "timing": None,
        "memory_bytes": None, "memory_source": None, "xla_estimate_bytes": None, "device_peak_bytes": None,
        "err_max_abs": None, "err_rel_l2": None, "dev_full_max_abs": None, "dev_full_rel_l2": None,
        "error_rows": "all",
    }


def _measure_case(config, case, inputs, oracles, measure_device, cache_bytes) -> dict:
    """The final row of one case; failures are recorded in it, never raised (but Ctrl-C)."""
    n, plan = case.seq_len, case.plan
    mask = COMPARE_METHODS[plan.method].build(n, config.params)
    row = _base_row(config, n, plan, mask, flops.allowed_fraction(mask, n, n))
    windows = error_rows(n)
    if windows is not None:
        row["error_rows"] = [list(w) for w in windows]
    if plan.implementation is None:
        row.update(status="unavailable", reason=plan.reason)
        return row
    if (_is_interpret(plan.implementation) and config.interpret_max_len is not None
            and n > config.interpret_max_len):
        row.update(status="skipped", reason=(
            f"{plan.implementation} runs in Pallas interpret mode on CPU; lengths above "
            f"{config.interpret_max_len} are skipped (pass --implementation {plan.implementation} to run them)"))
        return row
    if n not in inputs:
        bytes_per_set = 3 * config.batch * n * config.heads * config.head_dim * jnp.dtype(config.dtype).itemsize
        inputs[n] = make_inputs(config, n, timing.rotation_sets(bytes_per_set, cache_bytes=cache_bytes))
    sets = inputs[n]
    try:
        compiled = build_call(mask, plan.implementation).lower(*sets[0]).compile()
        est = memory_estimate(compiled)
        row.update(xla_estimate_bytes=est, memory_bytes=est, memory_source="xla_estimate" if est else None)
        out_rows = _run_and_time(config, row, compiled, sets, windows, measure_device)
    except KeyboardInterrupt:
        raise
    except NotImplementedError as e:
        row.update(status="unsupported", reason=short_error(e))
        return row
    except Exception as e:  # noqa: BLE001  (report and go on with the sweep)
        row.update(status="oom" if is_oom(e) else "failed", reason=short_error(e))
        return row
    if out_rows is not None:
        if (config.dtype == "float32" and jax.default_backend() == "cpu"
                and plan.implementation == "reference"):
            # A float32 "reference" run on CPU computed exactly what the oracle computes.
            oracles.setdefault(mask, out_rows)
        _errors(row, mask, out_rows, sets[0], windows, oracles)
    return row


def _run_and_time(config, row, compiled, sets, windows, measure_device):
    """Peak memory of the first call, then the timings (median of waited-for calls, then
    calls issued back to back); the output on the error rows, or
    None when the call would not fit (estimated)."""
    stats = device_memory_stats() if measure_device else None
    free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) if stats and stats.get("bytes_limit") else None
    est = row["xla_estimate_bytes"]
    if free is not None and est and est > free:
        row.update(status="oom", reason=f"needs ~{est / 2**20:,.0f} MiB (XLA estimate), "
                                        f"{free / 2**20:,.0f} MiB free: not run")
        return None
    out = compiled(*sets[0])
    jax.block_until_ready(out)
    after = device_memory_stats() if measure_device else None
    if stats and after and after.get("peak_bytes_in_use", 0) > stats.get("peak_bytes_in_use", 0):
        args = sum(x.nbytes for x in sets[0])
        peak = int(after["peak_bytes_in_use"] - stats["bytes_in_use"] + args)
        row.update(device_peak_bytes=peak, memory_bytes=peak, memory_source="device_peak")
    out_rows = take_rows(out, windows)
    del out
    t = timing.time_call(compiled, sets, warmup=max(config.warmup - 1, 0), repeats=config.repeats,
                         min_repeats=config.min_repeats, budget_s=config.budget_s)
    row.update(time_ms=t.median_s * 1e3, timing=t.as_dict())
    row["timing"]["warmup"] = config.warmup  # the first call above was a warm-up too
    b2b = timing.time_back_to_back(compiled, sets, repeats=back_to_back_calls(config, t.median_s),
                                   warmup=0)  # warm: it was just timed
    row.update(back_to_back_ms=b2b.per_call_s * 1e3)
    row["timing"]["back_to_back"] = b2b.as_dict()
    return out_rows


def back_to_back_calls(config: CompareConfig, median_s: float) -> int:
    """Calls issued back to back: ``config.repeats``; under a time budget (the CPU default,
    where the host runs the calls itself and there is no dispatch to hide) only as many as
    a tenth of the budget holds at the median's pace, at least one: a few seconds in all."""
    if config.budget_s is None:
        return config.repeats
    fit = int(config.budget_s / 10 / median_s) if median_s > 0 else config.repeats
    return max(1, min(config.repeats, fit))


def _errors(row, mask, out_rows, qkv, windows, oracles):
    """Errors against the float32 reference with the same mask and with no mask."""
    full = jaxattn.masks.FullMask()
    try:
        for m in (mask, full):
            if m not in oracles:
                oracles[m] = oracle(*qkv, m, windows)
        row["err_max_abs"], row["err_rel_l2"] = error_stats(out_rows, oracles[mask])
        row["dev_full_max_abs"], row["dev_full_rel_l2"] = error_stats(out_rows, oracles[full])
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001  (the measurement stands; say why the error is missing)
        row["reason"] = f"error not computed: {short_error(e)}"
