"""Hardware named barriers (PTX ``bar.sync`` / ``bar.arrive``) inside Pallas Mosaic GPU kernels.

An SM keeps 16 hardware barriers per CTA, numbered 0 to 15. Unlike an mbarrier
(``plgpu.Barrier``), a named barrier lives in no shared memory and has no phase to
track: it counts arriving threads, and completes (and resets) when the count reaches
the ``num_threads`` the instruction names.

* ``bar.sync id, n`` arrives with the calling warp's threads, then blocks them until
  ``n`` threads have arrived at barrier ``id`` (counting itself).
* ``bar.arrive id, n`` arrives without waiting: the producer half of a hand-over.

Every instruction that takes part in one completion must name the same ``n``, a
multiple of 32 (a warp arrives with all its threads; ``bar.arrive`` needs an explicit
``n``). ``bar.sync`` is the ``.aligned`` form: every thread of a warp executes the same
instruction (a Mosaic GPU kernel body runs per warpgroup, 128 threads, in uniform
control flow). The barrier counts arrivals, not who arrived: a warp arriving twice
before the barrier completes counts twice towards the same completion, releasing the
waiters early, and a later ``bar.sync`` then waits for arrivals that never come.
Protocols built on these barriers must order their arrivals so that cannot happen.

Ids: barrier 0 is ``__syncthreads`` (``gpu.barrier`` in Mosaic GPU), and Mosaic GPU's
warpgroup-wide barrier uses id 1 + warpgroup index, so a kernel of ``w`` warpgroups
may use ids ``w + 1`` to 15 (``first_free_id``).

jax 0.11.2's Pallas Mosaic GPU API exposes only mbarriers, so the instructions are
emitted as inline PTX through ``plgpu.inline_mgpu`` and Mosaic GPU's ``inline_ptx``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

NUM_HARDWARE_BARRIERS = 16
WARP_SIZE = 32


def first_free_id(num_warpgroups: int) -> int:
    """The lowest barrier id Mosaic GPU leaves free in a kernel of `num_warpgroups`
    warpgroups (0 is __syncthreads, 1..num_warpgroups its per-warpgroup barriers)."""
    return num_warpgroups + 1


def _check(barrier_id, num_threads: int) -> None:
    if num_threads <= 0 or num_threads % WARP_SIZE:
        raise ValueError(f"a named barrier counts whole warps: num_threads must be a positive "
                         f"multiple of {WARP_SIZE}, got {num_threads}.")
    if isinstance(barrier_id, int) and not 0 < barrier_id < NUM_HARDWARE_BARRIERS:
        raise ValueError(f"named barrier ids run from 1 to {NUM_HARDWARE_BARRIERS - 1} (0 is "
                         f"__syncthreads), got {barrier_id}; start at first_free_id(...).")


def _emit(operation: str, barrier_id, num_threads: int) -> None:
    """`bar.<operation> barrier_id, num_threads;` for the calling warpgroup. A static id
    is written into the instruction; a traced one (an int32 scalar, the same in every
    thread, e.g. computed from lax.axis_index) travels in a register."""
    _check(barrier_id, num_threads)
    if isinstance(barrier_id, int):
        @plgpu.inline_mgpu()
        def bar_op(_):
            mgpu_utils.inline_ptx(f"bar.{operation} {barrier_id}, {num_threads};",
                                  has_side_effects=True, convergent=True)

        bar_op()
        return

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
    def bar_op(_, id_array):
        [id_register] = id_array.registers.flat
        mgpu_utils.inline_ptx(f"bar.{operation} $0, {num_threads};", id_register,
                              has_side_effects=True, convergent=True)

    bar_op(jnp.asarray(barrier_id, jnp.int32))


def bar_sync(barrier_id: int | jax.Array, num_threads: int) -> None:
    """Arrive at named barrier `barrier_id` and wait until `num_threads` threads have."""
    _emit("sync", barrier_id, num_threads)


def bar_arrive(barrier_id: int | jax.Array, num_threads: int) -> None:
    """Arrive at named barrier `barrier_id` without waiting."""
    _emit("arrive", barrier_id, num_threads)
