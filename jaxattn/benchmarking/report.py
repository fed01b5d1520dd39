"""Run metadata, the run header, JSON files and text tables of `jaxattn compare` and `jaxattn bench`.

Text output fits TEXT_WIDTH columns (tables are rich.table renderings at that width, notes
are wrapped); memory is in MiB everywhere.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
from rich import box
from rich.console import Console
from rich.table import Table

import jaxattn

TEXT_WIDTH = 100
MIB = 2**20


def run_metadata() -> dict:
    """Device, date, versions: what makes two runs comparable (or not)."""
    dev = jax.local_devices()[0]
    try:
        import jaxlib
        jaxlib_version = jaxlib.__version__
    except Exception:  # noqa: BLE001
        jaxlib_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": jax.default_backend(),
        "device_count": jax.local_device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib_version,
        "jaxattn_version": getattr(jaxattn, "__version__", None),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "host_cpu_count": os.cpu_count(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def _git_commit() -> str | None:
    """The short commit of the checkout jaxattn runs from ("+dirty" with uncommitted
    changes to tracked files); None for an installed copy or without git."""
    root = Path(jaxattn.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD")
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
        return commit or None
    except Exception:  # noqa: BLE001  (no git: the header says so)
        return None


def _clean(x):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, payload: dict) -> None:
    """Atomic: a Ctrl-C while writing never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------
# failures
# ------------------------------------------------------------------------------------
def is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def short_error(err: BaseException) -> str:
    """The exception's type and the first line of its message (at most 200 characters)."""
    line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {line[:200]}"


# ------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------
def fmt_mib(n) -> str:
    """Bytes as MiB with three significant digits (no unit: the column header says MiB)."""
    if n is None:
        return "-"
    mib = n / MIB
    return f"{mib:.0f}" if mib >= 1000 else f"{mib:.3g}"


def fmt_num(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    return format(x, spec)


def wrap(text: str, indent: str = "  ") -> str:
    """One paragraph wrapped to TEXT_WIDTH, continuation lines indented."""
    return textwrap.fill(text, width=TEXT_WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def render(table: Table) -> str:
    """A rich table as plain text, at most TEXT_WIDTH columns wide, no trailing spaces."""
    console = Console(file=io.StringIO(), width=TEXT_WIDTH, color_system=None, force_terminal=False,
                      force_jupyter=False, soft_wrap=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()).strip("\n")


def _table(columns: list[tuple[str, str]]) -> Table:
    """An empty table with (header, kind) columns. Kinds: 'r' numbers (right-aligned), 'L'
    names, both never wrapped (a number or a name split over two lines misreads); 'l' text
    that wraps between words when the table must shrink to TEXT_WIDTH."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for header, kind in columns:
        table.add_column(header, justify="right" if kind == "r" else "left", no_wrap=kind != "l",
                         overflow="fold")
    return table


def fmt_fixed(x, digits: int = 4) -> str:
    """``digits`` significant digits, but never in exponent form for large values (12346, not 1.235e+04)."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 10 ** digits else fmt_num(x, f".{digits}g")


def _status_cells(rows: list[dict]) -> tuple[list[str], list[str]]:
    """Short status per row plus numbered notes for the reasons (kept out of the table)."""
    notes: list[str] = []
    cells = []
    for r in rows:
        if not r.get("reason"):
            cells.append(r["status"])
            continue
        if r["reason"] not in notes:
            notes.append(r["reason"])
        cells.append(f"{r['status']} [{notes.index(r['reason']) + 1}]")
    return cells, [wrap(f"[{i + 1}] {n}", "    ") for i, n in enumerate(notes)]


def compare_memory_cell(r: dict) -> str:
    """MiB; '~' marks XLA's estimate of the compiled call rather than a measured peak."""
    mem = fmt_mib(r.get("memory_bytes"))
    return "~" + mem if r.get("memory_source") == "xla_estimate" else mem


def compare_table(rows: list[dict], method_order: list[str] | None = None) -> str:
    """One row per (length, method), by length then method."""
    order = {m: i for i, m in enumerate(method_order or [])}
    rows = sorted(rows, key=lambda r: (r["seq_len"], order.get(r["method"], len(order))))
    table = _table([("method", "L"), ("implementation", "L"), ("n", "r"), ("time\nms", "r"),
                    ("back\nto\nback\nms", "r"), ("memory\nMiB", "r"), ("GFLOP", "r"), ("allowed", "r"),
                    ("err vs\nsame-\nmask\nref", "r"), ("dev vs\nfull\nattn", "r"), ("status", "l")])
    status, notes = _status_cells(rows)
    for r, st in zip(rows, status):
        table.add_row(
            r["method"], r.get("implementation") or "-", str(r["seq_len"]),
            fmt_fixed(r.get("time_ms")), fmt_fixed(r.get("back_to_back_ms")), compare_memory_cell(r),
            fmt_fixed(r["flops_forward"] / 1e9, 3), f"{100 * r['allowed_fraction']:.1f}%",
            fmt_num(r.get("err_max_abs"), ".1e"), fmt_num(r.get("dev_full_max_abs"), ".1e"), st)
    return "\n".join([render(table), *notes])


def bench_table(rows: list[dict]) -> str:
    table = _table([("case", "l"), ("mode", "L"), ("implementation", "L"), ("ms", "r"), ("TFLOP/s", "r"),
                    ("allowed", "r"), ("max|Δ|\nvs base", "r"), ("status", "l")])
    status, notes = _status_cells(rows)
    against = set()
    for r, st in zip(rows, status):
        diff = "-"
        if r.get("max_abs_diff") is not None:
            diff = f"{r['max_abs_diff']:.1e}"
            against.add(r["diff_against"])
        table.add_row(r["case"], MODE_LABELS.get(r["mode"], r["mode"]), r["implementation"],
                      fmt_fixed(r.get("time_ms")), fmt_fixed(r.get("tflops")),
                      f"{100 * r['allowed_fraction']:.1f}%", diff, st)
    legend = ["mode: fwd = forward, fwd+bwd = forward and backward (jax.vjp)."]
    if against:
        legend.append(wrap("max|Δ| vs base: max |forward output - baseline's output| on the same inputs, "
                           f"the baseline being {' or '.join(sorted(against))} (cuDNN where it ran, else XLA)."))
    return "\n".join([render(table), *notes, *legend])


MODE_LABELS = {"forward": "fwd", "forward_and_vjp": "fwd+bwd"}


# ------------------------------------------------------------------------------------
# run headers: what makes two runs comparable (or not), first in every .txt
# ------------------------------------------------------------------------------------
def _machine_line(meta: dict) -> str:
    commit = meta.get("git_commit") or "not a git checkout"
    return (f"device: {meta['device']} ({meta['platform']}, {meta['device_count']} device(s), "
            f"{meta['host_cpu_count']} host CPUs); jax {meta['jax_version']}, "
            f"jaxattn {meta['jaxattn_version']}, commit {commit}")


def compare_header(meta: dict, config, plans) -> str:
    p = config.params
    budget = f", stopping after {config.budget_s:g} s of timed calls" if config.budget_s else ""
    lines = [
        f"jaxattn compare, {meta['date']}",
        _machine_line(meta),
        f"inputs: {config.dtype}, B={config.batch} N={config.heads} H={config.head_dim}, "
        f"n = {','.join(map(str, config.seq_lens))}, seed {config.seed}",
        f"patterns: window w={p.window}, {p.num_global} global tokens, bigbird {p.random_blocks} "
        f"random blocks of {p.block_size}",
        f"timing: median of up to {config.repeats} calls after {config.warmup} warm-up call(s) "
        f"(at least {config.min_repeats}{budget}), each waited for; then up to {config.repeats} calls "
        f"issued back to back, one wait at the end" + (" (as many as a tenth of the budget holds, "
                                                       "at least 1)" if config.budget_s else ""),
        "methods:",
    ]
    interpret = meta["platform"] != "gpu"
    for plan in plans:
        how = plan.implementation or "unavailable: " + plan.reason
        if interpret and (plan.implementation or "").startswith("pallas"):
            how += " (Pallas interpret mode on CPU)"
        lines.append(wrap(f"  {plan.method:<11} {how}", " " * 14))
    return "\n".join(wrap(line) if not line.startswith("  ") else line for line in lines)


def bench_header(meta: dict, *, dtype: str, cases, implementations, modes, warmup: int, repeats: int,
                 smoke: bool) -> str:
    lines = [
        f"jaxattn bench, {meta['date']}" + ("  [CPU smoke run: not a benchmark]" if smoke else ""),
        _machine_line(meta),
        f"inputs: {dtype}; {len(cases)} case(s); implementations: {', '.join(implementations)}; "
        f"modes: {', '.join(modes)}",
        f"timing: median of {repeats} calls after {warmup} warm-up call(s), inputs rotated past the L2",
        "FLOPs: useful work only, forward 4·B·N·T·S·H × allowed fraction, backward 2.5× forward",
    ]
    return "\n".join(wrap(line) for line in lines)
