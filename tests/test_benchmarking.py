"""jaxattn/benchmarking/: the FLOP model's exact pair counts, the timing harness, the named cases."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

from jaxattn import masks as M
from jaxattn.benchmarking import cases, flops, timing


def _dense_count(mask, t, s):
    d = np.asarray(mask.to_dense(t, s)).reshape(-1, t, s)
    return d.sum() / d.shape[0]


MASKS = [
    M.FullMask(), M.CausalMask(), M.CausalMask(offset=-3), M.CausalMask(offset=40),
    M.LocalMask(5, 2), M.LocalMask(None, 3, offset=4), M.LocalMask(7, None), M.LocalMask(0, 0),
    M.GlobalMask(9), M.GlobalMask(0), M.PrefixLMMask(13), M.StridedMask(7), M.StridedMask(5, offset=-3),
    M.longformer_mask(20, 8), M.longformer_mask(20, 8, causal=True),
    M.bigbird_mask(300, window=17, num_global=5, num_random_blocks=2, block_size=32, kv_len=333),
    M.CausalMask() & (M.LocalMask(30, 0) | M.StridedMask(30)),
    M.DenseMask(np.random.default_rng(0).random((300, 333)) < 0.3),
    M.SegmentMask(jnp.asarray(np.sort(np.random.default_rng(1).integers(0, 4, (2, 300))), jnp.int32),
                  jnp.asarray(np.sort(np.random.default_rng(2).integers(0, 4, (2, 333))), jnp.int32)),
]


@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_allowed_pairs_is_exact(mask):
    t, s = 300, 333  # odd sizes: ragged last tiles
    want = _dense_count(mask, t, s)
    assert flops.allowed_pairs(mask, t, s) == want
    assert flops._count_tiled(mask, t, s) == want  # the generic path, also for closed-form masks


def test_counting_at_scale_needs_no_dense_matrix(monkeypatch):
    monkeypatch.setattr(M.Mask, "to_dense", lambda *a: pytest.fail("built a dense mask"))
    n, w = 131072, 256
    window = M.LocalMask(w, 0)
    # (w + 1) keys per row, minus the triangle cut off at the start.
    exact = n * (w + 1) - w * (w + 1) // 2
    assert flops.allowed_pairs(window, n, n) == exact
    assert flops.allowed_pairs(window & M.CausalMask(), n, n) == exact  # generic tile path
    causal = flops.allowed_pairs(M.CausalMask(), n, n)
    assert causal == n * (n + 1) // 2


def test_flop_model_modes():
    kw = dict(batch=2, heads=3, q_len=64, kv_len=32, head_dim=16)
    fwd = flops.attention_flops(**kw)
    assert fwd == 4 * 2 * 3 * 64 * 32 * 16
    assert flops.attention_flops(**kw, mode="backward") == 2.5 * fwd
    assert flops.attention_flops(**kw, mode="forward_and_vjp") == 3.5 * fwd
    assert flops.attention_flops(**kw, mask=M.CausalMask()) == pytest.approx(fwd * (32 * 33 / 2 + 32 * 32) / (64 * 32))  # rows 32.. see all 32 keys
    with pytest.raises(ValueError, match="mode"):
        flops.attention_flops(**kw, mode="sideways")


def test_anchor_cases_follow_anchors_md():
    names = [c.name for c in cases.ANCHOR_CASES]
    assert len(names) == len(set(names)) == 15
    for c in cases.ANCHOR_CASES:
        if c.pattern in ("full", "causal"):
            assert c.batch * c.seq_len == 16384 and c.heads * c.head_dim == 2048
    bigbird = next(c for c in cases.ANCHOR_CASES if c.pattern == "bigbird")
    assert 0.083 < bigbird.fraction() < 0.085  # "8.4% of pairs"
    window = next(c for c in cases.ANCHOR_CASES if c.pattern == "window" and c.window == 256)
    assert window.jax_nn_mask_args() == ({"is_causal": True, "local_window_size": (256, 0)}, None)
    assert cases.select_cases("window") == tuple(c for c in cases.ANCHOR_CASES if c.pattern == "window")
    with pytest.raises(ValueError, match="no case matches"):
        cases.select_cases("S999")


def test_jax_nn_dense_mask_matches_our_mask():
    c = cases.BenchCase("tiny bigbird", 1, 1, 512, 32, "bigbird")
    kwargs, dense = c.jax_nn_mask_args()
    assert kwargs == {} and dense.shape == (1, 1, 512, 512)
    np.testing.assert_array_equal(dense[0, 0], c.mask().to_dense(512, 512))


def test_time_call_rotates_inputs_and_reports_the_median():
    seen = []
    ticks = iter(float(x) for x in range(1000))

    def fn(x):
        seen.append(x)
        return jnp.zeros(())

    sets = [(0,), (1,), (2,)]
    t = timing.time_call(fn, sets, warmup=2, repeats=5, clock=lambda: next(ticks))
    assert seen == [0, 1, 2, 0, 1, 2, 0]  # 2 warm-up calls, then 5 timed, rotating
    assert t.repeats == 5 and t.warmup == 2 and t.input_sets == 3
    assert t.median_s == 1.0  # each timed call spans one fake tick


def test_time_call_budget_stops_early_but_not_below_min_repeats():
    ticks = iter(float(x) for x in range(0, 10000, 10))  # every call "takes" 10 s
    t = timing.time_call(lambda: jnp.zeros(()), [()], warmup=0, repeats=20, min_repeats=3,
                         budget_s=1.0, clock=lambda: next(ticks))
    assert t.repeats == 3


def test_rotation_sets():
    assert timing.rotation_sets(200 * 2**20) == 1  # already bigger than the L2
    assert timing.rotation_sets(10 * 2**20) == 10  # 2 × 50 MiB / 10 MiB
    assert timing.rotation_sets(1) == 32  # capped
    assert timing.rotation_sets(10 * 2**20, cache_bytes=0) == 1  # CPU: no rotation


def test_tokamax_bench_cases_and_arguments():
    """benchmarks/tokamax_bench.py: issue 11's eight rows, the long case timed with fewer calls."""
    from benchmarks import tokamax_bench as tb
    names = [c.name for c in tb.CASES]
    assert len(names) == len(set(names)) == 8
    assert len(cases.HOPPER_GOAL_CASES) == 6 and set(cases.HOPPER_GOAL_CASES) <= set(tb.CASES)
    long = next(c for c in tb.CASES if c.seq_len == 524288)
    assert (long.batch, long.heads, long.head_dim, long.pattern) == (1, 8, 128, "causal")
    assert next(c for c in tb.CASES if c.pattern == "bigbird").seq_len == 16384
    args = tb.parse_args([])
    assert args.engines == ["jaxattn", "default", "tokamax", "cudnn"]
    assert tb.timing_plan(long, args.repeats, args.long_repeats) == (1, 3)
    assert tb.timing_plan(tb.CASES[0], args.repeats, args.long_repeats) == (2, 20)
    args = tb.parse_args(["--cases", "bigbird", "S524288", "--long-repeats", "2", "--engines", "default"])
    assert [c.name for c in tb.selected_cases(args.cases)] == names[-2:] and args.long_repeats == 2
    with pytest.raises(SystemExit):
        tb.parse_args(["--engines", "xla"])


def test_tokamax_bench_mask_arguments_and_default_engine(tmp_path, monkeypatch):
    """The dense mask reaches jax.nn's engines as a jit argument; the default engine runs
    end to end (on CPU: the reference, which is what dispatch lists there)."""
    import json
    from benchmarks import tokamax_bench as tb
    bigbird = cases.BenchCase("tiny bigbird", 1, 2, 512, 32, "bigbird")
    _, mask_args = tb.attention("cudnn", bigbird)
    assert len(mask_args) == 1 and mask_args[0].shape == (1, 1, 512, 512) and mask_args[0].dtype == bool
    assert tb.attention("jaxattn", bigbird)[1] == ()
    window = cases.SMOKE_CASES[2]
    assert tb.attention("cudnn", window)[1] == ()
    assert tb.kernels_of(["__cudnn$fmhaSoftmax", "mosaic_gpu_v2"]) == ["pallas_mosaic_gpu", "cudnn"]

    def no_tokamax():
        raise ImportError("not installed")
    monkeypatch.setattr(tb, "import_tokamax", no_tokamax)
    monkeypatch.setattr(tb, "CASES", (window,))
    out = tmp_path / "bench.json"
    assert tb.main(["--engines", "default", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["tokamax"].startswith("import failed")
    (row,) = result["rows"]
    assert row["case"] == window.name and row["default_runs"] == ["reference"]
    assert (row["warmup"], row["repeats"]) == (2, 1)
    assert row["default"]["fwd_tflops"] > 0 and row["default"]["fwd_bwd_tflops"] > 0
    assert set(row["default"]["custom_calls"]) == {"forward", "forward_backward"}


def test_back_to_back_issues_every_call_before_one_wait(monkeypatch):
    seen, waited = [], []
    ticks = iter([0.0, 3.0, 10.0])  # start, all issued, all finished

    def fn(x):
        seen.append(x)
        return jnp.full((), x)

    def wait(outs):  # records what each wait covers: the warm-up's output, then all of them
        waited.append([int(o) for o in (outs if isinstance(outs, list) else [outs])])
        return outs

    monkeypatch.setattr(timing.jax, "block_until_ready", wait)
    t = timing.time_back_to_back(fn, [(0,), (1,), (2,)], repeats=5, warmup=1, clock=lambda: next(ticks))
    assert seen == [0, 1, 2, 0, 1, 2]  # the warm-up call, then 5 rotating on from it
    assert waited == [[0], [1, 2, 0, 1, 2]]  # one wait for the warm-up, one for all 5 calls
    assert t.per_call_s == 2.0 and t.issue_s == 0.6  # 10 s / 5 calls; 3 s of issuing / 5
    assert (t.calls, t.warmup, t.input_sets) == (5, 1, 3)
    assert t.as_dict()["per_call_s"] == 2.0


def test_back_to_back_without_warmup_times_real_calls():
    t = timing.time_back_to_back(lambda x: x + 1, [(jnp.ones(4),)], repeats=3, warmup=0)
    assert t.calls == 3 and t.warmup == 0 and t.per_call_s >= t.issue_s > 0


@pytest.mark.parametrize("kwargs", [dict(repeats=0), dict(warmup=-1)])
def test_back_to_back_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError, match="need repeats >= 1 and warmup >= 0"):
        timing.time_back_to_back(lambda: None, [()], **kwargs)
    with pytest.raises(ValueError, match="at least one tuple"):
        timing.time_back_to_back(lambda: None, [])


def test_crossover_bench_cases_keep_the_tokens_and_width():
    """benchmarks/crossover_bench.py: every length carries 16k tokens and 2048 columns of
    heads, and a length that does not divide the tokens is refused."""
    from benchmarks import crossover_bench as cb
    rows = cb.cases([1024, 16384], [64, 128], ["full", "causal"])
    assert [(c.batch * c.seq_len, c.heads * c.head_dim) for c in rows] == [(16384, 2048)] * 8
    assert {c.pattern for c in rows} == {"full", "causal"}
    assert cb.attention("jaxattn", rows[0]) is not None
    with pytest.raises(SystemExit):
        cb.main(["--out", "unused.json", "--lengths", "3000"])


def test_decode_measurements_in_interleaved_rounds():
    """jaxattn.benchmarking.decode.measure_interleaved: every entry built, then timed once
    per round; a row holds each round's GB/s and their median, one entry per plan item
    in its order (None where jax.nn cannot take a paged cache), also for each round's
    callback."""
    from jaxattn.benchmarking import decode as D
    plan = [(D.DecodeCase(2, 1, 64, 1, "contiguous", head_dim=16), "xla", None),
            (D.DecodeCase(2, 1, 64, 1, "paged16", head_dim=16), "xla", None),
            (D.DecodeCase(2, 2, 64, 1, "contiguous", head_dim=16), "xla", None)]
    seen = []
    rows = D.measure_interleaved(plan, rounds=3, repeats=1, max_inner=2, back_to_back=2,
                                 on_round=lambda rows: seen.append([r and r["rounds"] for r in rows]))
    assert rows[1] is None and [rows[0]["case"], rows[2]["case"]] == [plan[0][0].name, plan[2][0].name]
    assert seen == [[1, None, 1], [2, None, 2], [3, None, 3]]
    for row in (rows[0], rows[2]):
        assert row["rounds"] == 3 and len(row["round_gbps"]) == 3 and len(row["round_steady_gbps"]) == 3
        assert min(row["round_gbps"]) <= row["gbps"] <= max(row["round_gbps"])
        assert min(row["round_steady_gbps"]) <= row["steady_gbps"] <= max(row["round_steady_gbps"])
        assert row["steady_ms"] == pytest.approx(row["bytes"] / row["steady_gbps"] / 1e6)
        assert 0 < row["steady_issue_ms"] <= row["steady_ms"]   # issued before the one wait


def test_decode_steady_figures_are_per_step(monkeypatch):
    """steady_ms and steady_issue_ms are a back-to-back call's time and the host's issue
    time divided by the steps chained in the executable, on the one-row path and in
    interleaved rounds (back-to-back timing stubbed with known seconds)."""
    from jaxattn.benchmarking import decode as D
    fake = timing.BackToBack(per_call_s=0.012, issue_s=0.004, calls=3, warmup=0, input_sets=1)
    monkeypatch.setattr(D, "time_back_to_back", lambda *a, **kw: fake)        # measure()
    monkeypatch.setattr(timing, "time_back_to_back", lambda *a, **kw: fake)   # time_rounds()
    case = D.DecodeCase(2, 1, 64, 1, "contiguous", head_dim=16)
    one = D.measure(case, "xla", warmup=0, repeats=1, max_inner=3, back_to_back=3)
    [rounds] = D.measure_interleaved([(case, "xla", None)], rounds=2, repeats=1, max_inner=3,
                                     back_to_back=3)
    for row in (one, rounds):
        assert row["inner"] == 3
        assert row["steady_ms"] == pytest.approx(12.0 / 3) and row["steady_issue_ms"] == pytest.approx(4.0 / 3)
        assert row["steady_gbps"] == pytest.approx(row["bytes"] / 0.004 / 1e9)


def test_rounds_time_waited_then_back_to_back_calls():
    """timing.time_rounds: per round and call, `repeats` waited-for calls, then
    `back_to_back` issued without waiting (outputs all alive until one wait); each call's
    times list one entry per round of each kind."""
    order = []
    calls = [(lambda i=i: order.append(i) or i, ()) for i in range(2)]
    seen = []
    times = timing.time_rounds(calls, rounds=2, repeats=2, warmup=0, back_to_back=3,
                               on_round=lambda r, t: seen.append((r, [len(x.back_to_back_s) for x in t])))
    assert order == ([0] * 5 + [1] * 5) * 2
    assert [(len(t.waited_s), len(t.back_to_back_s), len(t.back_to_back_issue_s)) for t in times] == [(2, 2, 2)] * 2
    assert seen == [(0, [1, 1]), (1, [2, 2])]
    assert timing.time_rounds(calls, rounds=1, repeats=1, warmup=0)[0].back_to_back_s == []
    with pytest.raises(ValueError, match="back_to_back"):
        timing.time_rounds(calls, rounds=1, back_to_back=-1)


def test_interleaved_rounds_time_every_call_once_per_round():
    """timing.time_interleaved: round r times call 0, then call 1, ...; warm-up calls only
    in the first round."""
    order = []
    calls = [(lambda i=i: order.append(i), ()) for i in range(3)]
    medians = timing.time_interleaved(calls, rounds=2, repeats=2, warmup=1)
    assert order == [0, 0, 0, 1, 1, 1, 2, 2, 2] + [0, 0, 1, 1, 2, 2]
    assert [len(m) for m in medians] == [2, 2, 2]
    with pytest.raises(ValueError, match="rounds"):
        timing.time_interleaved(calls, rounds=0)
