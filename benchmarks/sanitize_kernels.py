"""Run the Pallas-Triton kernels (forward + both backward kernels) once per mask kind at
modest sizes, for `compute-sanitizer --tool memcheck|racecheck`:

    compute-sanitizer --tool memcheck --kernel-name regex:jaxattn python3 benchmarks/sanitize_kernels.py

Exits non-zero if any output is not finite or disagrees with the float32 reference.
"""

import sys

import numpy as np
import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import masks as M


def main():
    ids = jnp.asarray(np.repeat(np.arange(4), [100, 200, 12, 200])[None])
    cases = {
        "causal_ragged": (M.CausalMask(), 500, 500, 96),
        "window": (M.CausalMask() & M.LocalMask(128, 0), 512, 512, 128),
        "bigbird": (M.bigbird_mask(512, window=64, num_global=32, num_random_blocks=1,
                                   block_size=128, causal=True), 512, 512, 64),
        "documents": (M.causal_document_mask(ids), 512, 512, 64),
        "dense": (M.DenseMask(np.random.default_rng(0).random((300, 333)) < 0.3), 300, 333, 40),
    }
    ok = True
    for name, (mask, t, s, h) in cases.items():
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (1, t, 4, h), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, s, 2, h), jnp.bfloat16)
        v = jax.random.normal(ks[2], (1, s, 2, h), jnp.bfloat16)

        def loss(q, k, v, impl):
            o = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
            return jnp.sum(o.astype(jnp.float32) ** 2)
        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, "pallas_triton")
        gr = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(
            *(x.astype(jnp.float32) for x in (q, k, v)), "reference")
        errs = [float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b)) for a, b in zip(g, gr)]
        finite = all(bool(jnp.isfinite(a).all()) for a in g)
        good = finite and max(errs) < 3e-2
        ok &= good
        print(f"{name}: grads rel err {['%.1e' % e for e in errs]} finite={finite} {'OK' if good else 'FAIL'}",
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
