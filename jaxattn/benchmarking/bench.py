"""TFLOP/s of attention kernels on the named cases of cases.py (`jaxattn bench`).

Every case runs our Pallas implementations (every registered "pallas_*") beside
`jax.nn.dot_product_attention` with implementation="xla" and "cudnn", in the same
process on the same inputs, forward and forward+backward (jax.vjp with a random
cotangent). FLOPs count useful work only (flops.py). The baselines get the
mask in the form jax.nn takes best: is_causal / local_window_size, or a dense bool mask
for the BigBird-style case (the only way to give jax.nn a block-sparse pattern).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.benchmarking import timing
from jaxattn.benchmarking.cases import BenchCase
from jaxattn.benchmarking.report import is_oom, short_error

BASELINES = ("jax.nn xla", "jax.nn cudnn")
MODES = ("forward", "forward_and_vjp")


def default_implementations() -> tuple[str, ...]:
    ours = tuple(i for i in jaxattn.available_implementations() if i.startswith("pallas"))
    return ours + BASELINES


def attention_fn(impl: str, case: BenchCase) -> tuple[Callable, tuple]:
    """(f(q, k, v, *extra) -> out, extra arrays)."""
    if impl in BASELINES:
        backend = impl.split()[1]
        kwargs, dense = case.jax_nn_mask_args()

        def f(q, k, v, *extra):
            return jax.nn.dot_product_attention(q, k, v, mask=extra[0] if extra else None,
                                                implementation=backend, **kwargs)
        return f, (() if dense is None else (jnp.asarray(dense),))
    mask = case.mask()

    def g(q, k, v):
        return jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    return g, ()


def mode_fn(f: Callable, mode: str) -> Callable:
    if mode == "forward":
        return jax.jit(lambda q, k, v, do, *extra: f(q, k, v, *extra))

    def forward_and_vjp(q, k, v, do, *extra):
        _, vjp = jax.vjp(lambda q, k, v: f(q, k, v, *extra), q, k, v)
        return vjp(do)
    return jax.jit(forward_and_vjp)


def make_inputs(case: BenchCase, dtype, n_sets: int, seed: int = 0):
    shape = (case.batch, case.seq_len, case.heads, case.head_dim)
    sets = []
    for s in range(n_sets):
        keys = jax.random.split(jax.random.key(seed * 7919 + s), 4)
        sets.append(tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys))
    return sets


def unavailable_reason(impl: str) -> str | None:
    if impl == "jax.nn cudnn" and jax.default_backend() != "gpu":
        return "cuDNN attention needs a CUDA GPU"
    if impl not in BASELINES and impl not in jaxattn.available_implementations():
        return f"{impl!r} is not registered (available: {', '.join(jaxattn.available_implementations())})"
    return None


def run_bench(cases, implementations, modes=MODES, *, dtype="bfloat16", warmup=timing.DEFAULT_WARMUP,
              repeats=timing.DEFAULT_REPEATS, on_start=None, on_row=None) -> tuple[list[dict], bool]:
    """Measure case by case, implementation by implementation, mode by mode (each one
    compiled, then timed). ``on_start(label)`` is called as a measurement begins and
    ``on_row(row)`` once it is final. Returns (rows, interrupted); Ctrl-C keeps every
    finished row."""
    rows: list[dict] = []
    dtype = jnp.dtype(dtype)
    cache = timing.L2_BYTES if jax.default_backend() == "gpu" else 0

    def emit(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    try:
        for case in cases:
            fraction = case.fraction()
            bytes_per_set = 4 * case.batch * case.seq_len * case.heads * case.head_dim * dtype.itemsize
            inputs = None
            outputs = {}
            case_rows = []
            for impl in implementations:
                for mode in modes:
                    row = {"case": case.name, "mode": mode, "implementation": impl,
                           "batch": case.batch, "heads": case.heads, "seq_len": case.seq_len,
                           "head_dim": case.head_dim, "pattern": case.pattern, "window": case.window,
                           "dtype": dtype.name, "allowed_fraction": fraction, "flops": case.flops(mode, fraction),
                           "status": "ok", "reason": "", "time_ms": None, "tflops": None, "timing": None}
                    if on_start is not None:
                        on_start(f"{case.name} {impl} {mode}")
                    reason = unavailable_reason(impl)
                    if reason:
                        row.update(status="unavailable", reason=reason)
                        emit(row)
                        continue
                    if inputs is None:
                        inputs = make_inputs(case, dtype, timing.rotation_sets(bytes_per_set, cache_bytes=cache))
                    _run_one(case, impl, mode, row, inputs, warmup, repeats, outputs)
                    case_rows.append(row)
                    emit(row)
            _agreement(case_rows, outputs)
    except KeyboardInterrupt:
        return rows, True
    return rows, False


def _run_one(case, impl, mode, row, inputs, warmup, repeats, outputs):
    try:
        f, extra = attention_fn(impl, case)
        fn = mode_fn(f, mode)
        sets = [(*s, *extra) for s in inputs]
        compiled = fn.lower(*sets[0]).compile()
        if mode == "forward":
            outputs[impl] = compiled(*sets[0])
        t = timing.time_call(compiled, sets, warmup=warmup, repeats=repeats)
        row.update(time_ms=t.median_s * 1e3, tflops=row["flops"] / t.median_s / 1e12, timing=t.as_dict())
    except KeyboardInterrupt:
        raise
    except NotImplementedError as e:
        row.update(status="unsupported", reason=short_error(e))
    except Exception as e:  # noqa: BLE001
        row.update(status="oom" if is_oom(e) else "failed", reason=short_error(e))


def _agreement(case_rows, outputs):
    """max |out - baseline out| of each forward output (same inputs), against cuDNN when it
    ran, else XLA: a fast kernel that computes something else is caught here."""
    ref_name = next((b for b in ("jax.nn cudnn", "jax.nn xla") if b in outputs), None)
    if ref_name is None:
        return
    ref = np.asarray(outputs[ref_name].astype(jnp.float32))
    for row in case_rows:
        if row["mode"] == "forward" and row["implementation"] in outputs:
            out = np.asarray(outputs[row["implementation"]].astype(jnp.float32))
            row["max_abs_diff"] = float(np.max(np.abs(out - ref)))
            row["diff_against"] = ref_name
