"""Accuracy from full attention, or efficiency from sparse attention? Answered with data.

A small decoder-only LM (jaxattn.layers.Decoder, nnx) is trained with optax under jit on a
synthetic long-range task, once per attention choice: multi-query associative recall
("fact lookup"), generated here, on the fly, from a jax key:

    f1 f2 ... fP   n n n n n ... (noise: a gap longer than any window) ...  q1 a1 q2 a2 ... qP aP
    └ P facts ┘                                                          └ each key asked once,
    one token per (key, value) pair                                        in a new order

A fact token stands for one (key, value) pair; a query is a key token and its answer the
value token, and only answers are scored. The facts sit further back than two stacked
local windows reach, so attending locally can only guess (accuracy ≈ 1/num_values); full
attention, or local attention with the P fact tokens made global (Longformer), can look
the answer up. "full_local" puts one full layer under local ones (the interleaving recipe).

Choices (per layer, all causal):
  full          every layer full
  local         every layer a sliding window of --window keys
  local_global  window | the P fact tokens are global (jaxattn.masks.GlobalMask)
  full_local    first layer full, the others local
  local_full    last layer full, the others local
  local_random  window | one random key block per query block (BigBird without global tokens)

For each choice it reports answer accuracy on held-out batches, the median train-step time,
the memory XLA plans for the compiled train step, and the attention work: the share of
(block × block) tiles the masks leave non-empty relative to full causal attention, which is
what a block-sparse kernel (implementation="pallas_triton") computes. The reference
implementation is dense: on CPU with it the time and memory do not shrink with the mask,
only the tile share does; the kernels turn the tile share into time on a GPU.

    python examples/long_range_lm.py                       # CPU defaults, a few minutes
    python examples/long_range_lm.py --implementation pallas_triton --seq-len 4096 \\
        --window 256 --batch 8 --steps 400 --out results.json   # on a GPU
    python examples/long_range_lm.py --generate 8             # then greedy decoding (KV cache)
    python examples/long_range_lm.py --sinks                  # every layer learns attention sinks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxattn
from jaxattn import masks
from jaxattn.cli import int_at_least
from jaxattn.layers import Decoder

ATTENTION_CHOICES = ("full", "local", "local_global", "full_local", "local_full", "local_random")


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------
def vocab_size(num_keys: int, num_values: int, num_noise: int) -> int:
    """Tokens: keys [0, K), values [K, K+V), noise [K+V, K+V+N), facts K+V+N + key·V + value."""
    return num_keys + num_values + num_noise + num_keys * num_values


def recall_batch(rng, batch: int, seq_len: int, *, num_pairs: int, num_keys: int,
                 num_values: int, num_noise: int):
    """One batch of the fact-lookup task (jittable; rng a jax key).

    Returns tokens int32 [B, T], targets int32 [B, T] (the next token) and weights
    float32 [B, T], 1 exactly at the query positions (whose next token is the answer)."""
    p = num_pairs
    if 3 * p > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for {p} facts: need seq_len >= 3 * num_pairs.")
    if not 1 <= p <= num_keys:
        raise ValueError(f"num_pairs={p}: expected 1 <= num_pairs <= num_keys={num_keys} (keys are distinct).")
    if num_noise < 1 or num_values < 1:
        raise ValueError(f"num_noise and num_values must be >= 1, got {num_noise}, {num_values}.")
    k_keys, k_vals, k_order, k_noise = jax.random.split(rng, 4)
    keys = jnp.argsort(jax.random.uniform(k_keys, (batch, num_keys)), axis=1)[:, :p]  # distinct
    vals = jax.random.randint(k_vals, (batch, p), 0, num_values)
    facts = num_keys + num_values + num_noise + keys * num_values + vals
    order = jnp.argsort(jax.random.uniform(k_order, (batch, p)), axis=1)
    asked = jnp.take_along_axis(keys, order, axis=1)
    answers = num_keys + jnp.take_along_axis(vals, order, axis=1)
    queries = jnp.stack([asked, answers], axis=-1).reshape(batch, 2 * p)
    noise = num_keys + num_values + jax.random.randint(k_noise, (batch, seq_len - 3 * p), 0, num_noise)
    tokens = jnp.concatenate([facts, noise, queries], axis=1).astype(jnp.int32)
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((batch, 1), jnp.int32)], axis=1)
    pos = jnp.arange(seq_len)
    is_query = (pos >= seq_len - 2 * p) & ((pos - (seq_len - 2 * p)) % 2 == 0)
    return tokens, targets, jnp.broadcast_to(is_query, (batch, seq_len)).astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# Attention choices: one static mask per layer (None = full causal attention)
# ---------------------------------------------------------------------------------------
def layer_masks(choice: str, num_layers: int, *, seq_len: int, window: int, num_pairs: int,
                block: int) -> list:
    local = masks.LocalMask(window, 0)
    if choice == "full":
        return [None] * num_layers
    if choice == "local":
        return [local] * num_layers
    if choice == "local_global":  # Longformer: the fact tokens are global
        return [local | masks.GlobalMask(num_pairs)] * num_layers
    if choice == "full_local":
        return [None] + [local] * (num_layers - 1)
    if choice == "local_full":
        return [local] * (num_layers - 1) + [None]
    if choice == "local_random":  # BigBird's window and random blocks, no global tokens
        bb = masks.bigbird_mask(seq_len, window=window, num_global=0, num_random_blocks=1,
                                block_size=block, causal=True, seed=0)
        return [bb] * num_layers
    raise ValueError(f"--attention: unknown choice {choice!r}; pick from {', '.join(ATTENTION_CHOICES)}.")


def tile_share(per_layer: list, seq_len: int, block: int) -> float:
    """Non-empty (block × block) tiles of the causal layer masks, relative to full causal."""
    def count(m):
        mask = masks.CausalMask() if m is None else m & masks.CausalMask()
        return int(np.count_nonzero(np.asarray(mask.tile_state(seq_len, seq_len, block, block)) > 0))
    full = count(None)
    return sum(count(m) for m in per_layer) / (full * len(per_layer))


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def loss_and_acc(model, tokens, targets, weights):
    logits = model(tokens)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    denom = jnp.maximum(weights.sum(), 1.0)
    acc = ((logits.argmax(-1) == targets) * weights).sum() / denom
    return (ce * weights).sum() / denom, acc


def make_steps(graphdef, task: dict, batch: int):
    """Jitted functional steps over the (model, optimizer) state, so one compilation
    serves both the memory report and the training loop."""

    def train_step(state, rng):
        model, opt = nnx.merge(graphdef, state)
        tokens, targets, weights = recall_batch(rng, batch, **task)
        (loss, acc), grads = nnx.value_and_grad(loss_and_acc, has_aux=True)(model, tokens, targets, weights)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss, acc

    def eval_step(state, rng):
        model, _ = nnx.merge(graphdef, state)
        return loss_and_acc(model, *recall_batch(rng, batch, **task))

    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def build(args, choice: str, seed: int):
    per_layer = layer_masks(choice, args.layers, seq_len=args.seq_len, window=args.window,
                            num_pairs=args.pairs, block=args.block)
    model = Decoder(vocab_size(args.keys, args.values, args.noise), args.d_model, args.heads,
                    num_kv_heads=args.kv_heads, layer_masks=per_layer, sinks=args.sinks,
                    implementation=args.implementation, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10 + 1),
                                                  max(args.steps, 2), args.lr * 0.1)
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                           optax.adamw(schedule, weight_decay=0.01)), wrt=nnx.Param)
    return model, opt, per_layer


def task_of(args) -> dict:
    return dict(seq_len=args.seq_len, num_pairs=args.pairs, num_keys=args.keys,
                num_values=args.values, num_noise=args.noise)


def planned_memory_mb(compiled) -> float | None:
    """Temporary + argument + output bytes XLA plans for one compiled train step."""
    try:
        a = compiled.memory_analysis()
        return (a.temp_size_in_bytes + a.argument_size_in_bytes + a.output_size_in_bytes) / 2**20
    except Exception:  # noqa: BLE001 -- not every backend reports it
        return None


def device_peak_mb() -> float | None:
    """Peak bytes the device allocator has seen in this process so far (GPU; None on CPU).
    Cumulative over the choices run before: compare choices by compiled_step_mb, or run
    one --attention choice per process to compare this."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def run_choice(args, choice: str, log=print) -> dict:
    model, opt, per_layer = build(args, choice, args.seed)
    graphdef, state = nnx.split((model, opt))
    train_step, eval_step = make_steps(graphdef, task_of(args), args.batch)
    rng = jax.random.key(args.seed + 1)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, rng).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    t_start = time.perf_counter()
    for step in range(args.steps):
        rng, sub = jax.random.split(rng)
        t0 = time.perf_counter()
        state, loss, acc = jax.block_until_ready(compiled(state, sub))
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            log(f"  [{choice}] step {step:5d}  loss {float(loss):.3f}  acc {float(acc):.3f}")
    train_s = time.perf_counter() - t_start
    eval_rng = jax.random.key(10_000 + args.seed)  # the same held-out batches for every choice
    accs = []
    for _ in range(args.eval_batches):
        eval_rng, sub = jax.random.split(eval_rng)
        accs.append(float(eval_step(state, sub)[1]))
    timed = times[2:] if len(times) > 4 else times  # skip warm-up
    generation = generation_report(nnx.merge(graphdef, state)[0], args) if args.generate else {}
    return {**generation, 
        "attention": choice,
        "sinks": bool(args.sinks),
        "accuracy": statistics.fmean(accs) if accs else None,
        "chance": 1.0 / args.values,
        "final_loss": statistics.fmean(losses[-20:]),
        "first_loss": losses[0],
        "step_ms": 1e3 * statistics.median(timed),
        "compile_s": compile_s,
        "train_s": train_s,
        "compiled_step_mb": planned_memory_mb(compiled),
        "device_peak_mb": device_peak_mb(),
        "attention_tiles_vs_full": tile_share(per_layer, args.seq_len, args.block),
        "layer_masks": [repr(m) if m is not None else "full" for m in per_layer],
    }


# ---------------------------------------------------------------------------------------
# Generation: greedy decoding with a KV cache
# ---------------------------------------------------------------------------------------
@nnx.jit
def _prefill(model, prompt, prompt_lengths):
    logits = model(prompt, decode=True, prefill_lengths=prompt_lengths)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    return last.argmax(-1).astype(jnp.int32)


@nnx.jit
def _next_token(model, token):
    return model(token[:, None], decode=True)[:, 0].argmax(-1).astype(jnp.int32)


def generate(model, prompt, num_tokens: int, *, prompt_lengths=None):
    """Greedy continuation int32 [B, num_tokens] of prompt int [B, T] (rows right-padded
    to T, their lengths in prompt_lengths, default T). The prompt is prefilled into every
    layer's KV cache through the FlashAttention kernels; then each new token attends over
    the cache through jaxattn.decode_attention, at its own position."""
    b, t = prompt.shape
    lengths = (jnp.full((b,), t, jnp.int32) if prompt_lengths is None
               else jnp.asarray(prompt_lengths, jnp.int32))
    model.init_cache(b, t + num_tokens)
    tokens = [_prefill(model, jnp.asarray(prompt, jnp.int32), lengths)]
    for _ in range(num_tokens - 1):
        tokens.append(_next_token(model, tokens[-1]))
    return jnp.stack(tokens, axis=1)


@nnx.jit
def _argmax_at(model, buffer, i):
    return jax.lax.dynamic_index_in_dim(model(buffer), i, axis=1, keepdims=False).argmax(-1).astype(jnp.int32)


def generate_by_recomputing(model, prompt, num_tokens: int):
    """The same greedy tokens without a cache: the whole sequence is recomputed at each
    step (in a fixed buffer of T + num_tokens tokens, so one compilation serves every
    step; causality keeps the unfilled tail out)."""
    b, t = prompt.shape
    buffer = jnp.zeros((b, t + num_tokens), jnp.int32).at[:, :t].set(jnp.asarray(prompt, jnp.int32))
    for i in range(num_tokens):
        buffer = buffer.at[:, t + i].set(_argmax_at(model, buffer, t + i - 1))
    return buffer[:, t:]


def generation_report(model, args) -> dict:
    """Greedy generation after training: the prompt is a held-out sequence up to its first
    query key, so the first generated token should be that key's answer."""
    tokens, _, _ = recall_batch(jax.random.key(20_000 + args.seed), args.batch, **task_of(args))
    prompt = tokens[:, : args.seq_len - 2 * args.pairs + 1]
    t0 = time.perf_counter()
    cached = jax.block_until_ready(generate(model, prompt, args.generate))
    generate_s = time.perf_counter() - t0
    recomputed = generate_by_recomputing(model, prompt, args.generate)
    answer = tokens[:, args.seq_len - 2 * args.pairs + 1]
    return {"generated_tokens": args.generate,
            "generate_s_with_compile": generate_s,
            "first_answer_accuracy": float(jnp.mean(cached[:, 0] == answer)),
            "cache_matches_recompute": bool(jnp.all(cached == recomputed)),
            "generated_row0": [int(x) for x in cached[0]]}


def _choices(text: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in ATTENTION_CHOICES]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated choices from {', '.join(ATTENTION_CHOICES)}, "
                                         f"got {text!r}")
    return chosen


# --quick: a short run that checks the whole pipeline on two choices, one that cannot
# reach the facts and one that can (accuracies are not converged).
QUICK = {"attention": "local,local_global", "steps": 30, "batch": 8, "eval_batches": 2, "log_every": 10}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter,
                                epilog="Attention choices (per layer, all causal):\n"
                                       + __doc__.split("Choices (per layer, all causal):\n")[1].split("\n\n")[0])
    positive, non_negative = int_at_least(1), int_at_least(0)
    p.add_argument("--attention", type=_choices, default="full,local,local_global,full_local",
                   help=f"comma-separated choices from {', '.join(ATTENTION_CHOICES)}, trained one after the other")
    p.add_argument("--implementation", default="reference",
                   help="jaxattn implementation (reference, xla, pallas_triton, ...; 'auto' = best available)")
    p.add_argument("--steps", type=positive, default=200, help="training steps per choice")
    p.add_argument("--seq-len", type=positive, default=128, help="tokens per sequence T")
    p.add_argument("--window", type=positive, default=16, help="local window (keys to the left)")
    p.add_argument("--pairs", type=positive, default=8, help="facts (key/value pairs) per sequence")
    p.add_argument("--keys", type=positive, default=16, help="distinct key tokens")
    p.add_argument("--values", type=positive, default=8, help="distinct value tokens (chance = 1 / values)")
    p.add_argument("--noise", type=positive, default=16, help="distinct noise tokens in the gap")
    p.add_argument("--layers", type=int_at_least(2), default=2,
                   help="decoder layers (at least 2: the mixed choices need a full and a local layer)")
    p.add_argument("--d-model", type=positive, default=64, help="model width")
    p.add_argument("--heads", type=positive, default=4, help="query heads")
    p.add_argument("--kv-heads", type=positive, default=2, help="key/value heads (GQA)")
    p.add_argument("--batch", type=positive, default=32, help="sequences per training step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--sinks", action="store_true",
                   help="learn one attention-sink logit per head in every layer (jaxattn.sinks)")
    p.add_argument("--block", type=non_negative, default=0,
                   help="tile size of the tile-share cost model (0: seq_len // 8, clipped to [16, 128])")
    p.add_argument("--eval-batches", type=non_negative, default=8, help="held-out batches for the accuracy")
    p.add_argument("--seed", type=int, default=0, help="seed of the parameters and the generated data")
    p.add_argument("--log-every", type=non_negative, default=100, help="print the loss every this many steps; 0 = quiet")
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--generate", type=non_negative, default=0, metavar="N",
                   help="after training, generate N tokens greedily with the KV cache (0 = off)")
    p.add_argument("--quick", action="store_true",
                   help="a short run that checks the pipeline, accuracies not converged: "
                        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                        + " unless given")
    return p


def parse_args(argv=None):
    p = build_parser()
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK)  # options given on the command line still win
    args = p.parse_args(argv)
    if args.block <= 0:
        args.block = int(min(128, max(16, args.seq_len // 8)))
    if args.implementation == "auto":
        args.implementation = None
    elif args.implementation not in jaxattn.available_implementations():
        p.error(f"--implementation {args.implementation!r} is not available here; "
                f"available: {', '.join(jaxattn.available_implementations())}")
    return args


def format_table(results: list[dict]) -> str:
    def mb(x):
        return "n/a" if x is None else f"{x:.1f}"

    def acc(x):
        return "n/a" if x is None else f"{x:.3f}"
    lines = ["| attention | answer accuracy | final loss | step time (ms) | compiled step memory (MiB) "
             "| attention tiles vs full |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['attention']} | {acc(r['accuracy'])} | {r['final_loss']:.3f} | {r['step_ms']:.1f} "
                     f"| {mb(r['compiled_step_mb'])} | {r['attention_tiles_vs_full']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    print(f"jaxattn {jaxattn.__version__} | jax {jax.__version__} | {device.platform} ({device.device_kind}) "
          f"| implementation={args.implementation or 'auto'} | T={args.seq_len} window={args.window} "
          f"pairs={args.pairs} steps={args.steps} | chance = {1 / args.values:.3f}")
    results = []
    for choice in args.attention:
        r = run_choice(args, choice)
        results.append(r)
        print(f"{choice}: accuracy {r['accuracy'] if r['accuracy'] is None else round(r['accuracy'], 3)}, step {r['step_ms']:.1f} ms, "
              f"tiles vs full {r['attention_tiles_vs_full']:.2f}")
        if args.generate:
            print(f"  generated {args.generate} tokens: first-answer accuracy {r['first_answer_accuracy']:.3f}, "
                  f"cache matches recompute: {r['cache_matches_recompute']}")
    print()
    print(format_table(results))
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "platform": device.platform,
                "device_kind": device.device_kind, "host": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "implementation": args.implementation,
                "args": {k: v for k, v in vars(args).items() if k != "out"}}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
