"""PNG plots of `jaxattn compare` and `jaxattn bench` results (matplotlib, Agg).

Every method keeps one colour, marker and line style in every panel, so lines that lie on
top of each other (full and flash FLOPs, local and longformer memory) stay told apart; the
legends sit outside the axes, beside the data they describe; a run that was not on a GPU
says so in its title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ZERO_FLOOR = 1e-10  # where exact zeros are drawn on log axes
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
_CPU_NOTE = "CPU run: Pallas kernels emulated (interpret mode), times are not GPU times"


def _style(i: int) -> dict:
    """Colour, marker and line style of the i-th method."""
    return {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)]}


def _legend_outside(ax, **kwargs):
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def _platform_note(meta: dict) -> str:
    return "" if meta.get("platform") == "gpu" else "\n" + _CPU_NOTE


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _ok(rows, key):
    return [r for r in rows if r["status"] == "ok" and r.get(key) is not None]


def _methods(rows):
    seen = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _reference_slopes(ax, rows, key, window):
    """Dashed guides ∝ n² (through the first full-attention point) and ∝ n·w (through
    the first local-window point): a method parallel to a guide scales like it."""
    pts = _ok(rows, key)
    if not pts:
        return
    ns = np.array(sorted({r["seq_len"] for r in pts}), float)
    if len(ns) < 2:
        return
    for slope, families, label in ((2, ("full", "flash"), "∝ n²"),
                                   (1, ("local", "sparse"), f"∝ n·w (w={window})")):
        anchor = []
        for fam in families:  # the first family present gives the anchor
            anchor = anchor or [r for r in pts if r["family"] == fam]
        if not anchor:
            continue
        a = min(anchor, key=lambda r: r["seq_len"])
        ys = a[key] * (ns / a["seq_len"]) ** slope
        ax.plot(ns, ys, color="0.6", lw=0.8, ls=(0, (1, 2)), zorder=0)
        ax.annotate(label, (ns[-1], ys[-1]), textcoords="offset points", xytext=(3, 0), fontsize=8,
                    color="0.35", va="center")


def _same_curve(a: dict, b: dict, rel: float = 0.02) -> bool:
    """Two {n: value} curves that a log plot draws on top of each other."""
    return a.keys() == b.keys() and all(abs(a[n] - b[n]) <= rel * max(abs(a[n]), abs(b[n])) for n in a)


def _line_panel(ax, rows, key, scale, ylabel, title, window, hollow_if=None):
    """One line per method. Markers shrink from the first method to the last, so markers
    drawn on the same point show as nested shapes, and a curve that coincides with an
    earlier one says so in its legend entry ("= flash")."""
    drawn: dict[str, dict] = {}
    for i, m in enumerate(_methods(rows)):
        pts = sorted(_ok([r for r in rows if r["method"] == m], key), key=lambda r: r["seq_len"])
        if not pts:
            continue
        style = _style(i)
        curve = {r["seq_len"]: r[key] * scale for r in pts}
        label = f"{m} ({pts[0]['implementation']})"
        twins = [other for other, c in drawn.items() if _same_curve(curve, c)]
        if twins:
            label += " = " + twins[0]
        drawn[m] = curve
        ms = max(3.0, 8.0 - 0.9 * i)
        ax.plot(list(curve), list(curve.values()), color=style["color"], linestyle=style["linestyle"], lw=1.4,
                marker=style["marker"], ms=ms, label=label)
        for r in pts:
            if hollow_if is not None and hollow_if(r):
                ax.plot(r["seq_len"], r[key] * scale, style["marker"], color=style["color"], mfc="white", ms=ms)
    scaled = [dict(r, **{key: r[key] * scale}) for r in _ok(rows, key)]
    _reference_slopes(ax, scaled, key, window)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)


def _error_panel(ax, rows, note=""):
    from matplotlib.lines import Line2D

    pts = _ok(rows, "err_max_abs")
    handles = []
    for i, m in enumerate(_methods(rows)):
        mine = [r for r in pts if r["method"] == m]
        if not mine:
            continue
        style = _style(i)
        x = [1 - r["allowed_fraction"] for r in mine]
        ax.scatter(x, [max(r["err_max_abs"], _ZERO_FLOOR) for r in mine], color=style["color"],
                   marker=style["marker"], s=24)
        ax.scatter(x, [max(r["dev_full_max_abs"], _ZERO_FLOOR) for r in mine], color=style["color"],
                   marker=style["marker"], facecolors="none", s=34)
        handles.append(Line2D([], [], color=style["color"], marker=style["marker"], ls="", label=m))
    handles += [Line2D([], [], color="0.3", marker="o", ls="", label="filled: vs reference, same mask"),
                Line2D([], [], color="0.3", marker="o", mfc="none", ls="", label="hollow: vs full attention")]
    ax.set_yscale("log")
    ax.set_xlim(-0.03, 1.0)
    ax.set_xlabel("sparsity (share of pairs the mask removes)")
    ax.set_ylabel(f"max |output − reference|   (0 drawn at {_ZERO_FLOOR:g})")
    ax.set_title("error (filled) and deviation from full attention (hollow)" + note, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax, handles=handles)


def time_series(rows: list[dict]) -> tuple[str, str]:
    """The row key the time panel draws and its axis label: the time of calls issued back to
    back when every timed row has one (the device's cost, without the host's per-call
    dispatch and wait), else the median of waited-for calls (results of older versions)."""
    timed = _ok(rows, "time_ms")
    if timed and all(r.get("back_to_back_ms") is not None for r in timed):
        return "back_to_back_ms", "time per call (ms, issued back to back)"
    return "time_ms", "time per call (ms, median of waited-for calls)"


def compare_plots(rows: list[dict], meta: dict, config: dict, out_dir: Path) -> list[Path]:
    """compare_time.png, compare_memory.png, compare_error.png and compare.png (all three)."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    window = config["params"]["window"]
    where = f"{meta['device']} ({meta['platform']}), {config['dtype']}, B={config['batch']} " \
            f"N={config['heads']} H={config['head_dim']}"
    note = _platform_note(meta)
    mem_src = {r.get("memory_source") for r in _ok(rows, "memory_bytes")}
    mem_label = ("peak device memory" if mem_src == {"device_peak"} else
                 "memory, XLA estimate (arg+out+temp)" if mem_src <= {"xla_estimate"} else
                 "memory: device peak (filled) / XLA estimate (hollow)")

    time_key, time_label = time_series(rows)

    def time_panel(ax):
        _line_panel(ax, rows, time_key, 1.0, time_label, f"time — {where}{note}", window)

    def memory_panel(ax):
        mixed = len(mem_src) > 1  # hollow marks the estimates only when both kinds are drawn
        _line_panel(ax, rows, "memory_bytes", 1 / 2**20, "MiB", mem_label + note, window,
                    hollow_if=(lambda r: r.get("memory_source") != "device_peak") if mixed else None)

    written = []
    def error_panel(ax):
        _error_panel(ax, rows, note)

    for name, draw in (("compare_time.png", time_panel), ("compare_memory.png", memory_panel),
                       ("compare_error.png", error_panel)):
        fig, ax = plt.subplots(figsize=(7.5, 5))
        draw(ax)
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out_dir / name)
    fig, axes = plt.subplots(1, 3, figsize=(24, 5.5), gridspec_kw={"wspace": 0.55})
    time_panel(axes[0])
    memory_panel(axes[1])
    error_panel(axes[2])
    fig.savefig(out_dir / "compare.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(out_dir / "compare.png")
    return written


def bench_plot(rows: list[dict], meta: dict, out_path: Path) -> Path:
    """Grouped bars of TFLOP/s per case, one panel per mode; failed runs marked ×."""
    plt = _plt()
    modes = [m for m in ("forward", "forward_and_vjp") if any(r["mode"] == m for r in rows)]
    cases = []
    impls = []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
        if r["implementation"] not in impls:
            impls.append(r["implementation"])
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8, 0.9 * len(cases) * len(impls) / 2 + 4),
                                                      4.2 * len(modes)), squeeze=False)
    width = 0.8 / max(len(impls), 1)
    x = np.arange(len(cases))
    for ax, mode in zip(axes[:, 0], modes):
        for k, impl in enumerate(impls):
            vals, failed = [], []
            for c in cases:
                r = next((r for r in rows if r["case"] == c and r["mode"] == mode
                          and r["implementation"] == impl), None)
                ok = r is not None and r["status"] == "ok" and r.get("tflops") is not None
                vals.append(r["tflops"] if ok else 0.0)
                failed.append(r is not None and not ok)
            pos = x - 0.4 + width * (k + 0.5)
            ax.bar(pos, vals, width, label=impl, color=f"C{k}", hatch=("", "//", "..", "xx")[k % 4],
                   edgecolor="white", linewidth=0.5)
            for p, f in zip(pos, failed):
                if f:
                    ax.text(p, 0, "×", ha="center", va="bottom", color=f"C{k}", fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("TFLOP/s (useful work)")
        smoke = "" if meta.get("platform") == "gpu" else "\nCPU smoke run: checks the pipeline, not a benchmark"
        ax.set_title(f"{mode.replace('_and_vjp', ' + backward')} — {meta['device']}, jax {meta['jax_version']}, "
                     f"{meta['date'][:10]}  (× = failed / unavailable){smoke}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        _legend_outside(ax)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_path
