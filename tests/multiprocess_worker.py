"""One of the processes of tests/test_multiprocess.py (run as a script, never collected).

    python tests/multiprocess_worker.py --port PORT --process-id I [--num-processes 2]

Each process owns 2 CPU devices; `jax.distributed` joins them into one global 4-device
mesh over gloo collectives. Every process builds the same global inputs (numpy, fixed
seed), places only its own shards on the mesh, runs

  - `ring_attention` over the 4 devices, values and gradients: causal and a causal
    window, from contiguous and from zigzag-ordered activations (reference blocks), and
    one causal case through the interpret-mode Pallas kernels;
  - `dot_product_attention` with the batch over one mesh axis and the heads over the
    other (inputs from `jax.make_array_from_process_local_data`);

gathers the results with `process_allgather` and compares them with the single-process
reference computed on its own first device. It prints one line per checked case and
exits non-zero on the first mismatch.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

LOCAL_DEVICES = 2
_START = time.perf_counter()
AXIS = "ctx"


def _inputs(b, t, n, kh, h, seed):
    """q, k, v, dO as float32 numpy arrays, identical in every process."""
    rng = np.random.default_rng(seed)
    shapes = ((b, t, n, h), (b, t, kh, h), (b, t, kh, h), (b, t, n, h))
    return tuple(rng.standard_normal(s, dtype=np.float32) for s in shapes)


def _global(x, sharding):
    """A global array whose shards each process fills from its copy of x."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _out_and_grads(attn):
    """fn(q, k, v, dO) -> (out, dq, dk, dv): attn's output and its vector-Jacobian
    product with dO (the gradients of sum(out * dO))."""
    def fn(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(do))
    return fn


def _compiled(fn, *args):
    """jit at XLA's lowest CPU optimisation level: small unrolled rings compile much
    faster and compute the same values (no fast-math)."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def _gather(x):
    """The whole of a global array, in every process."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _check(name, got, want, atol):
    """got: (out, dq, dk, dv) as whole numpy arrays; want: the same from the reference."""
    for part, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, np.asarray(w), atol=atol, rtol=1e-5, err_msg=f"{name}: {part}")
    print(f"process {jax.process_index()}: ok {name} (after {time.perf_counter() - _START:.1f} s, "
          f"{time.process_time():.1f} s of CPU)", flush=True)


def _reference(mask, inputs):
    """(out, dq, dk, dv) of the unsharded problem on this process's first device."""
    import jaxattn
    attn = lambda q, k, v: jaxattn.dot_product_attention(  # noqa: E731
        q, k, v, mask=mask, implementation="reference")
    local = jax.local_devices()[0]
    args = [jax.device_put(x, local) for x in inputs]
    return _compiled(_out_and_grads(attn), *args)(*args)


def _ring(mesh, mask, **kw):
    import jaxattn
    return lambda q, k, v: jaxattn.ring_attention(q, k, v, mask, mesh=mesh, axis_name=AXIS, **kw)


def check_ring(mesh):
    """The sequence over all 4 devices (two hops of the ring cross the processes).
    The ring's core is the same for both layouts (contiguous shards are permuted to
    zigzag order inside), so the windowed mask runs in one layout only."""
    from jaxattn import masks as M
    from jaxattn.parallel import inverse_zigzag_permutation, zigzag_permutation

    p = mesh.shape[AXIS]
    inputs = _inputs(b=1, t=32, n=2, kh=1, h=8, seed=0)
    perm, inverse = zigzag_permutation(32, p), inverse_zigzag_permutation(32, p)
    sequence = NamedSharding(mesh, P(None, AXIS))
    cases = [("causal", M.CausalMask(), "contiguous"), ("causal", M.CausalMask(), "zigzag"),
             ("causal_window", M.CausalMask() & M.LocalMask(5, 0), "contiguous")]
    for mask_name, mask, layout in cases:
        # zigzag: the activations already live in zigzag order on the mesh, and the
        # results come back in that order.
        order, back = (perm, inverse) if layout == "zigzag" else (slice(None), slice(None))
        args = [_global(x[:, order], sequence) for x in inputs]
        ring = _ring(mesh, mask, sequence_layout=layout, implementation="reference")
        got = [_gather(x)[:, back] for x in _compiled(_out_and_grads(ring), *args)(*args)]
        _check(f"ring {mask_name} {layout}", got, _reference(mask, inputs), atol=2e-5)


def check_ring_pallas_triton():
    """The path GPUs take: the Pallas kernels (interpret mode here) as the ring's blocks,
    with their own backward fed the global residuals. A (data=2, ctx=2) mesh whose ring
    axis crosses the processes and whose batch axis stays inside each: two ring steps,
    half the kernel compiles of a 4-device ring."""
    from jaxattn import masks as M

    devices = np.array(jax.devices()).reshape(jax.process_count(), LOCAL_DEVICES)
    mesh = jax.sharding.Mesh(devices.T, ("data", AXIS))  # rows: data; columns: processes
    assert all(len({d.process_index for d in row}) == jax.process_count() for row in mesh.devices)
    inputs = _inputs(b=2, t=32, n=2, kh=1, h=8, seed=2)
    args = [_global(x, NamedSharding(mesh, P("data", AXIS))) for x in inputs]
    ring = _ring(mesh, None, is_causal=True, batch_axis_name="data", implementation="pallas_triton")
    got = [_gather(x) for x in _compiled(_out_and_grads(ring), *args)(*args)]
    _check("ring causal pallas_triton (batch axis inside, ring across processes)", got,
           _reference(M.CausalMask(), inputs), atol=5e-5)


def check_batch_and_head_sharding():
    """dot_product_attention on a (data=2, heads=2) mesh: each process holds one batch
    row (its process-local data); XLA partitions the attention over both axes."""
    import jaxattn
    from jaxattn import masks as M

    mesh = jax.make_mesh((2, 2), ("data", "heads"))
    inputs = _inputs(b=2, t=24, n=4, kh=2, h=8, seed=1)
    sharding = NamedSharding(mesh, P("data", None, "heads"))
    # Which batch rows this process holds follows from where its devices sit in the mesh.
    rows = sorted({index[0].start or 0 for d, index in sharding.devices_indices_map(inputs[0].shape).items()
                   if d.process_index == jax.process_index()})
    local = lambda x: np.concatenate([x[r:r + 1] for r in rows])  # noqa: E731
    args = [jax.make_array_from_process_local_data(sharding, local(x), x.shape) for x in inputs]
    attn = lambda q, k, v: jaxattn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, local_window_size=(6, 0), implementation="reference")
    got = _compiled(_out_and_grads(attn), *args)(*args)
    assert got[0].sharding.is_equivalent_to(sharding, 4), got[0].sharding
    got = [_gather(x) for x in got]
    want = _reference(M.CausalMask() & M.LocalMask(6, 0), inputs)
    _check("batch/head-sharded dot_product_attention", got, want, atol=2e-5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=60)
    assert jax.process_count() == args.num_processes
    assert jax.device_count() == LOCAL_DEVICES * args.num_processes, jax.devices()
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
    check_ring(mesh)
    check_ring_pallas_triton()
    check_batch_and_head_sharding()
    print(f"process {jax.process_index()}: all checks passed in {time.perf_counter() - start:.1f} s",
          flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
