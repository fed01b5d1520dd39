"""Ring attention over many hosts: one process per host (or per GPU), one global mesh.

Every process runs this same script. `jax.distributed.initialize` joins them; the mesh puts
each ring (the "ctx" axis: the sequence split over devices) on the GPUs of ONE host, where
the ring's hops travel over NVLink, and lays the "data" axis (whole sequences, batch
parallel) across hosts, where only the gradient all-reduce of a training step would cross
the slower network. Each process builds only its own shards of the global [B, T, N, H]
arrays (`jax.make_array_from_process_local_data`) and one jitted step computes the ring
attention's output and gradients for the whole batch.

Launch (the same command on every host, or for every GPU, with its own process id):

    JAXATTN_COORDINATOR=10.0.0.1:1234 JAXATTN_NUM_PROCESSES=2 JAXATTN_PROCESS_ID=0 \\
        python examples/many_hosts.py --seq-len 131072 --batch 2
    python examples/many_hosts.py --auto          # under SLURM / Open MPI: JAX finds them

  JAXATTN_COORDINATOR     host:port of process 0, reachable by all (default 127.0.0.1:12355)
  JAXATTN_NUM_PROCESSES   processes in all (default 1)
  JAXATTN_PROCESS_ID      this process, 0 .. NUM_PROCESSES-1 (default 0)

Try it on one machine, without GPUs: `--local-demo` starts 2 processes of this script with
2 CPU devices each (gloo collectives) and checks the result against single-process
attention on the whole batch:

    python examples/many_hosts.py --local-demo
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxattn

LOCAL_DEMO_PROCESSES = 2
LOCAL_DEMO_DEVICES = 2          # CPU devices per demo process
LOCAL_DEMO_ARGS = ["--seq-len", "64", "--batch", "2", "--heads", "2", "--head-dim", "16",
                   "--ring-size", "2", "--check"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--local-demo", action="store_true",
                   help=f"start {LOCAL_DEMO_PROCESSES} CPU processes of this script on this machine "
                        f"({LOCAL_DEMO_DEVICES} devices each) and check their result")
    p.add_argument("--auto", action="store_true",
                   help="let jax.distributed find the cluster (SLURM, Open MPI, ...) instead of "
                        "reading the JAXATTN_* variables")
    p.add_argument("--seq-len", type=int, default=32768, help="tokens per sequence (T)")
    p.add_argument("--batch", type=int, default=0,
                   help="sequences per step (B); 0 = one per ring")
    p.add_argument("--heads", type=int, default=16, help="query heads (N)")
    p.add_argument("--kv-heads", type=int, default=0, help="key/value heads (K); 0 = --heads")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (H)")
    p.add_argument("--ring-size", type=int, default=0,
                   help="devices per ring (the ctx axis); 0 = every device of a host")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--implementation", default=None,
                   help="per-block attention; None picks the best available (pallas_triton on GPUs)")
    p.add_argument("--check", action="store_true",
                   help="compare with single-process attention on the whole batch (small sizes only)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------
# --local-demo: this script, twice, as the processes of a 2-"host" job on this machine.
# ---------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_demo(timeout_s=600):
    port = _free_port()
    procs = []
    try:
        for i in range(LOCAL_DEMO_PROCESSES):
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEMO_DEVICES}",
                       JAXATTN_COORDINATOR=f"127.0.0.1:{port}",
                       JAXATTN_NUM_PROCESSES=str(LOCAL_DEMO_PROCESSES), JAXATTN_PROCESS_ID=str(i))
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *LOCAL_DEMO_ARGS],
                                          env=env))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it in a collective
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    print(f"local demo: processes exited with {codes}")
    return 0 if codes == [0] * LOCAL_DEMO_PROCESSES else 1


# ---------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------
def start_distributed(auto):
    # CPU devices of different processes talk through gloo (GPUs use NCCL regardless).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=os.environ.get("JAXATTN_COORDINATOR", "127.0.0.1:12355"),
            num_processes=int(os.environ.get("JAXATTN_NUM_PROCESSES", "1")),
            process_id=int(os.environ.get("JAXATTN_PROCESS_ID", "0")))


def host_major_devices():
    """All devices as an array [hosts, devices per host], from every process's host
    name: right for one process per host and for one process per GPU alike."""
    digest = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).digest()
    names = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.int32))).reshape(-1)
    hosts = list(dict.fromkeys(names.tolist()))  # in process order
    by_host = [[d for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
                if hosts.index(names[d.process_index]) == h] for h in range(len(hosts))]
    if len({len(row) for row in by_host}) != 1:
        raise ValueError(f"every host needs the same number of devices, got {[len(r) for r in by_host]}.")
    return np.array(by_host)


def make_mesh(ring_size):
    """(data, ctx) mesh: each ctx row is ring_size devices of one host."""
    devices = host_major_devices()
    per_host = devices.shape[1]
    ring_size = ring_size or per_host
    if per_host % ring_size:
        raise ValueError(f"--ring-size: expected a divisor of the {per_host} devices per host, got "
                         f"{ring_size}. A ring must stay inside one host (NVLink, not the network).")
    return jax.sharding.Mesh(devices.reshape(-1, ring_size), ("data", "ctx")), devices.shape[0]


SYNTHETIC_CHUNK = 1024  # tokens drawn per random generator


def synthetic(shape, rows, positions, seed, dtype):
    """Values of a global [B, T, heads, dim] array at rows x positions (two ranges),
    the same whichever process asks: a stand-in for a data pipeline's slice. Each
    (row, chunk of SYNTHETIC_CHUNK tokens) has its own generator, so a process draws
    only the chunks it holds."""
    first, last = positions.start // SYNTHETIC_CHUNK, (positions.stop - 1) // SYNTHETIC_CHUNK
    out = []
    for r in rows:
        chunks = [np.random.default_rng([seed, r, c]).standard_normal((SYNTHETIC_CHUNK,) + tuple(shape[2:]),
                                                                      np.float32)
                  for c in range(first, last + 1)]
        lo = positions.start - first * SYNTHETIC_CHUNK
        out.append(np.concatenate(chunks)[lo:lo + len(positions)])
    return np.stack(out).astype(dtype)


def process_local(sharding, shape, seed, dtype):
    """This process's block of a global array (its addressable shards' bounding box),
    built from its own rows and positions only, placed on the mesh."""
    index = sharding.addressable_devices_indices_map(shape).values()
    span = lambda axis: range(min(i[axis].indices(shape[axis])[0] for i in index),  # noqa: E731
                              max(i[axis].indices(shape[axis])[1] for i in index))
    local = synthetic(shape, span(0), span(1), seed, dtype)
    return jax.make_array_from_process_local_data(sharding, local, shape)


def main(args):
    start_distributed(args.auto)
    mesh, hosts = make_mesh(args.ring_size)
    rings, ring_size = mesh.shape["data"], mesh.shape["ctx"]
    b = args.batch or rings
    n, kh, h, t = args.heads, args.kv_heads or args.heads, args.head_dim, args.seq_len
    if b % rings:
        raise ValueError(f"--batch: expected a multiple of the {rings} rings, got {b}.")
    me = jax.process_index()
    if me == 0:
        print(f"{jax.process_count()} processes on {hosts} host(s), {jax.device_count()} devices "
              f"({jax.devices()[0].device_kind}): {rings} ring(s) of {ring_size} devices; "
              f"B={b} T={t} N={n} K={kh} H={h}", flush=True)

    sharding = NamedSharding(mesh, P("data", "ctx"))      # batch across rings, sequence along one
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    shapes = {"q": (b, t, n, h), "k": (b, t, kh, h), "v": (b, t, kh, h), "do": (b, t, n, h)}
    q, k, v, do = (process_local(sharding, s, seed, dtype) for seed, s in enumerate(shapes.values()))

    def attention(q, k, v):
        return jaxattn.ring_attention(q, k, v, mesh=mesh, axis_name="ctx", batch_axis_name="data",
                                      is_causal=True, implementation=args.implementation)

    @jax.jit
    def step(q, k, v, do):  # the attention part of a training step: output and gradients
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(do)

    jax.block_until_ready(step(q, k, v, do))  # compile and warm up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out, grads = jax.block_until_ready(step(q, k, v, do))
        times.append(time.perf_counter() - t0)
    if me == 0 and times:
        # 4·H FLOPs per allowed (query, key) pair forward, 2.5× that backward.
        flops = 4 * h * b * n * t * (t + 1) / 2 * (1 + 2.5)
        ms = 1e3 * float(np.median(times))
        print(f"step (forward + gradients): {ms:.1f} ms median of {len(times)}, "
              f"{flops / (ms / 1e3) / jax.device_count() / 1e12:.3g} TFLOP/s per device", flush=True)

    if args.check:
        got = [np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float32) for x in (out, *grads)]
        local = jax.local_devices()[0]
        fq, fk, fv, fdo = (jax.device_put(synthetic(s, range(s[0]), range(t), seed, dtype), local)
                           for seed, s in enumerate(shapes.values()))
        ref = lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        ref_out, ref_vjp = jax.vjp(ref, fq, fk, fv)
        want = [np.asarray(x, np.float32) for x in (ref_out, *ref_vjp(fdo))]
        err = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
        print(f"process {me}: max |ring - single-process attention| over out, dq, dk, dv = {err:.1e} "
              f"({'ok' if err <= tol else 'MISMATCH'}, tolerance {tol:g})", flush=True)
        if err > tol:
            return 1
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(run_local_demo() if arguments.local_demo else main(arguments))
