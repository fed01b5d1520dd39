"""Context parallelism: ring attention over a sequence sharded on one mesh axis.

Shape legend as in jaxattn.api: query [B, T, N, H], key/value [B, S, K, H]; P devices on
``axis_name``. Each device keeps its query shard, and the K/V shards travel once around
the ring with ``lax.ppermute``: at ring step s device d holds the K/V shard of device
src = (d - s) mod P. The partial results of the steps merge exactly through their
log-sum-exp. One concern per module:

    layout.py    the zigzag placement (causal load balance) and its permutations
    masks.py     a global mask re-expressed in the local coordinates of one step's call
    scores.py    a score function (score_mod) at global positions inside one step's call
    plan.py      which call each device makes at each step; shared lax.switch branches
    hops.py      everything that travels in one hop, packed into one buffer
    forward.py   the ring forward: per-step attention and the lse merge
    backward.py  the ring backward: block gradients from the global residuals
    ring.py      `ring_attention` (validation, padding, placement) and the custom VJP
"""

from jaxattn.parallel.layout import inverse_zigzag_permutation, zigzag_permutation
from jaxattn.parallel.ring import ring_attention

__all__ = ["ring_attention", "zigzag_permutation", "inverse_zigzag_permutation"]
