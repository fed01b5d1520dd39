"""The kernels alone (no reference, no random-number kernels) for compute-sanitizer, one
mask kind per argument, for one implementation:

    compute-sanitizer --tool memcheck python3 benchmarks/sanitizer_kernels_only.py fwd pallas_triton causal window bigbird docs dense
    compute-sanitizer --tool racecheck python3 benchmarks/sanitizer_kernels_only.py grad pallas_mosaic_gpu causal window bigbird

(benchmarks/sanitize_kernels.py also checks values against the reference, but the
sanitizer 2025.3.1 segfaults on that process on the H100 image; see BENCHMARKS.md.)
The Mosaic GPU forward takes every one of these (docs through segment ids, dense through
int8 mask tiles); its backward takes causal, window, bigbird and docs, and gives dense
and bias calls to the Triton kernels. "bias" is causal with a [1, N, T, S] bf16 bias,
"keybias" causal with a per-key [1, N, 1, S] one (the forward's vector path).

SANITIZE_HEADS=N (default 4, with 2 K/V heads) sets the query heads: the Mosaic forward's
persistent schedule runs one CTA per SM, so only more work items than SMs (4 q-blocks × N
heads > 132 on an H200, e.g. N = 68) make a CTA loop over several items.
SANITIZE_KV_HEADS=M (default 2) sets the K/V heads: the persistent dK/dV kernel's items are
4 kv-blocks × M heads, so M = 68 makes its CTAs loop too.
SANITIZE_HEAD_DIM=H (default 64) sets the head dim: 256 runs the Mosaic backward's
column-split dK/dV kernel and one-warpgroup dQ kernel (one resident buffer each; 8
kv-blocks of 64 keys per head, so M = 68 loops there too). At 256 the Mosaic kernels
refuse docs (traced segment ids: no finite-input check there; the Triton kernels serve
it), so name causal, window and bigbird.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import masks as M

mode, impl = sys.argv[1], sys.argv[2]
masks = {"causal": M.CausalMask(), "window": M.CausalMask() & M.LocalMask(128, 0),
         "bigbird": M.bigbird_mask(512, window=128, num_global=128, num_random_blocks=1, block_size=128,
                                   causal=True),
         "docs": M.causal_document_mask(jnp.asarray(np.repeat(np.arange(4), [100, 200, 12, 200])[None])),
         "dense": M.DenseMask(np.random.default_rng(0).random((512, 512)) < 0.3)}
heads = int(os.environ.get("SANITIZE_HEADS", "4"))
kv_heads = int(os.environ.get("SANITIZE_KV_HEADS", "2"))
head_dim = int(os.environ.get("SANITIZE_HEAD_DIM", "64"))
q = jnp.asarray(np.random.default_rng(1).standard_normal((1, 512, heads, head_dim)), jnp.bfloat16)
k = jnp.asarray(np.random.default_rng(2).standard_normal((1, 512, kv_heads, head_dim)), jnp.bfloat16)


biases = {"bias": jnp.asarray(np.random.default_rng(3).standard_normal((1, heads, 512, 512)), jnp.bfloat16),
          "keybias": jnp.asarray(np.random.default_rng(4).standard_normal((1, heads, 1, 512)), jnp.bfloat16)}
masks.update({name: M.CausalMask() for name in biases})


def attend(q, k, mask, bias=None):
    return jaxattn.dot_product_attention(q, k, k, bias, mask=mask, implementation=impl)


for name in sys.argv[3:]:
    mask, bias = masks[name], biases.get(name)
    if mode == "fwd":
        o = jax.jit(lambda q, k: attend(q, k, mask, bias))(q, k)
        print(name, impl, "fwd", float(jnp.abs(o.astype(jnp.float32)).sum()), flush=True)
    else:
        loss = lambda q, k: jnp.sum(attend(q, k, mask, bias).astype(jnp.float32) ** 2)  # noqa: E731
        g = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, k)
        print(name, impl, "grad", [float(jnp.abs(x.astype(jnp.float32)).sum()) for x in g], flush=True)
