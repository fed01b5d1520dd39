"""How the Mosaic GPU forward's two consumers take turns (consumer_turns.py, named_barrier.py).

CPU tier. The GPU itself is not needed to check the turn-taking protocol: each scheme's
calls are recorded as two per-consumer event lists (the forward's order: per item
start_item, then per tile S = Q Kᵀ, after_qk, release, acquire, O += P V, then
end_item), and every interleaving of the two lists is run against a model of the
hardware (named barriers count arriving warpgroups and complete at two, a warpgroup
must not arrive twice before completion; mbarriers advance a phase per two arrivals,
a parity wait must not fall two phases behind). Checked in every interleaving: no
deadlock, no double arrival, nothing left pending, and within each work item the
tensor-core issues alternate in FlashAttention-3's ping-pong order. The producer's
K/V barriers are left out: they only delay a consumer, whichever scheme is used.
Then the forward with ``named_barriers`` lowers for an H100 and carries the PTX.
"""

from __future__ import annotations

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import pytest

from jaxattn import masks as M
from jaxattn.flash import build_call
from pallas_kernels import mosaic_gpu
from pallas_kernels.mosaic_gpu import consumer_turns, named_barrier
from pallas_kernels.mosaic_gpu.config import MosaicConfig
from pallas_kernels.mosaic_gpu.consumer_turns import MbarrierTurns, NamedBarrierTurns
from pallas_kernels.mosaic_gpu.forward import forward as mosaic_forward
from helpers import lower_for_h100

FIRST_ID = 4


def _programs(make_turns, tiles_per_item, monkeypatch):
    """The two consumers' event lists for a CTA running items of these tile counts."""
    events = []
    monkeypatch.setattr(named_barrier, "bar_sync", lambda i, n: events.append(("sync", i, n)))
    monkeypatch.setattr(named_barrier, "bar_arrive", lambda i, n: events.append(("arrive", i, n)))
    monkeypatch.setattr(consumer_turns, "plgpu", types.SimpleNamespace(
        barrier_arrive=lambda ref: events.append(("mb_arrive",)),
        barrier_wait=lambda ref: events.append(("mb_wait",))))
    programs = []
    for wg in range(2):
        events.clear()
        turns = make_turns(wg)
        for item, tiles in enumerate(tiles_per_item):
            turns.start_item()
            for j in range(tiles):
                events.append(("issue", item, "QK", j))
                turns.after_qk()
                turns.release()
                turns.acquire()
                events.append(("issue", item, "PV", j))
            turns.end_item()
        programs.append(tuple(events))
    return programs


def _ping_pong_order(tiles):
    """(consumer, product, tile) in issue order within one item: consumer 0's S = Q Kᵀ
    of tile 0, consumer 1's, then each consumer in turn issues P V of tile j followed
    by S = Q Kᵀ of tile j + 1."""
    if tiles == 0:
        return []
    order = [(0, "QK", 0), (1, "QK", 0)]
    for j in range(tiles):
        for wg in (0, 1):
            order += [(wg, "PV", j)] + ([(wg, "QK", j + 1)] if j + 1 < tiles else [])
    return order


def _check_every_interleaving(programs, tiles_per_item):
    """The first protocol fault found over all interleavings (None if there is none)."""
    expected = [_ping_pong_order(n) for n in tiles_per_item]
    # State: (pc per consumer, what each consumer is blocked on, named barriers as
    # {id: (arrived warpgroups, generation)}, mbarrier (arrivals, phase), mbarrier
    # phases each consumer has observed).
    start = ((0, 0), (None, None), (), (0, 0), (0, 0))
    seen, stack = set(), [start]
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        pcs, blocked, named, mbar, observed = state
        named_d = dict(named)
        moved = False
        for wg in (0, 1):
            if blocked[wg] is not None:
                kind, target = blocked[wg]
                done = (named_d.get(kind, ((), 0))[1] > target if kind != "mb"
                        else mbar[1] > target)
                if not done:
                    continue
                blocked_ = list(blocked)
                blocked_[wg] = None
                observed_ = list(observed)
                if kind == "mb":
                    observed_[wg] += 1
                stack.append((pcs, tuple(blocked_), named, mbar, tuple(observed_)))
                moved = True
                continue
            if pcs[wg] == len(programs[wg]):
                continue
            event = programs[wg][pcs[wg]]
            pcs_ = tuple(p + (w == wg) for w, p in enumerate(pcs))
            blocked_, named_, mbar_ = list(blocked), dict(named_d), mbar
            if event[0] == "issue":
                _, item, product, tile = event
                done = sum(1 for w in (0, 1) for e in programs[w][:pcs[w]]
                           if e[0] == "issue" and e[1] == item)
                if expected[item][done] != (wg, product, tile):
                    return f"item {item}: consumer {wg} issued {product} {tile} out of turn"
            elif event[0] in ("sync", "arrive"):
                _, barrier, threads = event
                if threads != 256:
                    return f"barrier {barrier} counts {threads} threads, not 256"
                arrived, generation = named_.get(barrier, ((), 0))
                if wg in arrived:
                    return f"consumer {wg} arrived twice at barrier {barrier} in one generation"
                arrived = arrived + (wg,)
                if len(arrived) == 2:
                    arrived, generation = (), generation + 1
                elif event[0] == "sync":
                    blocked_[wg] = (barrier, generation)
                named_[barrier] = (arrived, generation)
            elif event[0] == "mb_arrive":
                count, phase = mbar
                mbar_ = (0, phase + 1) if count + 1 == 2 else (count + 1, phase)
            elif event[0] == "mb_wait":
                if mbar[1] - observed[wg] >= 2:
                    return f"consumer {wg}'s parity wait fell two phases behind"
                blocked_[wg] = ("mb", observed[wg])
            stack.append((pcs_, tuple(blocked_), tuple(sorted(named_.items())), mbar_, observed))
            moved = True
        if not moved:
            if pcs != (len(programs[0]), len(programs[1])):
                return f"deadlock at consumer steps {pcs}"
            if any(arrived for arrived, _ in dict(named).values()) or mbar[0]:
                return "arrivals left pending at the end"
    return None


SCHEMES = {
    "mbarrier": lambda wg: MbarrierTurns(wg, schedule=None),
    "named, persistent": lambda wg: NamedBarrierTurns(wg, FIRST_ID, persistent=True),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("tiles_per_item", [(3,), (0,), (1,), (2, 0, 1, 3), (0, 0, 2)])
def test_turns_alternate_and_never_hang(scheme, tiles_per_item, monkeypatch):
    programs = _programs(SCHEMES[scheme], tiles_per_item, monkeypatch)
    assert _check_every_interleaving(programs, tiles_per_item) is None


def test_named_turns_of_one_item_per_cta_end_with_an_arrival(monkeypatch):
    """One item per CTA: consumer 0 ends with bar.arrive (no wait). Several items per
    CTA need the persistent form, whose end of item is a rendezvous: with an arrival
    there, consumer 0 could arrive twice at consumer 1's barrier."""
    single = lambda wg: NamedBarrierTurns(wg, FIRST_ID, persistent=False)
    for tiles in [(3,), (0,)]:
        assert _check_every_interleaving(_programs(single, tiles, monkeypatch), tiles) is None
    fault = _check_every_interleaving(_programs(single, (1, 1), monkeypatch), (1, 1))
    assert fault == "consumer 0 arrived twice at barrier 5 in one generation"


def test_named_barrier_checks_its_arguments():
    with pytest.raises(ValueError, match=r"multiple of 32, got 100"):
        named_barrier.bar_sync(4, 100)
    with pytest.raises(ValueError, match=r"ids run from 1 to 15 .* got 16"):
        named_barrier.bar_arrive(16, 256)
    assert named_barrier.first_free_id(3) == 4   # 0: __syncthreads, 1-3: Mosaic's warpgroups


@pytest.mark.parametrize("flag", ["named_barriers", "finite_check"])
def test_config_checks_its_flags_are_bools(flag):
    with pytest.raises(ValueError, match=rf"{flag} must be a bool \(True or False\), got 1"):
        MosaicConfig(**{flag: 1})


LOWERING_CASES = {
    "full D128 persistent": (M.FullMask(), 256, 128, True),
    "causal D64 grid": (M.CausalMask(), 300, 64, False),
    "bigbird D128 persistent": (M.bigbird_mask(512, window=64, num_global=32, num_random_blocks=1,
                                               causal=True), 512, 128, True),
    "window D128 grid": (M.LocalMask(64, 0), 333, 128, False),
    "causal D256 grid": (M.CausalMask(), 256, 256, False),
}


def _lowered(mask, t, h, persistent, named):
    cfg = dataclasses.replace(mosaic_gpu.config_for_head_dim(mosaic_gpu.padded_head_dim(h)),
                              persistent=persistent, named_barriers=named)
    static, metas, operands = build_call("pallas_mosaic_gpu", mask, t, t, scale=h ** -0.5,
                                         logits_soft_cap=None, config=cfg, interpret=False)
    shape = jax.ShapeDtypeStruct((1, t, 2, h), jnp.bfloat16)
    text = lower_for_h100(lambda q, k, v: mosaic_forward(static, q, k, v, None, metas, operands),
                          shape, shape, shape)
    assert text.count("mosaic_gpu_v2") == 1
    # The kernel is serialized MLIR; its inline PTX strings stay readable in the text.
    return set(re.findall(r"bar\.(?:sync|arrive) [$\w]+, 256;", text))


@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_forward_with_named_barriers_lowers_for_h100(name):
    """Consumer w waits on barrier 4 + w and arrives at 5 - w (ids in a register);
    consumer 1's first wait and consumer 0's end of item use barrier 5 by number:
    a rendezvous (bar.sync) when the CTA runs several items, an arrival otherwise."""
    mask, t, h, persistent = LOWERING_CASES[name]
    end_of_item = "bar.sync 5, 256;" if persistent else "bar.arrive 5, 256;"
    assert _lowered(mask, t, h, persistent, named=True) == {
        "bar.sync $0, 256;", "bar.arrive $0, 256;", "bar.sync 5, 256;", end_of_item}


def test_default_forward_has_no_named_barriers():
    assert _lowered(M.CausalMask(), 256, 128, True, named=False) == set()


def test_gpu_check_script_takes_the_flag_as_a_variant():
    """benchmarks/mosaic_check.py --variants "named_barriers=1;persistent=0,named_barriers=1"."""
    from benchmarks.mosaic_check import parse_variants
    variants = parse_variants("named_barriers=1;persistent=0,named_barriers=1")
    assert variants == {"named_barriers=1": {"named_barriers": True},
                        "persistent=0,named_barriers=1": {"persistent": False,
                                                          "named_barriers": True}}
    assert all(dataclasses.replace(MosaicConfig(), **v).named_barriers for v in variants.values())
