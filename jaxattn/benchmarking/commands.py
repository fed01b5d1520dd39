"""What `jaxattn compare` and `jaxattn bench` run once their options are parsed.

Each command prints its run header, measures with one progress display for the whole run
(or one line per measurement without a terminal), rewrites its JSON after every finished
measurement (so a stopped run leaves a valid file), then prints its table and writes the
.txt (header, table, notes) and the plots. Exit codes: 0 done, 1 a measurement of ours
failed, 130 stopped with Ctrl-C (what finished is kept).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

import jax

import jaxattn
from jaxattn.benchmarking import bench, compare, report
from jaxattn.benchmarking.cases import COMPARE_METHODS
from jaxattn.benchmarking.progress import RunProgress


def prepare_interpret_mode() -> None:
    """On CPU, import the Pallas interpreter's module before the first kernel call: jax
    0.11 otherwise compiles the first interpret-mode pallas_call of a process twice. Only
    a speed-up, from a private module, so any failure is ignored."""
    if jax.default_backend() != "gpu":
        try:
            importlib.import_module("jax._src.pallas.mosaic.interpret.interpret_pallas_call")
        except Exception:  # noqa: BLE001
            pass


# ------------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------------
def compare_notes(meta: dict) -> list[str]:
    notes = [
        "time: median per call after warm-up, each call waited for, ms (includes the host's "
        "dispatch and wait). back to back: calls issued without waiting, one wait at the end, time / "
        "calls, ms: what the device spends per call while the host stays ahead, as in a training loop "
        "(the time plot draws it). GFLOP: forward FLOPs the mask needs, 4·B·N·n²·H × allowed "
        "(useful work only).",
        "err vs same-mask ref: max |output - jnp reference in float32 with the same mask| (the "
        "implementation's error); dev vs full attn: max |output - full attention| (by design not 0 "
        "for local and sparse patterns).",
    ]
    if meta["platform"] == "gpu":
        notes.append("memory: peak device memory of the call in MiB (memory_stats); '~' marks rows where "
                     "the peak could not be isolated and XLA's compiled estimate is shown instead.")
    else:
        notes.append(f"memory: MiB; '~' = XLA's estimate (argument + output + temp bytes of the compiled "
                     f"call): the {meta['platform']} backend keeps no device memory statistics.")
        notes.append("On CPU the pallas_* kernels run in Pallas interpret mode (the same kernel code, "
                     "emulated): their memory and errors are representative, their times are not GPU times.")
    return notes


def _compare_line(row: dict) -> str:
    """One finished measurement, for the log."""
    what = f"{row['method']} ({row.get('implementation') or '-'}) n={row['seq_len']}"
    if row["status"] != "ok":
        return f"{what}: {row['status']}"
    err = report.fmt_num(row.get("err_max_abs"), ".2e")
    return (f"{what}: {report.fmt_num(row['time_ms'], '.4g')} ms, "
            f"{report.compare_memory_cell(row)} MiB, err {err}")


def run_compare_command(config: compare.CompareConfig, out_dir: Path, *, plots: bool = True) -> int:
    from jaxattn.benchmarking import plots as plotting

    prepare_interpret_mode()
    meta = report.run_metadata()
    plans = compare.resolve_plan(config, jaxattn.available_implementations())
    cfg = dataclasses.asdict(config)
    notes = compare_notes(meta)
    header = report.compare_header(meta, config, plans)
    payload = {
        "kind": "jaxattn compare", "meta": meta, "config": cfg, "header": header,
        "methods": {p.method: {"implementation": p.implementation, "family": COMPARE_METHODS[p.method].family,
                               "description": COMPARE_METHODS[p.method].description,
                               "flops_scaling": COMPARE_METHODS[p.method].scaling,
                               "unavailable_reason": p.reason or None} for p in plans},
        "notes": notes, "interrupted": False, "complete": False, "results": [],
    }
    json_path = out_dir / "compare.json"
    print(header, flush=True)
    report.write_json(json_path, payload)

    total = len(config.seq_lens) * len(plans)
    with RunProgress(total, "compare") as progress:
        def on_row(row, rows):
            payload["results"] = rows
            report.write_json(json_path, payload)
            progress.finished(_compare_line(row))

        rows, interrupted = compare.run_compare(
            config, on_start=lambda case: progress.start(f"{case.plan.method} n={case.seq_len}"),
            on_row=on_row)
    payload["results"] = rows
    table = report.compare_table(rows, [p.method for p in plans])
    finish_run(payload, json_path, interrupted, header, table, out_dir / "compare.txt", notes)
    written = [json_path, out_dir / "compare.txt"]
    if plots and rows:
        try:
            written += plotting.compare_plots(rows, meta, cfg, out_dir)
        except KeyboardInterrupt:
            interrupted = True
    print(report.wrap(f"wrote in {out_dir}: " + ", ".join(p.name for p in written)))
    if interrupted:
        print(f"interrupted (Ctrl-C): {len(rows)} of {total} measurements kept.", file=sys.stderr)
        return 130
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def finish_run(payload: dict, json_path: Path, interrupted: bool, header: str, table: str, txt_path: Path,
               notes=()) -> None:
    """The final JSON (complete or interrupted); the table with its notes on stdout; the
    header, table and notes in the .txt."""
    payload["interrupted"] = interrupted
    payload["complete"] = not interrupted
    report.write_json(json_path, payload)
    body = table
    if notes:
        body += "\n\n" + "\n".join(report.wrap("note: " + n) for n in notes)
    if interrupted:
        body += "\n\n" + "interrupted (Ctrl-C): this run is incomplete."
    print()
    print(body)
    txt_path.parent.mkdir(parents=True, exist_ok=True)
    txt_path.write_text(header + "\n\n" + body + "\n")


# ------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------
def _bench_line(row: dict) -> str:
    what = f"{row['case']} {row['implementation']} {report.MODE_LABELS.get(row['mode'], row['mode'])}"
    if row["status"] != "ok":
        return f"{what}: {row['status']}"
    return f"{what}: {report.fmt_num(row['time_ms'], '.4g')} ms, {report.fmt_num(row['tflops'], '.4g')} TFLOP/s"


def run_bench_command(chosen, impls, modes, dtype, warmup, repeats, out_dir: Path, *, plots=True,
                      smoke=False) -> int:
    from jaxattn.benchmarking import plots as plotting

    prepare_interpret_mode()
    meta = report.run_metadata()
    header = report.bench_header(meta, dtype=dtype, cases=chosen, implementations=impls, modes=modes,
                                 warmup=warmup, repeats=repeats, smoke=smoke)
    payload = {"kind": "jaxattn bench", "meta": meta, "smoke_run_on_cpu": smoke, "header": header,
               "config": {"cases": [dataclasses.asdict(c) for c in chosen], "implementations": list(impls),
                          "modes": list(modes), "dtype": dtype, "warmup": warmup, "repeats": repeats},
               "flop_model": "forward 4·B·N·T·S·H × allowed fraction; backward 2.5× forward",
               "interrupted": False, "complete": False, "results": []}
    json_path = out_dir / "bench.json"
    print(header, flush=True)
    report.write_json(json_path, payload)

    total = len(chosen) * len(impls) * len(modes)
    with RunProgress(total, "bench") as progress:
        def on_row(row):
            payload["results"].append(row)
            report.write_json(json_path, payload)
            progress.finished(_bench_line(row))

        rows, interrupted = bench.run_bench(chosen, impls, modes, dtype=dtype, warmup=warmup, repeats=repeats,
                                            on_start=progress.start, on_row=on_row)
    finish_run(payload, json_path, interrupted, header, report.bench_table(rows), out_dir / "bench.txt")
    written = [json_path, out_dir / "bench.txt"]
    if plots and rows:
        written.append(plotting.bench_plot(rows, meta, out_dir / "bench.png"))
    print(report.wrap(f"wrote in {out_dir}: " + ", ".join(p.name for p in written)))
    if interrupted:
        print(f"interrupted (Ctrl-C): {len(rows)} of {total} measurements kept.", file=sys.stderr)
        return 130
    ours_failed = any(r["status"] == "failed" and r["implementation"] not in bench.BASELINES for r in rows)
    return 1 if ours_failed else 0


# ------------------------------------------------------------------------------------
# bench --decode
# ------------------------------------------------------------------------------------
def run_decode_bench_command(chosen, impls, dtype, warmup, repeats, out_dir: Path, *, smoke=False) -> int:
    """GB/s of decode attention (jaxattn/benchmarking/decode.py) case by case."""
    import jax.numpy as jnp

    from jaxattn.benchmarking import decode

    prepare_interpret_mode()
    meta = report.run_metadata()
    hbm = decode.card_hbm_gbps()
    back_to_back = 2 if smoke else decode.BACK_TO_BACK_CALLS
    header = "\n".join([
        f"jaxattn bench --decode on {meta.get('device_kind', meta.get('platform'))}, jax {jax.__version__}"
        + (" (smoke run on CPU: the kernel in interpret mode, not a benchmark)" if smoke else ""),
        f"dtype {dtype}; implementations {', '.join(impls)}; median of {repeats} after {warmup} warm-up",
        "GB/s = bytes of K and V the call must read / time"
        + (f" (this card's HBM: {hbm:.0f} GB/s)" if hbm else "")])
    payload = {"kind": "jaxattn bench --decode", "meta": meta, "smoke_run_on_cpu": smoke, "header": header,
               "config": {"cases": [dataclasses.asdict(c) for c in chosen], "implementations": list(impls),
                          "dtype": dtype, "warmup": warmup, "repeats": repeats},
               "interrupted": False, "complete": False, "results": []}
    json_path = out_dir / "bench_decode.json"
    print(header, flush=True)
    report.write_json(json_path, payload)
    plan = [(case, impl) for case in chosen for impl in impls]
    interrupted = False
    with RunProgress(len(plan), "decode") as progress:
        try:
            for case, impl in plan:
                progress.start(f"{case.name} {impl}")
                # On CPU one step per timed call: the interpreted kernel gains nothing from
                # sharing a dispatch, and a chain of 32 interpreted steps is slow to compile.
                row = decode.measure(case, impl, dtype=jnp.dtype(dtype), warmup=warmup, repeats=repeats,
                                     hbm_gbps=hbm, max_inner=1 if smoke else decode.MAX_INNER,
                                     back_to_back=back_to_back)
                if row is None:
                    progress.finished(f"{case.name} {impl}: not applicable (no page table / window in jax.nn)")
                    continue
                payload["results"].append(row)
                report.write_json(json_path, payload)
                progress.finished(f"{case.name} {impl}: " + (
                    f"{row['gbps']:.0f} GB/s, {row['median_ms']:.4g} ms a step waited for; "
                    f"{row['steady_gbps']:.0f} GB/s back to back" if "gbps" in row else row["error"][:100]))
        except KeyboardInterrupt:
            interrupted = True
    rows = payload["results"]
    tables = ("(no rows)" if not rows else
              "calls waited for:\n" + decode.markdown_table(rows)
              + f"\n\n{back_to_back} calls issued back to back, one wait:\n"
              + decode.markdown_table(rows, key="steady_gbps"))
    finish_run(payload, json_path, interrupted, header, tables, out_dir / "bench_decode.txt")
    print(report.wrap(f"wrote in {out_dir}: {json_path.name}, bench_decode.txt"))
    if interrupted:
        return 130
    return 1 if any("error" in r and r["impl"] not in ("xla", "cudnn") for r in rows) else 0
