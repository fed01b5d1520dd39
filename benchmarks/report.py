"""Run metadata, JSON files and plain-text tables for `jaxattn compare` and `jaxattn bench`."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax

import jaxattn


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
    try:
        root = Path(jaxattn.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
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


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000.0
    return str(n)


def fmt_num(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    return format(x, spec)


def table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """Plain-text table; ``align`` has one 'l' or 'r' per column."""
    align = align or "l" * len(headers)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


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
    return cells, [f"[{i + 1}] {n}" for i, n in enumerate(notes)]


def compare_table(rows: list[dict]) -> str:
    headers = ["method", "implementation", "n", "time ms", "memory", "GFLOP", "allowed",
               "err vs same-mask ref", "dev vs full attn", "status"]
    status, notes = _status_cells(rows)
    body = []
    for r, st in zip(rows, status):
        mem = fmt_bytes(r.get("memory_bytes"))
        if r.get("memory_source") == "xla_estimate":
            mem = "~" + mem
        body.append([
            r["method"], r.get("implementation") or "-", str(r["seq_len"]),
            fmt_num(r.get("time_ms"), ".4g"), mem,
            fmt_num(r["flops_forward"] / 1e9, ".4g"), f"{100 * r['allowed_fraction']:.1f}%",
            fmt_num(r.get("err_max_abs"), ".2e"), fmt_num(r.get("dev_full_max_abs"), ".2e"), st,
        ])
    return "\n".join([table(headers, body, "llrrrrrrrl"), *notes])


def bench_table(rows: list[dict]) -> str:
    headers = ["case", "mode", "implementation", "ms", "TFLOP/s", "allowed", "max|Δ| vs baseline", "status"]
    status, notes = _status_cells(rows)
    body = []
    for r, st in zip(rows, status):
        diff = "-"
        if r.get("max_abs_diff") is not None:
            diff = f"{r['max_abs_diff']:.2e} ({r['diff_against'].split()[-1]})"
        body.append([r["case"], r["mode"], r["implementation"], fmt_num(r.get("time_ms"), ".4g"),
                     fmt_num(r.get("tflops"), ".4g"), f"{100 * r['allowed_fraction']:.1f}%", diff, st])
    return "\n".join([table(headers, body, "lllrrrrl"), *notes])
