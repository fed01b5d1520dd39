"""The `jaxattn` command: `jaxattn compare` and `jaxattn bench`.

    jaxattn compare                 # full vs local vs sparse vs flash, swept over n
    jaxattn compare --quick         # a smaller sweep
    jaxattn bench                   # TFLOP/s on the GPU, named cases, beside jax.nn

Also `python -m jaxattn ...`. This file is the options only: every value is checked by its
argparse `type=` as it is parsed, so a bad one prints the usage of the subcommand it belongs
to. jax, flax and the engines (jaxattn/benchmarking/) are imported only once the options are
parsed, so `--help` and usage errors answer at once (tests/test_cli.py times it).
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


# ------------------------------------------------------------------------------------
# Option types: each checks one value as it is parsed (argparse reports the error with
# the subcommand's usage).
# ------------------------------------------------------------------------------------
def int_at_least(minimum: int, expected: str | None = None):
    """An argparse type: an integer >= minimum, else an error naming `expected`
    (default "an integer >= minimum")."""
    expected = expected or f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = expected
    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0)


def non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def length_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 256,512,1024, got {text!r}")
    return values


def method_list(text: str) -> tuple[tuple[str, str | None], ...]:
    """`full,local:xla,...` -> ((method, implementation or None), ...). Whether an
    implementation is available is checked once jax is loaded."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, _, impl = item.partition(":")
        if name not in METHOD_NAMES:
            raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
        if any(m == name for m, _ in out):
            raise argparse.ArgumentTypeError(f"{name} is listed twice")
        out.append((name, impl or None))
    if not out:
        raise argparse.ArgumentTypeError("name at least one method")
    return tuple(out)


BENCH_MODES = ("forward", "forward_and_vjp")


def mode_list(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in BENCH_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"expected forward and/or forward_and_vjp, got {text!r}")
    return modes


def name_list(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


# ------------------------------------------------------------------------------------
# The parser
# ------------------------------------------------------------------------------------
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
            "(median after warm-up, each call waited for; and issued back to back with one wait at\n"
            "the end, which the time plot draws: the device's cost without the host's per-call\n"
            "dispatch), peak memory (MiB), the FLOPs its mask needs, and the error of its output\n"
            "against the float32 jnp reference with the same mask, and against full attention.\n"
            "Each case is compiled and measured before the next starts (Ctrl-C keeps what\n"
            "finished). Prints a table and writes compare.json, compare.txt and PNG plots to --out.\n\n"
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
    c.add_argument("--seq-lens", type=length_list, metavar="N,N,...", default=None,
                   help="comma-separated sequence lengths to sweep (query and key length); "
                        f"default: {_fmt(CPU_DEFAULTS.seq_lens)} on CPU, {_fmt(GPU_DEFAULTS.seq_lens)} on GPU")
    c.add_argument("--methods", type=method_list, metavar="M[:IMPL],...", default=",".join(METHOD_NAMES),
                   help=f"comma-separated methods among {', '.join(METHOD_NAMES)}")
    c.add_argument("--implementation", metavar="NAME", default=None,
                   help="implementation for the local, sparse and flash methods (e.g. pallas_triton, xla, "
                        "reference); default: pallas_triton when registered (flash is reported missing "
                        "otherwise, local/sparse fall back to xla). Naming pallas_* on CPU also lifts the "
                        "interpret-mode length cap")
    c.add_argument("--head-dim", type=positive_int, default=64, metavar="H", help="head dimension")
    c.add_argument("--heads", type=positive_int, default=None, metavar="N",
                   help=f"attention heads (default: {_both('heads')})")
    c.add_argument("--batch", type=positive_int, default=None, metavar="B",
                   help=f"batch size (default: {_both('batch')})")
    c.add_argument("--dtype", choices=DTYPES, default=None,
                   help="input dtype (default: float32 on CPU, bfloat16 on GPU)")
    c.add_argument("--window", type=positive_int, default=None, metavar="W",
                   help=f"local window w of local/longformer/bigbird/strided (default: {_both('window')})")
    c.add_argument("--num-global", type=non_negative_int, default=None, metavar="G",
                   help=f"global tokens of longformer and bigbird (default: {_both('num_global')})")
    c.add_argument("--block-size", type=positive_int, default=None, metavar="BS",
                   help=f"bigbird random-block size (default: {_both('block_size')})")
    c.add_argument("--random-blocks", type=non_negative_int, default=None, metavar="R",
                   help=f"bigbird random blocks per query block (default: {_both('random_blocks')})")
    c.add_argument("--repeats", type=positive_int, default=20, metavar="K",
                   help="timed calls per measurement (median reported), and calls issued back to back; "
                        "on CPU fewer once --time-budget is spent (never under 3 timed, 1 back to back)")
    c.add_argument("--warmup", type=non_negative_int, default=None, metavar="K",
                   help="untimed calls before timing (default: 1 on CPU, 2 on GPU)")
    c.add_argument("--time-budget", type=non_negative_seconds, default=None, metavar="SECONDS",
                   help="stop timing a measurement after this many seconds of timed calls, and issue only "
                        "as many calls back to back as a tenth of it holds (default: 1.0 on CPU, none on "
                        "GPU; 0 = no budget)")
    c.add_argument("--quick", action="store_true",
                   help=f"smaller sweep: lengths {_fmt(CPU_DEFAULTS.quick_seq_lens)} on CPU, "
                        f"{_fmt(GPU_DEFAULTS.quick_seq_lens)} on GPU, at most 5 timed calls")
    c.add_argument("--seed", type=int, default=0, help="seed of the random inputs and bigbird blocks")
    c.add_argument("--out", type=Path, default=Path("jaxattn_out"), metavar="DIR",
                   help="output directory for compare.json, compare.txt and the PNG plots")
    c.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    c.set_defaults(run=_compare, subparser=c)

    b = sub.add_parser(
        "bench", formatter_class=_Formatter,
        help="TFLOP/s on the GPU for the named cases, ours beside jax.nn xla and cudnn",
        description=(
            "Measure TFLOP/s of useful work (FLOPs of the pairs the mask allows; backward = 2.5×\n"
            "forward) for named cases (dense D64/D128 at 1k-16k tokens, causal windows at 32k, a\n"
            "BigBird-style block mask at 16k): our Pallas implementations beside\n"
            "jax.nn.dot_product_attention with xla and cudnn, in the same process, forward and\n"
            "forward+backward. Median of >= 20 calls after 2 warm-up calls, inputs rotated past the\n"
            "L2. Writes bench.json (with device, date and versions), bench.txt and bench.png to --out.\n"
            "Needs a GPU; --allow-cpu runs a tiny smoke version on CPU (not a benchmark)."))
    b.add_argument("--cases", metavar="TEXT,...", default=None,
                   help="run only cases whose name contains one of these (case-insensitive), "
                        "e.g. 'S4096,window'; default: all named cases")
    b.add_argument("--implementations", type=name_list, metavar="NAME,...", default=None,
                   help="implementations to measure: registered pallas_* names and 'jax.nn xla', "
                        "'jax.nn cudnn' (or xla, cudnn); default: every pallas_* plus both baselines")
    b.add_argument("--modes", type=mode_list, default=BENCH_MODES, metavar="MODE,...",
                   help="forward and/or forward_and_vjp (default: both)")
    b.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="input dtype")
    b.add_argument("--repeats", type=positive_int, default=20, metavar="K",
                   help="timed calls per measurement (median)")
    b.add_argument("--warmup", type=non_negative_int, default=2, metavar="K", help="untimed calls before timing")
    b.add_argument("--quick", action="store_true",
                   help="a few representative cases only (D128 S4096 full/causal, window 2048, bigbird)")
    b.add_argument("--decode", action="store_true",
                   help="decode cases instead: GB/s of attention from a KV cache (B x context, K8, "
                        "contiguous and paged) for pallas_triton beside jax.nn xla/cudnn; --quick "
                        "keeps the contiguous ones")
    b.add_argument("--allow-cpu", action="store_true",
                   help="without a GPU, run tiny smoke cases on CPU (checks the pipeline, not speed)")
    b.add_argument("--out", type=Path, default=Path("jaxattn_out"), metavar="DIR",
                   help="output directory for bench.json, bench.txt and bench.png")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG bar chart")
    b.set_defaults(run=_bench, subparser=b)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2, "\njaxattn: error: choose a command, e.g. `jaxattn compare`\n")
    if unknown:  # reported with the usage of the subcommand they were given to
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.run(args.subparser, args)


# ------------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------------
def _compare(parser: argparse.ArgumentParser, args) -> int:
    import jax

    import jaxattn
    from jaxattn.benchmarking.cases import PatternParams
    from jaxattn.benchmarking.commands import run_compare_command
    from jaxattn.benchmarking.compare import CompareConfig

    available = jaxattn.available_implementations()
    for name, impl in args.methods:
        if impl is not None and impl not in available:
            parser.error(f"argument --methods: implementation {impl!r} of {name} is not available here; "
                         f"available: {', '.join(available)}")
    if args.implementation is not None and args.implementation not in available:
        parser.error(f"argument --implementation: {args.implementation!r} is not available here; "
                     f"available: {', '.join(available)}")
    d = GPU_DEFAULTS if jax.default_backend() == "gpu" else CPU_DEFAULTS
    pick = lambda v, default: default if v is None else v  # noqa: E731
    seq_lens = args.seq_lens or (d.quick_seq_lens if args.quick else d.seq_lens)
    repeats = min(args.repeats, 5) if args.quick else args.repeats
    explicit_pallas = args.implementation is not None and args.implementation.startswith("pallas")
    config = CompareConfig(
        seq_lens=seq_lens, methods=args.methods, batch=pick(args.batch, d.batch),
        heads=pick(args.heads, d.heads), head_dim=args.head_dim, dtype=pick(args.dtype, d.dtype),
        params=PatternParams(window=pick(args.window, d.window), num_global=pick(args.num_global, d.num_global),
                             block_size=pick(args.block_size, d.block_size),
                             random_blocks=pick(args.random_blocks, d.random_blocks), seed=args.seed),
        implementation=args.implementation, warmup=pick(args.warmup, d.warmup), repeats=repeats,
        min_repeats=min(repeats, d.min_repeats), budget_s=pick(args.time_budget, d.time_budget) or None,
        interpret_max_len=None if explicit_pallas else d.interpret_max_len, seed=args.seed)
    return run_compare_command(config, args.out, plots=not args.no_plots)


# ------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------
NO_GPU_MESSAGE = (
    "jaxattn bench measures attention kernels on a GPU, and jax sees no GPU here "
    "(backend: {backend}, devices: {devices}).\n"
    "  - On a CUDA machine install jax with its CUDA plugin (pip install 'jax[cuda13]==0.11.2').\n"
    "  - On this machine, `jaxattn compare` runs on CPU; `jaxattn bench --allow-cpu` runs a tiny "
    "smoke test (not a benchmark).\n")


def _bench(parser: argparse.ArgumentParser, args) -> int:
    import jax

    import jaxattn
    from jaxattn.benchmarking import bench, cases
    from jaxattn.benchmarking.commands import run_bench_command

    smoke = jax.default_backend() != "gpu"
    if smoke and not args.allow_cpu:
        sys.stderr.write(NO_GPU_MESSAGE.format(backend=jax.default_backend(),
                                               devices=", ".join(map(str, jax.devices()))))
        return 1
    if args.decode:
        return _bench_decode(parser, args, smoke)
    try:
        chosen = cases.select_cases(args.cases, quick=args.quick, smoke=smoke)
    except ValueError as e:
        parser.error(f"argument --cases: {e}")
    if args.implementations is None:
        impls = bench.default_implementations()
    else:
        impls = tuple({"xla": "jax.nn xla", "cudnn": "jax.nn cudnn"}.get(n, n) for n in args.implementations)
        for name in impls:
            if name not in bench.BASELINES and name not in jaxattn.available_implementations():
                parser.error(f"argument --implementations: unknown {name!r}; choose from "
                             f"{', '.join(bench.default_implementations())}")
    warmup, repeats = (min(args.warmup, 1), min(args.repeats, 3)) if smoke else (args.warmup, args.repeats)
    return run_bench_command(chosen, impls, args.modes, args.dtype, warmup, repeats, args.out,
                             plots=not args.no_plots, smoke=smoke)


def _bench_decode(parser: argparse.ArgumentParser, args, smoke: bool) -> int:
    from jaxattn.benchmarking import decode
    from jaxattn.benchmarking.commands import run_decode_bench_command

    if args.cases is not None or args.modes != BENCH_MODES:
        parser.error("--decode runs its own cases in one mode: drop --cases and --modes")
    known = decode.IMPLEMENTATIONS
    impls = args.implementations or (("pallas_triton", "xla") if smoke else known)
    impls = tuple(n.removeprefix("jax.nn ") for n in impls)
    for name in impls:
        if name not in known:
            parser.error(f"argument --implementations: --decode measures {', '.join(known)}; got {name!r}")
    if smoke:
        chosen = decode.SMOKE_CASES
    else:
        chosen = decode.issue_cases()
        if args.quick:
            chosen = tuple(c for c in chosen if c.layout == "contiguous")
    warmup, repeats = (min(args.warmup, 1), min(args.repeats, 3)) if smoke else (args.warmup, args.repeats)
    return run_decode_bench_command(chosen, impls, args.dtype, warmup, repeats, args.out, smoke=smoke)


if __name__ == "__main__":
    sys.exit(main())
