"""The Pallas-Triton kernels alone (no reference, no random-number kernels) for
compute-sanitizer, one mask kind per argument:

    compute-sanitizer --tool memcheck python3 benchmarks/sanitizer_kernels_only.py fwd causal window bigbird docs dense
    compute-sanitizer --tool memcheck python3 benchmarks/sanitizer_kernels_only.py grad causal window bigbird docs dense

(benchmarks/sanitize_kernels.py also checks values against the reference, but the
sanitizer 2025.3.1 segfaults on that process on the H100 image; see BENCHMARKS.md.)
"""
import sys, jax, jax.numpy as jnp, numpy as np
import jaxattn
from jaxattn import masks as M
mode = sys.argv[1]
masks = {"causal": M.CausalMask(), "window": M.CausalMask() & M.LocalMask(128, 0),
         "bigbird": M.bigbird_mask(512, window=64, num_global=32, num_random_blocks=1, block_size=128, causal=True),
         "docs": M.causal_document_mask(jnp.asarray(np.repeat(np.arange(4), [100, 200, 12, 200])[None])),
         "dense": M.DenseMask(np.random.default_rng(0).random((512, 512)) < 0.3)}
q = jnp.asarray(np.random.default_rng(1).standard_normal((1, 512, 4, 64)), jnp.bfloat16)
k = jnp.asarray(np.random.default_rng(2).standard_normal((1, 512, 2, 64)), jnp.bfloat16)
for name in sys.argv[2:]:
    mask = masks[name]
    if mode == "fwd":
        o = jax.jit(lambda q, k: jaxattn.dot_product_attention(q, k, k, mask=mask, implementation="pallas_triton"))(q, k)
        print(name, "fwd", float(jnp.abs(o.astype(jnp.float32)).sum()), flush=True)
    else:
        g = jax.jit(jax.grad(lambda q, k: jnp.sum(jaxattn.dot_product_attention(q, k, k, mask=mask, implementation="pallas_triton").astype(jnp.float32) ** 2), argnums=(0, 1)))(q, k)
        print(name, "grad", [float(jnp.abs(x.astype(jnp.float32)).sum()) for x in g], flush=True)
