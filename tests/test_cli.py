"""The `jaxattn` command (jaxattn/cli.py), run in-process on tiny sizes."""

from __future__ import annotations

import json
import runpy
import sys

import jax
import pytest

import jaxattn
from jaxattn import cli

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
    code = cli.main(["compare", *TINY, "--methods", "full,local:xla,flash", "--out", str(out)])
    return code, out, _load(out / "compare.json")


def _rows(data, method):
    rows = sorted((r for r in data["results"] if r["method"] == method), key=lambda r: r["seq_len"])
    assert [r["seq_len"] for r in rows] == LENS
    return rows


def test_compare_writes_table_json_and_plots(tiny_compare, capsys):
    code, out, data = tiny_compare
    assert code == 0
    assert data["complete"] and not data["interrupted"]
    for key in ("device", "platform", "date", "jax_version"):
        assert data["meta"][key]
    for name in ("compare.txt", "compare_time.png", "compare_memory.png", "compare_error.png", "compare.png"):
        assert (out / name).stat().st_size > 1000 if name.endswith(".png") else (out / name).exists()
    text = (out / "compare.txt").read_text()
    assert "err vs same-mask ref" in text and "dev vs full attn" in text
    assert len(data["results"]) == 3 * len(LENS)


def test_compare_numbers_are_sane(tiny_compare):
    _, _, data = tiny_compare
    for r in data["results"]:
        if r["method"] == "flash" and not HAS_FLASH:
            assert r["status"] == "unavailable" and "pallas_triton" in r["reason"]
            continue
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["timing"]["repeats"] >= 1
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
    _, _, data = tiny_compare
    for r in _rows(data, "flash"):
        assert r["implementation"] == "pallas_triton"
        assert r["status"] == "ok", r
        assert r["err_max_abs"] < 1e-5 and r["dev_full_max_abs"] < 1e-5
        assert r["err_rel_l2"] < 1e-5


def test_flops_follow_the_mask(tiny_compare):
    _, _, data = tiny_compare
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
    ["compare", "--no-such-flag"],
    ["bench", "--modes", "sideways"],
    ["bench", "--repeats", "0"],
    ["frobnicate"],
])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_help_explains_each_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--seq-lens", "--head-dim", "--dtype", "--implementation", "--out", "--quick", "--methods"):
        assert flag in text
    assert "default" in text


def test_ctrl_c_keeps_what_was_measured(tmp_path, monkeypatch):
    from benchmarks import timing

    real = timing.time_call
    calls = []

    def interrupted_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(timing, "time_call", interrupted_on_second_call)
    code = cli.main(["compare", "--seq-lens", "32,64,128", "--methods", "full", "--heads", "1",
                     "--head-dim", "8", "--repeats", "1", "--out", str(tmp_path), "--no-plots"])
    assert code == 130
    data = _load(tmp_path / "compare.json")
    assert data["interrupted"] and not data["complete"]
    assert [(r["seq_len"], r["status"]) for r in data["results"]] == [(32, "ok")]
    assert (tmp_path / "compare.txt").exists()


@pytest.mark.skipif(ON_GPU, reason="checks the message shown without a GPU")
def test_bench_without_gpu_is_a_friendly_error(tmp_path, capsys):
    code = cli.main(["bench", "--out", str(tmp_path)])
    assert code != 0
    err = capsys.readouterr().err
    assert "no GPU" in err and "--allow-cpu" in err and "Traceback" not in err
    assert not (tmp_path / "bench.json").exists()


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
    from benchmarks import compare

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
    from benchmarks import compare, timing

    monkeypatch.setattr(compare, "device_memory_stats", _fake_stats(limit=5 * 10**5 + 1000))
    monkeypatch.setattr(timing, "time_call", lambda *a, **k: pytest.fail("ran a call that cannot fit"))
    code = cli.main(["compare", "--seq-lens", "64", "--methods", "full", "--heads", "1", "--head-dim", "8",
                     "--repeats", "1", "--out", str(tmp_path), "--no-plots"])
    assert code == 0
    (row,) = _load(tmp_path / "compare.json")["results"]
    assert row["status"] == "oom" and "XLA estimate" in row["reason"]
