"""The `jaxattn` command: `jaxattn compare` and `jaxattn bench`.

    jaxattn compare                 # full vs local vs sparse vs flash, swept over n
    jaxattn compare --quick         # a smaller sweep
    jaxattn bench                   # TFLOP/s on the GPU, ANCHORS.md cases, beside jax.nn

Also `python -m jaxattn ...`. jax is imported only after the arguments are parsed, so
`--help` and usage errors answer at once. The engines live in benchmarks/ (compare,
bench, flops, timing, cases, report, plots); this file is options and orchestration.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
METHOD_NAMES = ("full", "local", "longformer", "bigbird", "strided", "flash")


@dataclasses.dataclass(frozen=True)
class PlatformDefaults:
    seq_lens: tuple[int, ...]
    quick_seq_lens: tuple[int, ...]
    batch: int
    heads: int
    dtype: str
    window: int
    num_global: int
    block_size: int
    random_blocks: int
    warmup: int
    min_repeats: int
    time_budget: float | None
    interpret_max_len: int | None


CPU_DEFAULTS = PlatformDefaults(
    seq_lens=(256, 512, 1024, 2048), quick_seq_lens=(128, 256, 512), batch=1, heads=4, dtype="float32",
    window=64, num_global=16, block_size=64, random_blocks=2, warmup=1, min_repeats=3, time_budget=1.0,
    interpret_max_len=2048)
GPU_DEFAULTS = PlatformDefaults(
    seq_lens=(1024, 2048, 4096, 8192, 16384, 32768), quick_seq_lens=(1024, 2048, 4096), batch=1, heads=16,
    dtype="bfloat16", window=256, num_global=64, block_size=128, random_blocks=3, warmup=2, min_repeats=20,
    time_budget=None, interpret_max_len=None)


def _fmt(t):
    return ",".join(map(str, t))


def _both(field: str) -> str:
    return f"{getattr(CPU_DEFAULTS, field)} on CPU, {getattr(GPU_DEFAULTS, field)} on GPU"


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" unless the help already says the default or there is none."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxattn", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cost and accuracy of attention variants (compare) and kernel TFLOP/s (bench).",
        epilog="Run `jaxattn compare --help` or `jaxattn bench --help` for the options of each command.")
    sub = parser.add_subparsers(dest="command", metavar="{compare,bench}")

    c = sub.add_parser(
        "compare", formatter_class=_Formatter,
        help="time, memory, FLOPs and error of full, local, sparse and flash attention vs length",
        description=(
            "Sweep the sequence length n and measure, for each attention method: time per call\n"
            "(median after warm-up), peak memory, the FLOPs its mask needs, and the error of its\n"
            "output against the float32 jnp reference with the same mask, and against full attention.\n"
            "Prints a table and writes compare.json, compare.txt and PNG plots to --out.\n\n"
            "Methods:\n"
            "  full        full attention, dense O(n²) jnp reference (the definition)\n"
            "  local       sliding window: key j visible from query i when |i - j| <= w\n"
            "  longformer  window ±w | the first g tokens global\n"
            "  bigbird     window ±w | g global | r random key blocks per query block\n"
            "  strided     window ±w | every w-th key (Sparse Transformer pattern, non-causal)\n"
            "  flash       full attention through the FlashAttention kernel (pallas_triton)\n"
            "Append :IMPL to a method to pick its implementation, e.g. local:xla.\n\n"
            f"Platform defaults (CPU / GPU): lengths {_fmt(CPU_DEFAULTS.seq_lens)} / "
            f"{_fmt(GPU_DEFAULTS.seq_lens)}; heads {CPU_DEFAULTS.heads} / {GPU_DEFAULTS.heads};\n"
            f"dtype {CPU_DEFAULTS.dtype} / {GPU_DEFAULTS.dtype}; window {CPU_DEFAULTS.window} / "
            f"{GPU_DEFAULTS.window}. On CPU the Pallas kernels run in interpret mode\n"
            "(same kernel code, emulated): their memory and FLOPs are meaningful, their times are not\n"
            "GPU times."))
    c.add_argument("--seq-lens", metavar="N,N,...", default=None,
                   help="comma-separated sequence lengths to sweep (query and key length); "
                        f"default: {_fmt(CPU_DEFAULTS.seq_lens)} on CPU, {_fmt(GPU_DEFAULTS.seq_lens)} on GPU")
    c.add_argument("--methods", metavar="M[:IMPL],...", default=",".join(METHOD_NAMES),
                   help=f"comma-separated methods among {', '.join(METHOD_NAMES)}")
    c.add_argument("--implementation", metavar="NAME", default=None,
                   help="implementation for the local, sparse and flash methods (e.g. pallas_triton, xla, "
                        "reference); default: pallas_triton when registered (flash is reported missing "
                        "otherwise, local/sparse fall back to xla). Naming pallas_* on CPU also lifts the "
                        "interpret-mode length cap")
    c.add_argument("--head-dim", type=int, default=64, metavar="H", help="head dimension")
    c.add_argument("--heads", type=int, default=None, metavar="N", help=f"attention heads (default: {_both('heads')})")
    c.add_argument("--batch", type=int, default=None, metavar="B", help=f"batch size (default: {_both('batch')})")
    c.add_argument("--dtype", choices=DTYPES, default=None,
                   help="input dtype (default: float32 on CPU, bfloat16 on GPU)")
    c.add_argument("--window", type=int, default=None, metavar="W",
                   help=f"local window w of local/longformer/bigbird/strided (default: {_both('window')})")
    c.add_argument("--num-global", type=int, default=None, metavar="G",
                   help=f"global tokens of longformer and bigbird (default: {_both('num_global')})")
    c.add_argument("--block-size", type=int, default=None, metavar="BS",
                   help=f"bigbird random-block size (default: {_both('block_size')})")
    c.add_argument("--random-blocks", type=int, default=None, metavar="R",
                   help=f"bigbird random blocks per query block (default: {_both('random_blocks')})")
    c.add_argument("--repeats", type=int, default=20, metavar="K",
                   help="timed calls per measurement (median reported); on CPU fewer once --time-budget is "
                        "spent, never under 3")
    c.add_argument("--warmup", type=int, default=None, metavar="K",
                   help="untimed calls before timing (default: 1 on CPU, 2 on GPU)")
    c.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop timing a measurement after this many seconds of timed calls (default: 1.0 on "
                        "CPU, none on GPU; 0 = no budget)")
    c.add_argument("--quick", action="store_true",
                   help=f"smaller sweep: lengths {_fmt(CPU_DEFAULTS.quick_seq_lens)} on CPU, "
                        f"{_fmt(GPU_DEFAULTS.quick_seq_lens)} on GPU, at most 5 timed calls")
    c.add_argument("--seed", type=int, default=0, help="seed of the random inputs and bigbird blocks")
    c.add_argument("--out", type=Path, default=Path("jaxattn_out"), metavar="DIR",
                   help="output directory for compare.json, compare.txt and the PNG plots")
    c.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    b = sub.add_parser(
        "bench", formatter_class=_Formatter,
        help="TFLOP/s on the GPU for the ANCHORS.md cases, ours beside jax.nn xla and cudnn",
        description=(
            "Measure TFLOP/s of useful work (FLOPs of the pairs the mask allows; backward = 2.5×\n"
            "forward) for the named cases of ANCHORS.md: our Pallas implementations beside\n"
            "jax.nn.dot_product_attention with xla and cudnn, in the same process, forward and\n"
            "forward+backward. Median of >= 20 calls after 2 warm-up calls, inputs rotated past the\n"
            "L2. Writes bench.json (with device, date and versions), bench.txt and bench.png to --out.\n"
            "Needs a GPU; --allow-cpu runs a tiny smoke version on CPU (not a benchmark)."))
    b.add_argument("--cases", metavar="TEXT,...", default=None,
                   help="run only cases whose name contains one of these (case-insensitive), "
                        "e.g. 'S4096,window'; default: all ANCHORS.md cases")
    b.add_argument("--implementations", metavar="NAME,...", default=None,
                   help="implementations to measure: registered pallas_* names and 'jax.nn xla', "
                        "'jax.nn cudnn' (or xla, cudnn); default: every pallas_* plus both baselines")
    b.add_argument("--modes", default="forward,forward_and_vjp", metavar="MODE,...",
                   help="forward and/or forward_and_vjp")
    b.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="input dtype")
    b.add_argument("--repeats", type=int, default=20, metavar="K", help="timed calls per measurement (median)")
    b.add_argument("--warmup", type=int, default=2, metavar="K", help="untimed calls before timing")
    b.add_argument("--quick", action="store_true",
                   help="a few representative cases only (D128 S4096 full/causal, window 2048, bigbird)")
    b.add_argument("--allow-cpu", action="store_true",
                   help="without a GPU, run tiny smoke cases on CPU (checks the pipeline, not speed)")
    b.add_argument("--out", type=Path, default=Path("jaxattn_out"), metavar="DIR",
                   help="output directory for bench.json, bench.txt and bench.png")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG bar chart")
    return parser


def _int_list(parser, text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        parser.error(f"{flag}: expected comma-separated positive integers like 256,512,1024, got {text!r}")
    if not values or any(v < 1 for v in values):
        parser.error(f"{flag}: expected comma-separated positive integers like 256,512,1024, got {text!r}")
    return values


def _check_positive(parser, args, names):
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {v}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2, "\njaxattn: error: choose a command, e.g. `jaxattn compare`\n")
    if args.command == "compare":
        return _compare(parser, args)
    return _bench(parser, args)


# ------------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------------
def _parse_methods(parser, text: str, available) -> tuple[tuple[str, str | None], ...]:
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, _, impl = item.partition(":")
        if name not in METHOD_NAMES:
            parser.error(f"--methods: unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
        if impl and impl not in available:
            parser.error(f"--methods: implementation {impl!r} of {name} is not available; "
                         f"available: {', '.join(available)}")
        if any(m == name for m, _ in out):
            parser.error(f"--methods: {name} is listed twice")
        out.append((name, impl or None))
    if not out:
        parser.error("--methods: name at least one method")
    return tuple(out)


def _compare(parser, args) -> int:
    _check_positive(parser, args, ("head_dim", "heads", "batch", "window", "block_size", "repeats"))
    for name in ("num_global", "random_blocks", "warmup"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')}: expected a non-negative integer")
    if args.time_budget is not None and args.time_budget < 0:
        parser.error("--time-budget: expected seconds >= 0")
    seq_lens = _int_list(parser, args.seq_lens, "--seq-lens") if args.seq_lens is not None else None

    import jax
    import jaxattn
    from benchmarks.cases import PatternParams
    from benchmarks.compare import CompareConfig

    available = jaxattn.available_implementations()
    methods = _parse_methods(parser, args.methods, available)
    if args.implementation is not None and args.implementation not in available:
        parser.error(f"--implementation: {args.implementation!r} is not available here; "
                     f"available: {', '.join(available)}")
    on_gpu = jax.default_backend() == "gpu"
    d = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    pick = lambda v, default: default if v is None else v  # noqa: E731
    if seq_lens is None:
        seq_lens = d.quick_seq_lens if args.quick else d.seq_lens
    repeats = min(args.repeats, 5) if args.quick else args.repeats
    budget = pick(args.time_budget, d.time_budget) or None
    explicit_pallas = args.implementation is not None and args.implementation.startswith("pallas")
    config = CompareConfig(
        seq_lens=seq_lens, methods=methods, batch=pick(args.batch, d.batch), heads=pick(args.heads, d.heads),
        head_dim=args.head_dim, dtype=pick(args.dtype, d.dtype),
        params=PatternParams(window=pick(args.window, d.window), num_global=pick(args.num_global, d.num_global),
                             block_size=pick(args.block_size, d.block_size),
                             random_blocks=pick(args.random_blocks, d.random_blocks), seed=args.seed),
        implementation=args.implementation, warmup=pick(args.warmup, d.warmup), repeats=repeats,
        min_repeats=min(repeats, d.min_repeats), budget_s=budget,
        interpret_max_len=None if explicit_pallas else d.interpret_max_len, seed=args.seed)
    return run_compare_command(config, args.out, plots=not args.no_plots)


def _prepare_interpret_mode() -> None:
    """The first interpret-mode pallas_call of a process compiles twice unless this private
    module is imported first (shared/PLATFORM.md, "Gotchas"): saves a compile on CPU."""
    import jax
    if jax.default_backend() != "gpu":
        try:
            import jax._src.pallas.mosaic.interpret.interpret_pallas_call  # noqa: F401
        except Exception:  # noqa: BLE001  (private module; only a speed-up)
            pass


def run_compare_command(config, out_dir: Path, *, plots: bool = True) -> int:
    import jaxattn
    from tqdm.auto import tqdm

    _prepare_interpret_mode()
    from benchmarks import compare, plots as plotting, report
    from benchmarks.cases import COMPARE_METHODS

    meta = report.run_metadata()
    plans = compare.resolve_plan(config, jaxattn.available_implementations())
    cfg = dataclasses.asdict(config)
    notes = _compare_notes(config, meta)
    payload = {
        "kind": "jaxattn compare", "meta": meta, "config": cfg,
        "methods": {p.method: {"implementation": p.implementation, "family": COMPARE_METHODS[p.method].family,
                               "description": COMPARE_METHODS[p.method].description,
                               "flops_scaling": COMPARE_METHODS[p.method].scaling,
                               "unavailable_reason": p.reason or None} for p in plans},
        "notes": notes, "interrupted": False, "complete": False, "results": [],
    }
    json_path = out_dir / "compare.json"
    print(f"jaxattn compare on {meta['device']} ({meta['platform']}), jax {meta['jax_version']}: "
          f"B={config.batch} N={config.heads} H={config.head_dim} {config.dtype}, "
          f"n = {_fmt(config.seq_lens)}, window w={config.params.window}")
    interpret = meta["platform"] != "gpu"
    for p in plans:
        how = p.implementation or "unavailable: " + p.reason
        if interpret and (p.implementation or "").startswith("pallas"):
            how += " (Pallas interpret mode on CPU)"
        print(f"  {p.method:<11} {how}")
    sys.stdout.flush()

    def on_update(rows):
        payload["results"] = rows
        report.write_json(json_path, payload)

    def progress(total, desc):
        return tqdm(total=total, desc=f"{desc:<8}", unit="run", disable=None, file=sys.stderr,
                    dynamic_ncols=True)

    report.write_json(json_path, payload)
    total = len(config.seq_lens) * len(plans)
    rows, interrupted = compare.run_compare(config, on_update=on_update, progress=progress)
    payload["results"] = rows
    _finish_run(payload, json_path, interrupted, report.compare_table(rows), out_dir / "compare.txt", notes)
    written = [json_path, out_dir / "compare.txt"]
    if plots and rows:
        try:
            written += plotting.compare_plots(rows, meta, cfg, out_dir)
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        print(f"\ninterrupted (Ctrl-C): {len(rows)} of {total} measurements kept.", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    if interrupted:
        return 130
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def _finish_run(payload, json_path, interrupted, table, txt_path, notes=()):
    """The final JSON (complete or interrupted), then the table, with any notes under
    it, on stdout and in its .txt."""
    from benchmarks import report
    payload["interrupted"] = interrupted
    payload["complete"] = not interrupted
    report.write_json(json_path, payload)
    notes = "\n".join("note: " + n for n in notes)
    print()
    print(table)
    if notes:
        print()
        print(notes)
    txt_path.write_text(table + "\n" + ("\n" + notes + "\n" if notes else ""))


def _compare_notes(config, meta) -> list[str]:
    notes = [
        "time: median per call after warm-up; GFLOP: forward FLOPs the mask needs, 4·B·N·n²·H × allowed.",
        "err vs same-mask ref: max |output - jnp reference in float32 with the same mask| (the "
        "implementation's error); dev vs full attn: max |output - full attention| (by design not 0 "
        "for local and sparse patterns).",
    ]
    if meta["platform"] == "gpu":
        notes.append("memory: peak device memory of the call (memory_stats); '~' marks rows where the "
                     "peak could not be isolated and XLA's compiled estimate is shown instead.")
    else:
        notes.append(f"memory: '~' = XLA estimate (argument + output + temp bytes of the compiled call): "
                     f"the {meta['platform']} backend keeps no device memory statistics.")
        notes.append("On CPU the pallas_* kernels run in Pallas interpret mode (the same kernel code, "
                     "emulated): their memory and errors are representative, their times are not GPU times.")
    return notes


# ------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------
NO_GPU_MESSAGE = (
    "jaxattn bench measures attention kernels on a GPU, and jax sees no GPU here "
    "(backend: {backend}, devices: {devices}).\n"
    "  - On a CUDA machine install jax with its CUDA plugin (pip install 'jax[cuda13]==0.11.2').\n"
    "  - On this machine, `jaxattn compare` runs on CPU; `jaxattn bench --allow-cpu` runs a tiny "
    "smoke test (not a benchmark).\n")


def _bench(parser, args) -> int:
    _check_positive(parser, args, ("repeats",))
    if args.warmup < 0:
        parser.error("--warmup: expected a non-negative integer")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in ("forward", "forward_and_vjp") for m in modes):
        parser.error(f"--modes: expected forward and/or forward_and_vjp, got {args.modes!r}")

    import jax
    import jaxattn
    from benchmarks import bench, cases

    smoke = jax.default_backend() != "gpu"
    if smoke and not args.allow_cpu:
        sys.stderr.write(NO_GPU_MESSAGE.format(backend=jax.default_backend(),
                                               devices=", ".join(map(str, jax.devices()))))
        return 1
    try:
        chosen = cases.select_cases(args.cases, quick=args.quick, smoke=smoke)
    except ValueError as e:
        parser.error(f"--cases: {e}")
    if args.implementations is None:
        impls = bench.default_implementations()
    else:
        impls = []
        for name in (x.strip() for x in args.implementations.split(",") if x.strip()):
            name = {"xla": "jax.nn xla", "cudnn": "jax.nn cudnn"}.get(name, name)
            if name not in bench.BASELINES and name not in jaxattn.available_implementations():
                parser.error(f"--implementations: unknown {name!r}; choose from "
                             f"{', '.join(bench.default_implementations())}")
            impls.append(name)
        impls = tuple(impls)
    warmup, repeats = (min(args.warmup, 1), min(args.repeats, 3)) if smoke else (args.warmup, args.repeats)
    return run_bench_command(chosen, impls, modes, args.dtype, warmup, repeats, args.out,
                             plots=not args.no_plots, smoke=smoke)


def run_bench_command(chosen, impls, modes, dtype, warmup, repeats, out_dir: Path, *, plots=True,
                      smoke=False) -> int:
    from tqdm.auto import tqdm

    from benchmarks import bench, plots as plotting, report

    _prepare_interpret_mode()
    meta = report.run_metadata()
    payload = {"kind": "jaxattn bench", "meta": meta, "smoke_run_on_cpu": smoke,
               "config": {"cases": [dataclasses.asdict(c) for c in chosen], "implementations": list(impls),
                          "modes": list(modes), "dtype": dtype, "warmup": warmup, "repeats": repeats},
               "flop_model": "forward 4·B·N·T·S·H × allowed fraction; backward 2.5× forward",
               "interrupted": False, "complete": False, "results": []}
    json_path = out_dir / "bench.json"
    print(f"jaxattn bench on {meta['device']} ({meta['platform']}), jax {meta['jax_version']}, {dtype}"
          + ("  [CPU smoke run: not a benchmark]" if smoke else ""))
    sys.stdout.flush()

    def on_row(row):
        payload["results"].append(row)
        report.write_json(json_path, payload)

    report.write_json(json_path, payload)
    total = len(chosen) * len(impls) * len(modes)
    bar = tqdm(total=total, desc="bench", unit="run", disable=None, file=sys.stderr, dynamic_ncols=True)
    try:
        rows, interrupted = bench.run_bench(chosen, impls, modes, dtype=dtype, warmup=warmup, repeats=repeats,
                                            on_row=on_row, progress=bar)
    finally:
        bar.close()
    _finish_run(payload, json_path, interrupted, report.bench_table(rows), out_dir / "bench.txt")
    written = [json_path, out_dir / "bench.txt"]
    if plots and rows:
        written.append(plotting.bench_plot(rows, meta, out_dir / "bench.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    if interrupted:
        print(f"interrupted (Ctrl-C): {len(rows)} of {total} measurements kept.", file=sys.stderr)
        return 130
    ours_failed = any(r["status"] == "failed" and r["implementation"] not in bench.BASELINES for r in rows)
    return 1 if ours_failed else 0


if __name__ == "__main__":
    sys.exit(main())
