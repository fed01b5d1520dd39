"""PNG plots of `jaxattn compare` and `jaxattn bench` results (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ZERO_FLOOR = 1e-10  # where exact zeros are drawn on log axes


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
        ax.plot(ns, ys, "--", color="0.55", lw=1, zorder=0)
        ax.annotate(label, (ns[-1], ys[-1]), textcoords="offset points", xytext=(3, 0), fontsize=8,
                    color="0.35", va="center")


def _line_panel(ax, rows, key, scale, ylabel, title, window, hollow_if=None):
    for i, m in enumerate(_methods(rows)):
        pts = sorted(_ok([r for r in rows if r["method"] == m], key), key=lambda r: r["seq_len"])
        if not pts:
            continue
        color = f"C{i}"
        label = f"{m} ({pts[0]['implementation']})"
        ax.plot([r["seq_len"] for r in pts], [r[key] * scale for r in pts], "-", color=color, label=label)
        for r in pts:
            hollow = hollow_if is not None and hollow_if(r)
            ax.plot(r["seq_len"], r[key] * scale, "o", color=color, mfc="none" if hollow else color, ms=5)
    scaled = [dict(r, **{key: r[key] * scale}) for r in _ok(rows, key)]
    _reference_slopes(ax, scaled, key, window)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _error_panel(ax, rows):
    from matplotlib.lines import Line2D

    pts = _ok(rows, "err_max_abs")
    handles = []
    for i, m in enumerate(_methods(rows)):
        mine = [r for r in pts if r["method"] == m]
        if not mine:
            continue
        x = [1 - r["allowed_fraction"] for r in mine]
        ax.scatter(x, [max(r["err_max_abs"], _ZERO_FLOOR) for r in mine], color=f"C{i}", marker="o", s=22)
        ax.scatter(x, [max(r["dev_full_max_abs"], _ZERO_FLOOR) for r in mine], color=f"C{i}",
                   marker="s", facecolors="none", s=30)
        handles.append(Line2D([], [], color=f"C{i}", marker="o", ls="", label=m))
    handles += [Line2D([], [], color="0.3", marker="o", ls="", label="vs reference, same mask"),
                Line2D([], [], color="0.3", marker="s", mfc="none", ls="", label="vs full attention")]
    ax.set_yscale("log")
    ax.set_xlim(-0.03, 1.0)
    ax.set_xlabel("sparsity (share of pairs the mask removes)")
    ax.set_ylabel(f"max |output − reference|   (0 drawn at {_ZERO_FLOOR:g})")
    ax.set_title("error (filled) and deviation from full attention (hollow)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="center right")


def compare_plots(rows: list[dict], meta: dict, config: dict, out_dir: Path) -> list[Path]:
    """compare_time.png, compare_memory.png, compare_error.png and compare.png (all three)."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    window = config["params"]["window"]
    where = f"{meta['device']} ({meta['platform']}), {config['dtype']}, B={config['batch']} " \
            f"N={config['heads']} H={config['head_dim']}"
    mem_src = {r.get("memory_source") for r in _ok(rows, "memory_bytes")}
    mem_label = ("peak device memory" if mem_src == {"device_peak"} else
                 "memory, XLA estimate (arg+out+temp)" if mem_src <= {"xla_estimate"} else
                 "memory: device peak (filled) / XLA estimate (hollow)")

    def time_panel(ax):
        _line_panel(ax, rows, "time_ms", 1.0, "time per call (ms, median)", f"time — {where}", window)

    def memory_panel(ax):
        _line_panel(ax, rows, "memory_bytes", 1 / 2**20, "MiB", mem_label, window,
                    hollow_if=lambda r: r.get("memory_source") != "device_peak")

    written = []
    for name, draw, size in (("compare_time.png", time_panel, (7, 5)),
                             ("compare_memory.png", memory_panel, (7, 5)),
                             ("compare_error.png", lambda ax: _error_panel(ax, rows), (7, 5))):
        fig, ax = plt.subplots(figsize=size)
        draw(ax)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    time_panel(axes[0])
    memory_panel(axes[1])
    _error_panel(axes[2], rows)
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=100)
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
            ax.bar(pos, vals, width, label=impl, color=f"C{k}")
            for p, f in zip(pos, failed):
                if f:
                    ax.text(p, 0, "×", ha="center", va="bottom", color=f"C{k}", fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("TFLOP/s (useful work)")
        ax.set_title(f"{mode.replace('_and_vjp', ' + backward')} — {meta['device']}, jax {meta['jax_version']}, "
                     f"{meta['date'][:10]}  (× = failed / unavailable)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
