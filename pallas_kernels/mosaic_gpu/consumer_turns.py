"""How the forward's two consumer warpgroups take turns on the tensor cores.

Per K/V tile a consumer issues S = Q Kᵀ (wgmma), runs its softmax on the CUDA cores,
then issues O += P V. FlashAttention-3's ping-pong keeps the two consumers half a
tile apart, so one runs its softmax while the other's matrix products occupy the
tensor cores. The forward marks five points of each work item; a turn-taking scheme
says what happens at each:

    start_item()   consumer 1, before its first tile: wait one turn (it starts behind)
    after_qk()     right after issuing S = Q Kᵀ
    release()      softmax done, before waiting for the V tile
    acquire()      before issuing O += P V
    end_item()     consumer 0, after its last tile: the extra turn that lets
                   consumer 1 issue its last P V

Both consumers walk the same tile list, so they reach these points equally often in
every item, an item with no tile included (start_item and end_item then meet).

``MbarrierTurns`` (the default) is one shared-memory mbarrier of two arrivals: every
turn is a rendezvous, each consumer arriving and then waiting for the other.
``NamedBarrierTurns`` (FlashAttention-3's scheme, ``MosaicConfig.named_barriers``)
passes a token through two hardware named barriers instead, one per consumer, each
counting both consumers' 256 threads: a consumer waits on its own barrier
(``bar.sync``) before issuing O += P V, and right after issuing S = Q Kᵀ arrives at
the other's barrier (``bar.arrive``) without waiting, so no turn costs a shared-memory
round trip and the issuing consumer never stalls on the hand-over.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu import named_barrier
from pallas_kernels.mosaic_gpu.config import CONSUMER_WARPGROUPS

WARPGROUP_THREADS = 128


class MbarrierTurns:
    """Turns as rendezvous on `schedule`, an mbarrier expecting both consumers."""

    def __init__(self, wg: jax.Array, schedule):
        def turn():   # one function for every turn, so its trace is shared
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        self.wg, self.schedule, self._turn = wg, schedule, turn

    def start_item(self):
        pl.when(self.wg == 1)(self._turn)

    def after_qk(self):
        self._turn()

    def release(self):
        plgpu.barrier_arrive(self.schedule)

    def acquire(self):
        plgpu.barrier_wait(self.schedule)

    def end_item(self):
        pl.when(self.wg == 0)(self._turn)


@dataclasses.dataclass(frozen=True)
class NamedBarrierTurns:
    """A token passed through named barriers `first_id + w`, one per consumer w.

    Barrier B_w completes when consumer w waits on it (bar.sync, 128 threads) and the
    other consumer has arrived (bar.arrive, 128 threads): 256 in all. Per tile,
    consumer w arrives at B_(1-w) after issuing S = Q Kᵀ and waits on B_w before
    O += P V; consumer 1 also waits on B_1 before its first tile, and consumer 0 adds
    one last arrival at B_1 after its last tile. Pairing the k-th wait with the k-th
    arrival: consumer 0's P V of tile j waits for consumer 1 to issue S = Q Kᵀ of
    tile j; consumer 1's first S = Q Kᵀ waits for consumer 0's, and its P V of tile j
    for consumer 0's S = Q Kᵀ of tile j + 1 (after the last tile: consumer 0's extra
    arrival), the order the mbarrier rendezvous give.

    No consumer arrives twice at a barrier before it completes: between two of its
    arrivals at B_(1-w), consumer w waits on B_w, which completes only after the other
    consumer's wait on B_(1-w) took the first arrival. The one exception would be
    consumer 0's extra arrival at the end of an item followed by its first arrival
    of the next item; `persistent` kernels (several items per CTA) therefore end an
    item with consumer 0 *waiting* on B_1 (bar.sync: a rendezvous with consumer 1's
    last wait), never arriving ahead of it.
    """
    wg: jax.Array
    first_id: int
    persistent: bool

    @property
    def _threads(self) -> int:
        return CONSUMER_WARPGROUPS * WARPGROUP_THREADS

    def start_item(self):
        @pl.when(self.wg == 1)
        def _():
            named_barrier.bar_sync(self.first_id + 1, self._threads)

    def after_qk(self):
        named_barrier.bar_arrive(self.first_id + 1 - self.wg, self._threads)

    def release(self):
        pass   # the token was passed on in after_qk

    def acquire(self):
        named_barrier.bar_sync(self.first_id + self.wg, self._threads)

    def end_item(self):
        @pl.when(self.wg == 0)
        def _():
            if self.persistent:
                named_barrier.bar_sync(self.first_id + 1, self._threads)
            else:
                named_barrier.bar_arrive(self.first_id + 1, self._threads)
