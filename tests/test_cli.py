"""The `jaxattn` command (jaxattn/cli.py), run in-process on tiny sizes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

import jaxattn
from jaxattn import cli
from jaxattn.benchmarking import report

HAS_FLASH = "pallas_triton" in jaxattn.available_implementations()
ON_GPU = jax.default_backend() == "gpu"

# n = 64, 128 with a window of 16: local attention allows n·(2w+1) - w·(w+1) pairs.
LENS = [64, 128]
TINY = ["--seq-lens", "64,128", "--heads", "2", "--head-dim", "16", "--window", "16",
        "--num-global", "4", "--block-size", "32", "--repeats", "2", "--warmup", "1"]
B, N, H, W = 1, 2, 16, 16


def _load(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    log = io.StringIO()  # not a terminal: one line per finished measurement
    with contextlib.redirect_stdout(log):
        code = cli.main(["compare", *TINY, "--methods", "full,local:xla,flash", "--out", str(out)])
    return code, out, _load(out / "compare.json"), log.getvalue()


def _rows(data, method):
    rows = sorted((r for r in data["results"] if r["method"] == method), key=lambda r: r["seq_len"])
    assert [r["seq_len"] for r in rows] == LENS
    return rows


def test_compare_writes_table_json_and_plots(tiny_compare, capsys):
    code, out, data, _ = tiny_compare
    assert code == 0
    assert data["complete"] and not data["interrupted"]
    for key in ("device", "platform", "date", "jax_version"):
        assert data["meta"][key]
    for name in ("compare.txt", "compare_time.png", "compare_memory.png", "compare_error.png", "compare.png"):
        assert (out / name).stat().st_size > 1000 if name.endswith(".png") else (out / name).exists()
    text = (out / "compare.txt").read_text()
    assert "err vs same-mask ref" in text and "dev vs full attn" in text
    assert "back to back: calls issued without waiting" in text
    assert len(data["results"]) == 3 * len(LENS)
    table = text.split("\n\n")[1].splitlines()
    rule = next(i for i, line in enumerate(table) if line.startswith("─"))
    assert sum("back" in line for line in table[:rule]) == 2  # the header "back to back ms"
    for r in data["results"]:  # the back-to-back time sits right of the median
        if r["status"] == "ok":
            cells = next(line for line in table[rule + 1:]
                         if line.split()[:3] == [r["method"], r["implementation"], str(r["seq_len"])]).split()
            assert cells[3:5] == [report.fmt_fixed(r["time_ms"]), report.fmt_fixed(r["back_to_back_ms"])]


def test_compare_numbers_are_sane(tiny_compare):
    _, _, data, _ = tiny_compare
    for r in data["results"]:
        if r["method"] == "flash" and not HAS_FLASH:
            assert r["status"] == "unavailable" and "pallas_triton" in r["reason"]
            continue
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["timing"]["repeats"] >= 1
        b2b = r["timing"]["back_to_back"]
        assert r["back_to_back_ms"] == pytest.approx(b2b["per_call_s"] * 1e3) and b2b["calls"] == 2
        assert r["back_to_back_ms"] >= b2b["issue_s"] * 1e3 > 0
        assert r["memory_bytes"] > 0 and r["memory_source"] in ("xla_estimate", "device_peak")
    full = _rows(data, "full")
    for r in full:  # the reference against itself
        assert r["err_max_abs"] == 0 and r["dev_full_max_abs"] == 0
    for r in _rows(data, "local"):  # xla with the same mask: tiny error; far from full by design
        assert r["err_max_abs"] < 1e-5
        assert r["dev_full_max_abs"] > 1e-2
    # Memory of the dense reference grows ~quadratically (the n×n logits dominate).
    assert full[1]["memory_bytes"] > 3 * full[0]["memory_bytes"]


@pytest.mark.skipif(not HAS_FLASH, reason="pallas_triton is not registered")
def test_flash_matches_full_reference(tiny_compare):
    _, _, data, _ = tiny_compare
    for r in _rows(data, "flash"):
        assert r["implementation"] == "pallas_triton"
        assert r["status"] == "ok", r
        assert r["err_max_abs"] < 1e-5 and r["dev_full_max_abs"] < 1e-5
        assert r["err_rel_l2"] < 1e-5


def test_flops_follow_the_mask(tiny_compare):
    _, _, data, _ = tiny_compare
    for r in _rows(data, "full"):
        n = r["seq_len"]
        assert r["allowed_fraction"] == 1.0
        assert r["flops_forward"] == 4 * B * N * n * n * H
    local = _rows(data, "local")
    for r in local:
        n = r["seq_len"]
        assert r["flops_forward"] == 4 * B * N * H * (n * (2 * W + 1) - W * (W + 1))
    # Local grows linearly (x2.0-2.1 per doubling, edges aside), full quadratically (x4).
    full = _rows(data, "full")
    for a, b in zip(local, local[1:]):
        assert 1.95 < b["flops_forward"] / a["flops_forward"] < 2.15
    for a, b in zip(full, full[1:]):
        assert b["flops_forward"] / a["flops_forward"] == 4


@pytest.mark.parametrize("argv", [
    [],
    ["compare", "--seq-lens", "abc"],
    ["compare", "--seq-lens", "128,-4"],
    ["compare", "--dtype", "int8"],
    ["compare", "--methods", "full,dilated"],
    ["compare", "--methods", "local:nonexistent"],
    ["compare", "--implementation", "nonexistent"],
    ["compare", "--head-dim", "0"],
    ["compare", "--window", "0"],
    ["compare", "--num-global", "-1"],
    ["compare", "--time-budget", "-2"],
    ["compare", "--no-such-flag"],
    ["bench", "--modes", "sideways"],
    ["bench", "--repeats", "0"],
    ["bench", "--warmup", "x"],
    ["bench", "--decode", "--allow-cpu", "--cases", "S128"],
    ["bench", "--decode", "--allow-cpu", "--implementations", "pallas_mosaic_gpu"],
    ["frobnicate"],
])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    if argv and argv[0] in ("compare", "bench"):  # the subcommand's usage, not the top level's
        assert f"usage: jaxattn {argv[0]} " in err
        assert "usage: jaxattn [-h]" not in err
    if argv[:2] == ["compare", "--window"]:
        assert "argument --window: expected a positive integer, got '0'" in err


def test_help_explains_each_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--seq-lens", "--head-dim", "--dtype", "--implementation", "--out", "--quick", "--methods"):
        assert flag in text
    assert "default" in text


@pytest.mark.parametrize("stage", ["compile", "timing"])
def test_ctrl_c_keeps_what_was_measured(stage, tmp_path, monkeypatch):
    """Ctrl-C while the second case compiles, or while it is timed: the first case is kept."""
    from jaxattn.benchmarking import compare, timing

    module, name = (compare, "build_call") if stage == "compile" else (timing, "time_call")
    real = getattr(module, name)
    calls = []

    def interrupted_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted_on_second_call)
    code = cli.main(["compare", "--seq-lens", "32,64,128", "--methods", "full", "--heads", "1",
                     "--head-dim", "8", "--repeats", "1", "--out", str(tmp_path), "--no-plots"])
    assert code == 130
    data = _load(tmp_path / "compare.json")
    assert data["interrupted"] and not data["complete"]
    assert [(r["seq_len"], r["status"]) for r in data["results"]] == [(32, "ok")]
    assert data["results"][0]["err_max_abs"] == 0  # finished means measured and checked
    text = (tmp_path / "compare.txt").read_text()
    assert "interrupted (Ctrl-C)" in text and " 32 " in text


@pytest.mark.skipif(ON_GPU, reason="checks the message shown without a GPU")
def test_bench_without_gpu_is_a_friendly_error(tmp_path, capsys):
    code = cli.main(["bench", "--out", str(tmp_path)])
    assert code != 0
    err = capsys.readouterr().err
    assert "no GPU" in err and "--allow-cpu" in err and "Traceback" not in err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.skipif(ON_GPU, reason="CPU smoke mode")
def test_bench_decode_allow_cpu_smoke(tmp_path):
    """`jaxattn bench --decode`: GB/s rows for the kernel (contiguous and paged) beside XLA,
    which has no page table (skipped there, not failed); the bytes model is K and V of
    every valid slot."""
    code = cli.main(["bench", "--decode", "--allow-cpu", "--repeats", "1", "--warmup", "0",
                     "--out", str(tmp_path)])
    assert code == 0
    data = _load(tmp_path / "bench_decode.json")
    assert data["smoke_run_on_cpu"] is True and data["complete"]
    rows = {(r["impl"], r["layout"]): r for r in data["results"]}
    assert set(rows) == {("pallas_triton", "contiguous"), ("xla", "contiguous"), ("pallas_triton", "paged16")}
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["bytes"] == 2 * r["batch"] * r["context"] * r["kv_heads"] * r["head_dim"] * 2
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["steady_gbps"] == pytest.approx(r["bytes"] / (r["steady_ms"] * 1e-3) / 1e9)
        assert r["timing"]["back_to_back"]["calls"] == 2
    text = (tmp_path / "bench_decode.txt").read_text()
    assert text.count("| K | B | context |") == 2 and "issued back to back" in text


@pytest.mark.skipif(ON_GPU, reason="CPU smoke mode")
def test_bench_allow_cpu_smoke(tmp_path):
    code = cli.main(["bench", "--allow-cpu", "--cases", "S128 causal", "--implementations", "xla,cudnn",
                     "--repeats", "2", "--out", str(tmp_path)])
    assert code == 0
    data = _load(tmp_path / "bench.json")
    for key in ("device", "date", "jax_version"):
        assert data["meta"][key]
    assert data["smoke_run_on_cpu"] is True
    by = {(r["implementation"], r["mode"]): r for r in data["results"]}
    assert set(by) == {(i, m) for i in ("jax.nn xla", "jax.nn cudnn") for m in ("forward", "forward_and_vjp")}
    for mode in ("forward", "forward_and_vjp"):
        r = by[("jax.nn xla", mode)]
        assert r["status"] == "ok" and r["tflops"] > 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["time_ms"] * 1e-3) / 1e12)
        assert by[("jax.nn cudnn", mode)]["status"] == "unavailable"
    fwd = by[("jax.nn xla", "forward")]
    assert by[("jax.nn xla", "forward_and_vjp")]["flops"] == pytest.approx(3.5 * fwd["flops"])
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_python_dash_m_runs_the_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["jaxattn", "compare", "--seq-lens", "x"])
    sys.modules.pop("jaxattn.__main__", None)
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("jaxattn", run_name="__main__")
    assert exc.value.code == 2 and "--seq-lens" in capsys.readouterr().err


def _fake_stats(limit):
    """memory_stats() of a GPU-like device whose peak counter rises by 1 MB per query."""
    state = {"peak": 10**6}

    def stats():
        state["peak"] += 10**6
        return {"bytes_in_use": 5 * 10**5, "peak_bytes_in_use": state["peak"], "bytes_limit": limit}
    return stats


def test_device_peak_is_used_where_the_backend_keeps_statistics(tmp_path, monkeypatch):
    from jaxattn.benchmarking import compare

    monkeypatch.setattr(compare, "device_memory_stats", _fake_stats(limit=10**12))
    code = cli.main(["compare", "--seq-lens", "32", "--methods", "full", "--heads", "1", "--head-dim", "8",
                     "--repeats", "1", "--out", str(tmp_path), "--no-plots"])
    assert code == 0
    (row,) = _load(tmp_path / "compare.json")["results"]
    assert row["memory_source"] == "device_peak"
    args = 3 * 32 * 8 * 4  # q, k, v float32
    assert row["memory_bytes"] == row["device_peak_bytes"] == 4 * 10**6 - 5 * 10**5 + args  # 3rd query: after the call
    assert row["xla_estimate_bytes"] > 0


def test_estimated_oom_is_reported_not_run(tmp_path, monkeypatch):
    from jaxattn.benchmarking import compare, timing

    monkeypatch.setattr(compare, "device_memory_stats", _fake_stats(limit=5 * 10**5 + 1000))
    monkeypatch.setattr(timing, "time_call", lambda *a, **k: pytest.fail("ran a call that cannot fit"))
    code = cli.main(["compare", "--seq-lens", "64", "--methods", "full", "--heads", "1", "--head-dim", "8",
                     "--repeats", "1", "--out", str(tmp_path), "--no-plots"])
    assert code == 0
    (row,) = _load(tmp_path / "compare.json")["results"]
    assert row["status"] == "oom" and "XLA estimate" in row["reason"]


# ------------------------------------------------------------------------------------
# What a newcomer sees: a fast --help, a readable log, a header, 100 columns, MiB, plots
# ------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def test_help_answers_at_once_without_jax():
    """`jaxattn --help` imports neither jax nor flax (measured ~0.05 s of imports; the bound
    is generous for a loaded 2-core CI machine)."""
    start = time.perf_counter()
    proc = _python("import sys; from jaxattn.cli import main\n"
                   "try:\n    main(['compare', '--help'])\nexcept SystemExit:\n    pass\n"
                   "print('loaded:', sorted(m for m in ('jax', 'flax', 'rich', 'matplotlib') if m in sys.modules))")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "usage: jaxattn compare" in proc.stdout
    assert "loaded: []" in proc.stdout
    assert elapsed < 2.0, f"jaxattn compare --help took {elapsed:.2f} s"


def test_public_names_load_on_first_use():
    proc = _python("import sys, jaxattn\n"
                   "assert 'jax' not in sys.modules\n"
                   "from jaxattn import masks\n"
                   "print(callable(jaxattn.dot_product_attention), callable(jaxattn.ring_attention),\n"
                   "      masks.CausalMask.__name__, jaxattn.layers.Decoder.__name__,\n"
                   "      callable(jaxattn.parallel.zigzag_permutation), sorted(jaxattn.__all__) == sorted(\n"
                   "      n for n in jaxattn.__all__ if hasattr(jaxattn, n)))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "CausalMask", "Decoder", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'frobnicate'"):
        jaxattn.frobnicate  # noqa: B018


def test_version_comes_from_the_installed_metadata():
    try:
        want = importlib.metadata.version("jaxattn")
    except importlib.metadata.PackageNotFoundError:
        want = "0+unknown"
    assert jaxattn.__version__ == want


def test_log_has_one_line_per_finished_measurement(tiny_compare):
    _, _, data, log = tiny_compare
    lines = [ln for ln in log.splitlines() if ln.startswith("[")]
    total = len(data["results"])
    assert [ln.split("]")[0] for ln in lines] == [f"[{i}/{total}" for i in range(1, total + 1)]
    assert any("local (xla) n=128:" in ln and " MiB, err " in ln for ln in lines)


def test_compare_txt_has_a_header_fits_100_columns_and_speaks_mib(tiny_compare):
    _, out, data, log = tiny_compare
    text = (out / "compare.txt").read_text()
    head = text.split("\n\n")[0]
    assert head.startswith("jaxattn compare, ")
    for needle in (f"device: {data['meta']['device']}", "float32", "B=1 N=2 H=16", "window w=16",
                   "commit " + (data["meta"]["git_commit"] or "not a git checkout")):
        assert needle in head, needle
    assert max(len(line) for line in text.splitlines()) <= 100
    assert max(len(line) for line in log.splitlines()) <= 100
    assert "memory" in text and "MiB" in text
    for other_unit in (" KB", " MB", " GB", " GiB", " KiB"):
        assert other_unit not in text
    assert text.split("\n\n")[1] in log  # the same table on stdout


def test_plots_tell_lines_apart_keep_legends_off_the_data_and_say_cpu(tiny_compare, monkeypatch):
    from matplotlib.figure import Figure

    from jaxattn.benchmarking import plots

    _, out, data, _ = tiny_compare
    seen = []

    def inspect(fig):  # at save time, while the figure still has its Agg canvas
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            legend = ax.get_legend()
            assert legend is not None
            assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
            lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
            styles = {(ln.get_marker(), str(ln.get_linestyle())) for ln in lines}
            assert len(styles) == len(lines)  # full and flash lie on top of each other: told apart
            seen.append(ax.get_title())

    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (inspect(fig), real_savefig(fig, *a, **k)))
    plots.compare_plots(data["results"], data["meta"], data["config"], out)
    assert len(seen) == 3 + 3  # three single panels, then the three of compare.png
    for title in seen:
        assert ("CPU run" in title) != ON_GPU, title


def _time_panel_curves(monkeypatch, rows, data, out):
    """(y label, {legend label: y values}) of the time panel compare_plots draws."""
    from matplotlib.figure import Figure

    from jaxattn.benchmarking import plots

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig.axes[0]))
    plots.compare_plots(rows, data["meta"], data["config"], out)
    ax = drawn[0]  # compare_time.png
    return ax.get_ylabel(), {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()
                             if not ln.get_label().startswith("_")}


def test_time_plot_draws_back_to_back_times_when_the_rows_have_them(tiny_compare, monkeypatch, tmp_path):
    _, _, data, _ = tiny_compare
    rows = data["results"]
    label, curves = _time_panel_curves(monkeypatch, rows, data, tmp_path)
    assert "issued back to back" in label
    full = sorted((r for r in rows if r["method"] == "full"), key=lambda r: r["seq_len"])
    assert curves["full (reference)"] == [r["back_to_back_ms"] for r in full]
    # Results written before the back-to-back measurement existed: the median, said so.
    older = [{k: v for k, v in r.items() if k != "back_to_back_ms"} for r in rows]
    label, curves = _time_panel_curves(monkeypatch, older, data, tmp_path)
    assert "median" in label and "back to back" not in label
    assert curves["full (reference)"] == [r["time_ms"] for r in full]


def test_back_to_back_calls_fit_a_tenth_of_the_time_budget():
    from jaxattn.benchmarking import compare
    from jaxattn.benchmarking.cases import PatternParams

    def config(repeats, budget_s):
        return compare.CompareConfig(seq_lens=(64,), methods=(("full", None),), batch=1, heads=1, head_dim=8,
                                     dtype="float32", params=PatternParams(16, 4, 32, 2), repeats=repeats,
                                     budget_s=budget_s)

    assert compare.back_to_back_calls(config(20, None), 5.0) == 20  # no budget (GPU): every repeat
    assert compare.back_to_back_calls(config(20, 1.0), 0.004) == 20  # 25 fit in 0.1 s: capped
    assert compare.back_to_back_calls(config(20, 1.0), 0.02) == 5
    assert compare.back_to_back_calls(config(20, 1.0), 0.3) == 1  # slow calls: still one
    assert compare.back_to_back_calls(config(3, 1.0), 0.0) == 3  # never more than --repeats


def test_terminal_gets_one_progress_display_with_eta():
    from rich.console import Console

    from jaxattn.benchmarking.progress import RunProgress

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100, color_system=None)
    with RunProgress(2, "compare", console=console) as progress:
        assert progress.live
        progress.start("full n=64")
        progress.finished("full (reference) n=64: 1 ms")
        progress.finished("flash (pallas_triton) n=64: 2 ms")
    shown = screen.getvalue()
    assert "[1/2] full (reference) n=64: 1 ms" in shown and "2/2" in shown
    assert "left" in shown and "0:00:00" in shown  # time left (ETA) and elapsed columns

    log = io.StringIO()
    with RunProgress(1, "compare", console=Console(file=log, force_terminal=False)) as progress:
        assert not progress.live
        progress.finished("full (reference) n=64: 1 ms")
    assert log.getvalue() == "[1/1] full (reference) n=64: 1 ms\n"


def _example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("long_range_lm_cli", ROOT / "examples" / "long_range_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_help_shows_every_option_with_its_default_and_a_quick_mode():
    ex = _example_module()
    parser = ex.build_parser()
    text = " ".join(parser.format_help().split())  # as one line: help wraps anywhere
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help line"
        assert action.option_strings[0] in text
        if action.default not in (None, False):
            assert f"(default: {action.default})" in text, action.option_strings
    quick = ex.parse_args(["--quick", "--steps", "7"])
    assert quick.steps == 7  # an explicit option wins over --quick
    assert (quick.batch, quick.eval_batches) == (ex.QUICK["batch"], ex.QUICK["eval_batches"])
    full = ex.parse_args([])
    assert (full.steps, full.batch) == (200, 32)
    with pytest.raises(SystemExit):
        ex.parse_args(["--attention", "full,dilated"])
