"""The Mosaic GPU (Hopper) backward kernels: dQ and dK/dV.

CPU tier: every shipped configuration lowers for an H100 target (Pallas → Mosaic GPU;
ptxas, registers and barriers show only on a GPU), and what the kernels cannot serve is
declined with a reason. GPU tier (marked gpu): gradients of the kernels, driven directly
with out/lse from the float32 reference, against jax.vjp of that reference, worst row of
each tensor; two runs bitwise identical.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import masks as M
from jaxattn.reference import reference_attention
from pallas_kernels.common import DeltaOfOutput
from pallas_kernels.flash_vjp import backward_lse
from pallas_kernels.mosaic_gpu import backward_kernels as mb
from pallas_kernels.mosaic_gpu.backward_walk import TileLists
from helpers import lower_for_h100
from jaxattn.flash import build_call
from jaxattn.parallel.masks import localize

# the dK/dV kernel per item, fused, persistent; and persistent with D formed in its dQ
# kernel (D handed over as a DeltaOfOutput, as jaxattn's own VJP does)
VARIANTS = ("two_kernels", "fused", "persistent", "persistent_own_delta")
# head dim 256 (column halves in dK/dV, one dQ warpgroup): as shipped (the dK/dV
# warpgroups share Sᵀ and dPᵀ), and with both products formed by both warpgroups (what
# calls with a soft cap run)
VARIANTS_D256 = ("default", "default_own_delta", "duplicated", "duplicated_own_delta")


def _static_and_metas(mask, t, s, h, cap=None, variant="two_kernels"):
    """(static, metas, operands) as jaxattn builds them, at the backward kernels' tiles."""
    config = mb.default_backward_config(mb.padded_head_dim(h))
    if variant.startswith("duplicated"):
        config = dataclasses.replace(config, share_products=False)
    elif not variant.startswith("default"):
        config = dataclasses.replace(config, fused=variant == "fused",
                                     persistent=variant.startswith("persistent"))
    return build_call("pallas_mosaic_gpu", mask, t, s, scale=h ** -0.5, logits_soft_cap=cap,
                      config=config, interpret=False)


def _backward_fn(mask, t, s, h, cap=None, parts=("dq", "dkdv"), variant="two_kernels"):
    """run(q, k, v, out, lse, do, dlse=None) -> (dq, dk, dv): D = rowsum(dO ∘ O) − dlse
    formed here, or by the dQ kernel for the "_own_delta" variant."""
    static, metas, operands = _static_and_metas(mask, t, s, h, cap, variant)

    def run(q, k, v, out, lse, do, dlse=None):
        if variant.endswith("_own_delta"):
            delta = DeltaOfOutput(dlse)
        else:
            delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), out.astype(jnp.float32))
            delta = delta if dlse is None else delta - dlse
        return mb.backward(static, q, k, v, None, out, backward_lse(lse), do, delta, metas,
                           operands, parts=parts)[:3]
    return run


def _lowered_text(mask, *, b=1, t=256, s=256, n=2, kh=1, h=64, cap=None, dtype=jnp.bfloat16,
                  parts=("dq", "dkdv"), variant="two_kernels"):
    run = _backward_fn(mask, t, s, h, cap, parts, variant)
    shapes = [((b, t, n, h), dtype), ((b, s, kh, h), dtype), ((b, s, kh, h), dtype),
              ((b, t, n, h), dtype), ((b, n, t), jnp.float32), ((b, t, n, h), dtype)]
    args = [jax.ShapeDtypeStruct(shape, dt) for shape, dt in shapes]
    return lower_for_h100(run, *args)


def _per_head_documents_mask():
    """Different documents per head (4 heads, 256 tokens): one tile list per head."""
    ids = np.stack([np.repeat(np.arange(2), [70, 186]), np.repeat(np.arange(3), [20, 100, 136]),
                    np.repeat(np.arange(2), [200, 56]), np.zeros(256, int)])[None]
    return M.CausalMask() & M.DenseMask(jnp.asarray(ids[:, :, :, None] == ids[:, :, None, :]))


LOWERING_CASES = {
    "full_d64": (M.FullMask(), dict(h=64)),
    "causal_d128_gqa": (M.CausalMask(), dict(h=128, n=4, kh=2)),
    "window_ragged_softcap": (M.LocalMask(100, 0), dict(t=300, s=200, h=128, cap=30.0)),
    "bigbird_d128": (M.bigbird_mask(512, window=64, num_global=32, num_random_blocks=1,
                                    block_size=128, causal=True), dict(t=512, s=512, h=128)),
    "documents_f16_d96": (M.causal_document_mask(jnp.asarray(np.repeat(np.arange(2), [90, 166])[None])),
                          dict(h=96, dtype=jnp.float16, parts=("dkdv",))),
    # Masks whose PARTIAL tiles never read the query positions (padded keys of a full
    # mask, segment ids alone, a block layout): the kernels must not build them.
    "full_padded_keys_gqa": (M.FullMask(), dict(t=300, s=200, h=64, n=4, kh=2)),
    "segments_only": (M.SegmentMask(jnp.asarray(np.repeat(np.arange(2), [100, 156])[None]),
                                    jnp.asarray(np.repeat(np.arange(2), [90, 110])[None])),
                      dict(t=256, s=200, h=128)),
    "block_layout": (M.BlockSparseMask(np.array([[1, 0], [1, 1]], bool), 128, 128),
                     dict(t=256, s=256, h=64)),
    # a ring step's view of a padding mask: its position map adds to q_pos, then the
    # lengths never read the result
    "ring_view_of_lengths": (localize(M.LengthMask(jnp.asarray([200]), jnp.asarray([150]),
                                                   q_len=512, kv_len=512),
                                      ((64, 128), (384, 128)), ((64, 128), (384, 128))),
                             dict(t=256, s=256, h=64)),
}


# Head dim 256 (and 129–255, padded to it): the dK/dV warpgroups split the columns.
LOWERING_CASES_D256 = {
    "causal_gqa": (M.CausalMask(), dict(h=256, n=4, kh=2)),
    "window_ragged_softcap": (M.LocalMask(100, 0), dict(t=300, s=200, h=256, cap=30.0)),
    "bigbird": (M.bigbird_mask(512, window=64, num_global=32, num_random_blocks=1,
                               block_size=128, causal=True), dict(t=512, s=512, h=256)),
    "documents_f16_d200": (M.causal_document_mask(jnp.asarray(np.repeat(np.arange(2), [90, 166])[None])),
                           dict(h=200, dtype=jnp.float16)),
}


@pytest.mark.parametrize("variant", VARIANTS_D256)
@pytest.mark.parametrize("name", list(LOWERING_CASES_D256))
def test_head_dim_256_lowers_for_h100(name, variant):
    mask, kwargs = LOWERING_CASES_D256[name]
    text = _lowered_text(mask, **{**kwargs, "variant": variant})
    assert "jaxattn_mosaic_dkdv_persistent" in text and "jaxattn_mosaic_dq_persistent" in text
    # the column split's meeting point: both compute warpgroups (256 threads) at barrier 4
    assert "bar.sync 4, 256" in text
    # sharing the products: Pᵀ and dSᵀ handed over at barriers 5 and 6 (not with a cap)
    shared = not variant.startswith("duplicated") and kwargs.get("cap") is None
    assert ("bar.arrive 5, 256" in text and "bar.sync 6, 256" in text) == shared


@pytest.mark.parametrize("mask, reads", [
    (M.CausalMask(), True),
    (M.LocalMask(8, 4), True),
    (M.SegmentMask(jnp.zeros((1, 64), jnp.int32), jnp.zeros((1, 64), jnp.int32)), False),
    (M.BlockSparseMask(np.array([[1, 0], [1, 1]], bool), 32, 32), False),
    (M.causal_document_mask(jnp.zeros((1, 64), jnp.int32)), True),
    (M.SegmentMask(jnp.zeros((1, 64), jnp.int32), jnp.zeros((1, 64), jnp.int32))
     | M.GlobalMask(4), True),
    (localize(M.LengthMask(jnp.asarray([40]), jnp.asarray([30]), q_len=64, kv_len=64),
              ((0, 64),), ((0, 64),)), False),
])
def test_reads_query_positions(mask, reads):
    """Whether a mask's value depends on the query positions: the backward kernels build
    them only then (Mosaic GPU cannot lay out a value nothing uses)."""
    from pallas_kernels.mosaic_gpu.backward_walk import reads_query_positions
    canonical = M.canonical_mask(mask)
    count = len(canonical.operands())
    assert reads_query_positions(canonical.evaluate, (64, 64), count) is reads


@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_shipped_configurations_lower_for_h100(name):
    mask, kwargs = LOWERING_CASES[name]
    text = _lowered_text(mask, **kwargs)
    calls = 1 if kwargs.get("parts") == ("dkdv",) else 2
    assert text.count("mosaic_gpu") >= calls


@pytest.mark.parametrize("name", ["causal_d128_gqa", "bigbird_d128", "documents_f16_d96"])
def test_fused_backward_lowers_for_h100(name):
    """One kernel for dK, dV and dQ (semaphore-ordered TMA adds of dQ's partial sums)."""
    mask, kwargs = LOWERING_CASES[name]
    text = _lowered_text(mask, **{**kwargs, "parts": ("dq", "dkdv"), "variant": "fused"})
    assert text.count("mosaic_gpu_v2") == 1     # the two-kernel backward launches 2


@pytest.mark.parametrize("with_dlse", [False, True])
@pytest.mark.parametrize("name", ["causal_d128_gqa", "window_ragged_softcap", "documents_f16_d96"])
def test_dq_kernel_forming_delta_lowers_for_h100(name, with_dlse):
    """Handed a DeltaOfOutput, the persistent dQ kernel forms D (and writes it for the
    dK/dV kernel): the program has no pass of its own over O and dO left."""
    mask, kwargs = LOWERING_CASES[name]
    kwargs = {**kwargs, "parts": ("dq", "dkdv")}
    b, t, s, n, kh, h = 1, kwargs.get("t", 256), kwargs.get("s", 256), kwargs.get("n", 2), \
        kwargs.get("kh", 1), kwargs.get("h", 64)
    dtype = kwargs.get("dtype", jnp.bfloat16)
    shapes = [((b, t, n, h), dtype), ((b, s, kh, h), dtype), ((b, s, kh, h), dtype),
              ((b, t, n, h), dtype), ((b, n, t), jnp.float32), ((b, t, n, h), dtype)]
    shapes += [((b, n, t), jnp.float32)] if with_dlse else []
    for variant in ("persistent_own_delta", "persistent"):
        run = _backward_fn(mask, t, s, h, kwargs.get("cap"), variant=variant)
        text = lower_for_h100(run, *(jax.ShapeDtypeStruct(shape, dt) for shape, dt in shapes))
        assert "jaxattn_mosaic_dq_persistent" in text and "jaxattn_mosaic_dkdv_persistent" in text
        # D = rowsum(dO ∘ O) by XLA is a dot_general
        assert ("dot_general" in text) == (variant == "persistent"), variant


def test_delta_from_the_dq_kernel_is_padded_with_zeros_for_the_dkdv_kernel(monkeypatch):
    """With one compute warpgroup the dQ kernel's q-blocks have 64 rows and the dK/dV
    kernel's 128: at T = 150 the dQ kernel writes D for rows 0-191 and the dK/dV kernel
    reads rows 0-255. Its rows 192-255 must be zeros (rows past T get Q = 0, lse = 0,
    so P = 1 on FULL tiles and dS = -D: anything else there reaches dK). The two kernels
    are stood in for by functions that record what they get."""
    config = mb.MosaicBackwardConfig(block_q_dkv=128, block_kv_dkv=64, block_q_dq=64,
                                     block_kv_dq=64, compute_warpgroups=1)
    t, s, n, h = 150, 200, 2, 64
    static, metas, operands = build_call("pallas_mosaic_gpu", M.FullMask(), t, s, scale=h ** -0.5,
                                         logits_soft_cap=None, config=config, interpret=False)
    seen = {}

    def dq_kernel(q, k, v, do, lse2, delta, lists, *, block_q, out, **kwargs):
        assert delta is None and out is not None
        rows = lists[0].shape[-1] * block_q
        seen["dq_rows"] = rows
        return jnp.zeros_like(q), jnp.full((q.shape[0], q.shape[2], rows), 7.0, jnp.float32)

    def dkdv_kernel(q, k, v, do, lse2, delta, lists, **kwargs):
        seen["delta"] = delta
        return jnp.zeros_like(k), jnp.zeros_like(v)

    monkeypatch.setattr(mb, "dq_persistent_call", dq_kernel)
    monkeypatch.setattr(mb, "dkdv_persistent_call", dkdv_kernel)
    x = jnp.zeros((1, t, n, h), jnp.bfloat16)
    kv = jnp.zeros((1, s, n, h), jnp.bfloat16)
    mb.backward(static, x, kv, kv, None, x, jnp.zeros((1, n, t)), x, DeltaOfOutput(None), metas,
                operands, parts=("dq", "dkdv"))
    delta = np.asarray(seen["delta"])
    assert seen["dq_rows"] == 192 and delta.shape == (1, n, 256)
    assert (delta[..., :192] == 7.0).all() and (delta[..., 192:] == 0.0).all()


@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_persistent_kernels_lower_for_h100(name):
    """Both kernels as one CTA per SM looping over their blocks (two buffers of the
    resident tiles)."""
    mask, kwargs = LOWERING_CASES[name]
    text = _lowered_text(mask, **{**kwargs, "variant": "persistent"})
    assert "jaxattn_mosaic_dkdv_persistent" in text
    assert "bar.sync 4, 256" not in text   # rows split between the warpgroups: no meeting
    if kwargs.get("parts") != ("dkdv",):
        assert "jaxattn_mosaic_dq_persistent" in text


@pytest.mark.parametrize("mask, t, s, tiles", [
    (M.CausalMask(), 320, 384, (64, 128)),
    (_per_head_documents_mask(), 256, 256, (64, 128)),          # Hm > 1
    (M.CausalMask(offset=-130), 300, 200, (64, 128)),           # q-blocks nobody visits
    (M.LocalMask(100, 30) | M.GlobalMask(20), 448, 448, (64, 128)),
    (M.causal_document_mask(jnp.asarray(np.stack([np.repeat(np.arange(3), [100, 150, 134]),
                                                  np.repeat(np.arange(2), [300, 84])]))), 384, 384,
     (64, 128)),
])
def test_contributor_ranks_order_the_kv_blocks_of_every_q_block(mask, t, s, tiles):
    """rank of (q-block i, kv-block j) = visitors j' < j of i, read along the transposed
    lists; visitors = how many kv-blocks visit i: from a numpy walk of the forward lists."""
    from jaxattn.masks import build_block_metadata
    from pallas_kernels.mosaic_gpu.backward_fused import contributor_ranks
    meta = jax.tree.map(jnp.asarray, build_block_metadata(mask, t, s, *tiles))
    rank_full, rank_partial, visitors = jax.jit(contributor_ranks)(meta)
    a = {f: np.asarray(getattr(meta, f)) for f in ("full_count", "full_index", "partial_count",
                                                   "partial_index", "t_full_count", "t_full_index",
                                                   "t_partial_count", "t_partial_index")}
    bm, hm, n_q = a["full_count"].shape
    for b in range(bm):
        for h in range(hm):
            seen = [set(a["full_index"][b, h, i, :a["full_count"][b, h, i]])
                    | set(a["partial_index"][b, h, i, :a["partial_count"][b, h, i]])
                    for i in range(n_q)]
            assert list(np.asarray(visitors)[b, h]) == [len(x) for x in seen]
            for kind, ranks in (("full", rank_full), ("partial", rank_partial)):
                count, index = a[f"t_{kind}_count"][b, h], a[f"t_{kind}_index"][b, h]
                for j in range(count.shape[0]):
                    for slot in range(count[j]):
                        i = index[j, slot]
                        assert j in seen[i]
                        assert int(ranks[b, h, j, slot]) == sum(x < j for x in seen[i])


def _expected_walk(meta, block, heads, batch=0):
    """(head in group, block index, partial) in the order the kernels visit, from numpy."""
    a = [np.asarray(x) for x in (meta.t_full_count, meta.t_full_index, meta.t_partial_count,
                                 meta.t_partial_index)]
    walk = []
    for g, hrow in enumerate(heads):
        row = hrow if a[0].shape[1] > 1 else 0
        bm = batch if a[0].shape[0] > 1 else 0
        walk += [(g, int(i), False) for i in a[1][bm, row, block, :a[0][bm, row, block]]]
        walk += [(g, int(i), True) for i in a[3][bm, row, block, :a[2][bm, row, block]]]
    return walk


def _expected_rank(meta, row, q_block, kv_block, batch=0):
    """kv-blocks before `kv_block` on q-block `q_block`'s forward lists (numpy)."""
    a = [np.asarray(x) for x in (meta.full_count, meta.full_index, meta.partial_count,
                                 meta.partial_index)]
    bm = batch if a[0].shape[0] > 1 else 0
    row = row if a[0].shape[1] > 1 else 0
    seen = (list(a[1][bm, row, q_block, :a[0][bm, row, q_block]])
            + list(a[3][bm, row, q_block, :a[2][bm, row, q_block]]))
    return sum(int(j) < kv_block for j in seen)


@pytest.mark.parametrize("per_head", [False, True])
def test_tile_lists_decode_every_step_of_the_group(per_head):
    """The step → (head, block, partial, rank) decoding both kernels share, on the
    transposed lists of a GQA group (2 query heads per KV head), against the lists read
    in numpy; rank (the fused kernel's turn) read from contributor_ranks' arrays."""
    from pallas_kernels.mosaic_gpu.backward_fused import contributor_ranks
    mask = _per_head_documents_mask() if per_head else M.LocalMask(100, 0) | M.GlobalMask(16)
    meta = M.build_block_metadata(mask, 256, 256, 64, 128)
    assert (np.asarray(meta.t_full_count).shape[1] > 1) == per_head
    arrays = tuple(jnp.asarray(x) for x in (meta.t_full_count, meta.t_full_index,
                                            meta.t_partial_count, meta.t_partial_index))
    ranks = contributor_ranks(jax.tree.map(jnp.asarray, meta))[:2]
    for kv_head in (0, 1):
        heads = [2 * kv_head, 2 * kv_head + 1]
        for block in range(meta.num_kv_blocks):
            lists = TileLists(arrays, batch=0, block=block, head0=2 * kv_head, groups=2,
                              rank_refs=ranks)
            got = [lists.decode(jnp.int32(i)) for i in range(int(lists.total))]
            got = [(int(x.head), int(x.block), bool(x.partial), int(x.rank)) for x in got]
            want = [(g, i, partial, _expected_rank(meta, heads[g], i, block))
                    for g, i, partial in _expected_walk(meta, block, heads)]
            assert got == want


@dataclasses.dataclass(frozen=True)
class _Request:   # the fields of a KernelRequest that backward_supports reads
    dtype: object = jnp.bfloat16
    head_dim: int = 128
    has_bias: bool = False
    operand_kinds: tuple = ()


@pytest.mark.parametrize("request_, reason", [
    (_Request(), None),
    (_Request(head_dim=96, dtype=jnp.float16, operand_kinds=(("q", None), ("kv", None))), None),
    (_Request(operand_kinds=(("block", (128, 128)),)), None),
    (_Request(dtype=jnp.float32), "bfloat16 and float16"),
    (_Request(head_dim=256), None),
    (_Request(head_dim=200, dtype=jnp.float16, operand_kinds=(("q", None), ("kv", None))), None),
    (_Request(head_dim=320), "head dims up to 256"),
    (_Request(has_bias=True), "no bias"),
    (_Request(operand_kinds=(("qkv", None),)), "dense"),
    (_Request(operand_kinds=(("block", (64, 64)),)), "not multiples"),
])
def test_backward_supports_names_what_it_declines(request_, reason):
    got = mb.backward_supports(request_)
    if reason is None:
        assert got is None
    else:
        assert reason in got


def test_config_checks_its_tiles():
    with pytest.raises(ValueError, match="block_kv_dkv must be 64 rows"):
        mb.MosaicBackwardConfig(block_kv_dkv=64)
    with pytest.raises(ValueError, match="block_q_dq must be 64 rows per dQ warpgroup × 1"):
        mb.MosaicBackwardConfig(dq_warpgroups=1)
    with pytest.raises(ValueError, match="both share the rows"):
        mb.MosaicBackwardConfig(split_columns=True)
    with pytest.raises(ValueError, match="split_columns=True.*persistent=True"):
        mb.MosaicBackwardConfig(block_kv_dkv=64, split_columns=True, persistent=False)
    for bad in (3, True):
        with pytest.raises(ValueError, match="resident_buffers must be 1 or 2"):
            mb.MosaicBackwardConfig(resident_buffers=bad)
    with pytest.raises(ValueError,
                       match=r"share_products=True.*split_columns=False.*default_backward_config\(256\)"):
        mb.MosaicBackwardConfig(share_products=True)
    # dq_warpgroups follows compute_warpgroups unless set
    one = mb.MosaicBackwardConfig(compute_warpgroups=1, block_kv_dkv=64, block_q_dq=64)
    assert one.dq_warpgroups == 1 and mb.MosaicBackwardConfig().dq_warpgroups == 2
    # head dim 256: column halves in dK/dV sharing Sᵀ and dPᵀ, one dQ warpgroup, one
    # resident buffer each
    d256 = mb.default_backward_config(256)
    assert d256.split_columns and d256.share_products
    assert d256.dq_warpgroups == 1 and d256.resident_buffers == 1
    assert d256.metadata_tiles() == {"dkdv": (64, 64), "dq": (64, 64)}
    sizes = d256.kernel_smem_bytes(256, 2)     # + Pᵀ and dSᵀ hand-overs, 8 KB each
    assert sizes == {"dkdv": 64 * 1024 + 2 * (64 * 1024 + 512) + 16 * 1024 + 1024,
                     "dq": 192 * 1024 + 1024}
    assert max(sizes.values()) < mb.SMEM_BYTES
    assert dataclasses.replace(d256, resident_buffers=2).smem_bytes(256, 2) > mb.SMEM_BYTES
    duplicated = dataclasses.replace(d256, share_products=False)
    assert duplicated.kernel_smem_bytes(256, 2)["dkdv"] == sizes["dkdv"] - 16 * 1024
    assert mb.padded_head_dim(96) == 128 and mb.padded_head_dim(160) == 256
    with pytest.raises(ValueError, match="multiple of 64"):
        mb.MosaicBackwardConfig(block_q_dkv=32)
    cfg = mb.MosaicBackwardConfig()
    assert cfg.persistent and cfg.smem_bytes(128, 2) < mb.SMEM_BYTES
    assert cfg.metadata_tiles() == {"dkdv": (64, 128), "dq": (128, 64)}
    with pytest.raises(ValueError, match="fused=True.*block_q_dkv=64"):
        mb.MosaicBackwardConfig(fused=True, block_q_dkv=128)
    per_block = mb.MosaicBackwardConfig(persistent=False)
    # the persistent kernels hold a second buffer of the resident tiles (64 KB at D128)
    assert cfg.smem_bytes(128, 2) - per_block.smem_bytes(128, 2) == 64 * 1024
    # the fused kernel, one buffer: + 16 KB of dSᵀ and 64 KB of float32 dQ staging at D128
    fused = mb.MosaicBackwardConfig(fused=True, persistent=False)
    assert fused.smem_bytes(128, 2) - per_block.smem_bytes(128, 2) == 80 * 1024
    assert mb.MosaicBackwardConfig(fused=True).smem_bytes(128, 2) == fused.smem_bytes(128, 2)
    assert fused.smem_bytes(128, 2) < mb.SMEM_BYTES
    with pytest.raises(ValueError, match="persistent must be True or False"):
        mb.MosaicBackwardConfig(persistent=1)
    for bad in (20, 44, 40.0, 264):
        with pytest.raises(ValueError, match="memory_registers must be a multiple of 8"):
            mb.MosaicBackwardConfig(memory_registers=bad)


def test_head_dim_256_needs_the_column_split():
    """dK and dV of 64 keys over 256 float32 columns would take 256 registers a thread:
    a config without split_columns is refused at head dim 256 (even one that fits in
    shared memory), with what to use instead."""
    static, metas, _ = _static_and_metas(M.CausalMask(), 256, 256, 256, variant="default")
    static = dataclasses.replace(static, config=mb.MosaicBackwardConfig(
        block_kv_dkv=128, block_q_dq=128, persistent=False, num_stages=1))
    x = jnp.zeros((1, 256, 1, 256), jnp.bfloat16)
    lse = jnp.zeros((1, 1, 256), jnp.float32)
    with pytest.raises(ValueError, match=r"needs split_columns=True.*default_backward_config\(256\)"):
        mb.backward(static, x, x, x, None, x, lse, x, lse, metas, (), parts=("dkdv",))


def test_metadata_for_other_tiles_is_refused():
    static, metas, _ = _static_and_metas(M.CausalMask(), 256, 256, 64)
    metas = dict(metas, dq=M.build_block_metadata(M.CausalMask(), 256, 256, 64, 64))
    x = jnp.zeros((1, 256, 1, 64), jnp.bfloat16)
    lse = jnp.zeros((1, 1, 256), jnp.float32)
    with pytest.raises(ValueError, match="metadata_tiles"):
        mb.backward(static, x, x, x, None, x, lse, x, lse, metas, (), parts=("dq",))


def test_a_config_over_the_shared_memory_limit_is_refused():
    """Four stages beside the persistent kernels' two resident buffers: 257 KiB (dQ) and
    259 KiB (dK/dV) at D128."""
    static, metas, _ = _static_and_metas(M.CausalMask(), 256, 256, 128, variant="persistent")
    static = dataclasses.replace(static, config=dataclasses.replace(static.config, num_stages=4))
    assert static.config.smem_bytes(128, 2) > mb.SMEM_BYTES
    assert dataclasses.replace(static.config, persistent=False).smem_bytes(128, 2) <= mb.SMEM_BYTES
    x = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
    lse = jnp.zeros((1, 1, 256), jnp.float32)
    for parts, kernel, size in ((("dkdv",), "dkdv", 265216), (("dq",), "dq", 263168)):
        with pytest.raises(ValueError, match=f"{kernel} kernel needs {size} bytes.*persistent=False"):
            mb.backward(static, x, x, x, None, x, lse, x, lse, metas, (), parts=parts)


# ---------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------
GPU_CASES = {
    "full_d64": (M.FullMask(), 1, 256, 256, 2, 2, 64),
    "causal_d128": (M.CausalMask(), 2, 512, 512, 2, 2, 128),
    "window_gqa_d128": (M.LocalMask(100, 30), 1, 384, 384, 4, 2, 128),
    "ragged_t_ne_s_d128": (M.FullMask(), 1, 200, 333, 2, 1, 128),
    "empty_rows_d128": (M.CausalMask(offset=-50), 1, 300, 200, 2, 1, 128),
    "empty_programs_d64": (M.CausalMask(), 1, 256, 512, 2, 1, 64),   # keys 256+ seen by none
    # rows 0-99 see no key: whole 64-row q-blocks that no kv-block visits (the fused
    # kernel never writes their dQ rows; the caller zeroes them)
    "empty_q_blocks_d64": (M.CausalMask(offset=-100), 1, 300, 200, 2, 1, 64),
    "bigbird_gqa_d128": (M.bigbird_mask(640, window=64, num_global=32, num_random_blocks=1,
                                        block_size=128, causal=True), 1, 640, 640, 4, 2, 128),
    "documents_d64": (M.causal_document_mask(jnp.asarray(np.repeat(np.arange(3), [100, 250, 162])[None])),
                      1, 512, 512, 2, 1, 64),
    # a soft cap (optional last field): dS × (1 − tanh²)
    "softcap_causal_gqa_d128": (M.CausalMask(), 1, 384, 384, 4, 2, 128, 30.0),
    "documents_window_softcap_d128": (
        M.causal_document_mask(jnp.asarray(np.stack([np.repeat(np.arange(3), [200, 60, 252]),
                                                     np.repeat(np.arange(2), [300, 212])])))
        & M.LocalMask(160, 0), 2, 512, 512, 2, 1, 128, 5.0),
    # 512 kv-block items: a persistent CTA runs ~4 of them, reusing both K/V buffers
    "many_items_causal_gqa_d64": (M.CausalMask(), 4, 1024, 1024, 32, 16, 64),
}
# Head dim 256 (200 pads to it): column halves in dK/dV, one dQ warpgroup, one buffer.
GPU_CASES_D256 = {
    "causal_gqa_d256": (M.CausalMask(), 1, 384, 384, 4, 2, 256),
    "ragged_t_ne_s_d256": (M.FullMask(), 1, 200, 333, 2, 1, 256),
    "empty_rows_d256": (M.CausalMask(offset=-50), 1, 300, 200, 2, 1, 256),
    "window_softcap_gqa_d256": (M.LocalMask(100, 30), 1, 384, 384, 4, 2, 256, 20.0),
    "bigbird_gqa_d256": (M.bigbird_mask(640, window=64, num_global=32, num_random_blocks=1,
                                        block_size=128, causal=True), 1, 640, 640, 4, 2, 256),
    "documents_d200": (M.causal_document_mask(jnp.asarray(np.repeat(np.arange(3), [100, 250, 162])[None])),
                       1, 512, 512, 2, 1, 200),
    # 512 kv-block items, ~4 per CTA: its one K/V buffer refilled after each item's stores
    "many_items_causal_gqa_d256": (M.CausalMask(), 4, 1024, 1024, 16, 8, 256),
}


def worst_row_error(got, want) -> float:
    """max over rows of ‖got − want‖ / ‖want‖, rows with a tiny reference gradient
    held to 5 % of the rms row norm (the first row of a causal mask has dS ≡ 0 exactly:
    only rounding is left there, which no relative measure can hold)."""
    got = np.asarray(got, np.float32).reshape(-1, got.shape[-1])
    want = np.asarray(want, np.float32).reshape(-1, want.shape[-1])
    norm = np.linalg.norm(want, axis=-1)
    floor = 0.05 * np.sqrt(np.mean(norm ** 2)) + 1e-30
    return float(np.max(np.linalg.norm(got - want, axis=-1) / np.maximum(norm, floor)))


@functools.lru_cache(maxsize=None)
def _reference_case(name):
    """(q, k, v, dO in bf16; out, lse, (dQ, dK, dV) of the float32 reference) for a GPU
    case: one jitted program (op-by-op it spends most of a test compiling small
    programs), computed once per process for all the variants."""
    mask, b, t, s, n, kh, h, *cap = {**GPU_CASES, **GPU_CASES_D256}[name]
    cap = cap[0] if cap else None
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, kh, h), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, kh, h), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, t, n, h), jnp.bfloat16)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def ref(q_, k_, v_):
        # HIGHEST: a float32 matmul on a GPU may otherwise round its operands to TF32
        return reference_attention(q_, k_, v_, None, mask, scale=h ** -0.5, logits_soft_cap=cap,
                                   return_residuals=True, precision=jax.lax.Precision.HIGHEST)

    @jax.jit
    def outputs_and_gradients(q, k, v, do):
        (out, lse), vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
        return out, lse, vjp((f32(do), jnp.zeros_like(lse)))
    return (q, k, v, do, *outputs_and_gradients(q, k, v, do))


@pytest.mark.gpu
@pytest.mark.parametrize("variant, name", [*((v, c) for c in GPU_CASES for v in VARIANTS),
                                           *((v, c) for c in GPU_CASES_D256 for v in VARIANTS_D256)])
def test_gradients_match_the_reference_per_row(name, variant):
    mask, b, t, s, n, kh, h, *cap = {**GPU_CASES, **GPU_CASES_D256}[name]
    cap = cap[0] if cap else None
    q, k, v, do, out, lse, want = _reference_case(name)
    run = jax.jit(_backward_fn(mask, t, s, h, cap, variant=variant))
    # D from the float32 output, so the comparison sees the kernels' error alone (bf16
    # P and dS operands: ~0.004 worst row, emulated on CPU) and not that of a rounded O.
    got = run(q, k, v, out, lse, do)
    again = run(q, k, v, out, lse, do)
    for name_, g, w, g2 in zip(("dq", "dk", "dv"), got, want, again):
        assert bool(jnp.all(jnp.isfinite(g))), name_
        assert worst_row_error(g, w) < 0.02, name_
        assert bool(jnp.array_equal(g, g2)), f"{name_} differs between two runs"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["causal_d128", "ragged_t_ne_s_d128", "empty_rows_d128",
                                  "documents_window_softcap_d128", "many_items_causal_gqa_d64"])
def test_delta_formed_in_the_dq_kernel_subtracts_dlse(name):
    """D formed by the dQ kernel from O, dO and the lse's cotangent gives the gradients
    of D formed by XLA, row by row (the sums run in another order: not bitwise)."""
    mask, b, t, s, n, kh, h, *cap = GPU_CASES[name]
    cap = cap[0] if cap else None
    q, k, v, do, out, lse, _ = _reference_case(name)
    dlse = jax.random.normal(jax.random.key(3), lse.shape, jnp.float32)
    got = jax.jit(_backward_fn(mask, t, s, h, cap, variant="persistent_own_delta"))(
        q, k, v, out, lse, do, dlse)
    want = jax.jit(_backward_fn(mask, t, s, h, cap, variant="persistent"))(q, k, v, out, lse, do, dlse)
    for label, g, w in zip(("dq", "dk", "dv"), got, want):
        assert bool(jnp.all(jnp.isfinite(g))), label
        assert worst_row_error(g, w) < 0.01, label


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["causal_d128", "window_gqa_d128", "bigbird_gqa_d128",
                                  "documents_window_softcap_d128", "many_items_causal_gqa_d64"])
def test_persistent_kernels_equal_the_per_item_kernels(name):
    """Same products in the same order, CTA by CTA or looped: dQ, dK and dV bitwise equal."""
    mask, b, t, s, n, kh, h, *cap = GPU_CASES[name]
    cap = cap[0] if cap else None
    ks = jax.random.split(jax.random.key(2), 5)
    q, do = (jax.random.normal(x, (b, t, n, h), jnp.bfloat16) for x in ks[:2])
    k, v = (jax.random.normal(x, (b, s, kh, h), jnp.bfloat16) for x in ks[2:4])
    out = jax.random.normal(ks[4], (b, t, n, h), jnp.float32)
    lse = jnp.full((b, n, t), 4.0, jnp.float32)
    per_item, persistent = (
        jax.jit(_backward_fn(mask, t, s, h, cap, variant=variant))(q, k, v, out, lse, do)
        for variant in ("two_kernels", "persistent"))
    for label, a, c in zip(("dq", "dk", "dv"), per_item, persistent):
        assert bool(jnp.array_equal(a, c)), label


def _walk_masks():
    """A causal mask shifted so that the first q-block and the last kv-block see nothing
    (items of zero steps), and per-head documents (one list per query head)."""
    ids = np.stack([np.repeat(np.arange(2), [20, 44]), np.repeat(np.arange(3), [30, 10, 24]),
                    np.zeros(64, int), np.repeat(np.arange(2), [50, 14])])[None]
    return {"causal_shifted": M.CausalMask(offset=-20),
            "per_head_documents": M.CausalMask() & M.DenseMask(ids[:, :, :, None] == ids[:, :, None, :])}


# A barrier protocol gone wrong deadlocks the interpreter: fail (the whole run, by
# pytest-timeout's thread method, which can stop a process blocked in native code).
@pytest.mark.timeout(180, method="thread")
@pytest.mark.parametrize("kernel, mask_name, deal", [
    ("dkdv", "causal_shifted", "table"), ("dq", "causal_shifted", "table"),
    ("dkdv", "per_head_documents", "table"), ("dq", "per_head_documents", "table"),
    ("dkdv", "causal_shifted", "sorted"), ("dq", "causal_shifted", "sorted")])
def test_persistent_walk_in_the_interpreter(kernel, mask_name, deal):
    """The persistent kernels' walk, run by three warpgroups in the Mosaic GPU interpreter:
    the kernel's deal (3 CTAs, 16 or 32 items: several each, some of zero steps; the
    LPT table of a static mask's counts, or, as for a mask whose counts are traced, the
    snake over the items sorted on the device), the
    producer loop both kernels run (resident tiles into alternating buffers, each step's
    streamed tile into rotating slots, each refilled only once released) and the lists'
    decoding under GQA (4 query heads, 2 K/V heads, B2). The two consumers store the
    resident and streamed tiles they receive: every item runs once, on one CTA, with its
    tiles in list order (checked in numpy), and the interpreter's race detector sees no
    slot or buffer refilled while read. The copies here stand in for the kernels' own
    (which heads and rows they read is what the GPU tier checks)."""
    from pallas_kernels.mosaic_gpu.backward_dkdv_persistent import dkdv_schedule
    from pallas_kernels.mosaic_gpu.backward_dq_persistent import dq_schedule
    from pallas_kernels.mosaic_gpu.backward_walk import copy_resident_rows, run_persistent_producer
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mask = _walk_masks()[mask_name]
    b, t, n, kh, d, bq, bk, wgs, stages, ctas = 2, 64, 4, 2, 8, 16, 16, 2, 2, 3
    groups, nb = n // kh, t // 16
    meta = M.build_block_metadata(mask, t, t, bq, bk)
    if deal == "sorted":   # no static counts: the deal sorts the traced ones
        meta = dataclasses.replace(meta, tile_counts=None, t_tile_counts=None)
    m = jax.tree_util.tree_map(np.asarray, meta)
    pos = np.arange(t, dtype=np.float32)

    def encoded(heads):   # [B, T, heads, d]: 1 + batch·10⁴ + head·10³ + position
        value = 1 + np.arange(b)[:, None, None] * 1e4 + np.arange(heads)[None, None, :] * 1e3 \
            + pos[None, :, None]
        return np.broadcast_to(value[..., None], (b, t, heads, d)).astype(np.float32)

    q_enc, k_enc = encoded(n), encoded(kh)
    if kernel == "dkdv":   # items (kv-block, KV head, batch); resident K, streamed Q
        lists = (m.t_full_count, m.t_full_index, m.t_partial_count, m.t_partial_index)
        schedule = dkdv_schedule(lists, meta, kv_heads=kh, groups=groups, batch=b, num_ctas=ctas)
        assert (schedule.table is None) == (deal == "sorted")
        item_heads, resident, streamed, res_rows, step_rows = kh, k_enc, q_enc, bk // wgs, bq
    else:                  # items (q-block, query head, batch); resident Q, streamed K
        lists = (m.full_count, m.full_index, m.partial_count, m.partial_index)
        schedule = dq_schedule(meta, n_q_blocks=nb, heads=n, batch=b, num_ctas=ctas)
        assert (schedule.order is not None) == (deal == "sorted")
        item_heads, resident, streamed, res_rows, step_rows = n, q_enc, k_enc, bq // wgs, bk
    walk_groups = groups if kernel == "dkdv" else 1
    max_steps = walk_groups * nb
    n_schedule = len(schedule.arrays())

    def body(*refs):
        meta_refs, refs = refs[:4], refs[4:]
        deal = schedule.bind(refs[:n_schedule])
        res_ref, step_src, res_out, step_out, who_out = refs[n_schedule:]
        cta = lax.axis_index("cta")

        def item_lists(item):
            block, head, bi = deal.item(item)
            head0 = head * walk_groups
            return block, head, bi, TileLists(meta_refs, batch=bi, block=block, head0=head0,
                                              groups=walk_groups)

        def scoped(res_smem, step_smem, res_ready, step_ready, res_free, step_free):
            wg = lax.axis_index("wg")
            my_items = deal.my_item_count()

            @pl.when(wg < wgs)
            def _consumers():
                def run_item(item, first):
                    block, head, bi, tiles = item_lists(item)
                    buf = lax.rem(item, 2)
                    plgpu.barrier_wait(res_ready.at[buf])
                    plgpu.copy_smem_to_gmem(res_smem.at[buf, wg], res_out.at[bi, head, block, wg])
                    who_out[bi, head, block, wg] = jnp.full((d,), cta, jnp.int32)

                    @pl.loop(0, tiles.total)
                    def _(s):
                        slot = lax.rem(first + s, stages)
                        plgpu.barrier_wait(step_ready.at[slot])

                        @pl.when(wg == 0)
                        def _():
                            plgpu.copy_smem_to_gmem(step_smem.at[slot], step_out.at[bi, head, block, s])
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        plgpu.barrier_arrive(step_free.at[slot])

                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    plgpu.barrier_arrive(res_free.at[buf])
                    return first + tiles.total

                lax.fori_loop(0, my_items, run_item, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == wgs)
            def _producer():
                def copy_resident(item_data, buf):   # the kernels' copy, of one source
                    block, head, bi, _ = item_data
                    copy_resident_rows((res_ref,), (res_smem,), buf, res_ready.at[buf],
                                       batch=bi, block=block, head=head, rows=res_rows, wgs=wgs)

                def locate_step(item_data, s):
                    _, head, _, tiles = item_data
                    step = tiles.decode(s)
                    source_head = head * walk_groups + step.head if kernel == "dkdv" else \
                        lax.div(head, jnp.int32(groups))
                    return source_head, pl.ds(step.block * step_rows, step_rows)

                def copy_step(item_data, where, slot):
                    source_head, rows = where
                    plgpu.copy_gmem_to_smem(step_src.at[item_data[2], rows, source_head],
                                            step_smem.at[slot], step_ready.at[slot])

                steps = run_persistent_producer(my_items, item_lists, buffers=2, buffer_free=res_free,
                                                copy_resident=copy_resident, stages=stages,
                                                slot_free=step_free, locate_step=locate_step,
                                                copy_step=copy_step)
                # The interpreter wants every release observed by the thread that waits
                # on its barrier: the last buffers' and slots' releases (the kernels need not).
                @pl.loop(jnp.maximum(my_items - 2, 0), my_items)
                def _(item):
                    plgpu.barrier_wait(res_free.at[lax.rem(item, 2)])

                @pl.loop(jnp.maximum(steps - stages, 0), steps)
                def _(s):
                    plgpu.barrier_wait(step_free.at[lax.rem(s, stages)])

        pl.run_scoped(scoped, plgpu.SMEM((2, wgs, res_rows, d), jnp.float32),
                      plgpu.SMEM((stages, step_rows, d), jnp.float32),
                      plgpu.Barrier(num_arrivals=wgs, num_barriers=2),
                      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
                      plgpu.Barrier(num_arrivals=wgs, num_barriers=2),
                      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
                      collective_axes="wg")

    out_type = (jax.ShapeDtypeStruct((b, item_heads, nb, wgs, res_rows, d), jnp.float32),
                jax.ShapeDtypeStruct((b, item_heads, nb, max_steps, step_rows, d), jnp.float32),
                jax.ShapeDtypeStruct((b, item_heads, nb, wgs, d), jnp.int32))
    grid, grid_names = schedule.grid()
    run = plgpu.kernel(body, out_type=out_type, grid=grid, grid_names=grid_names,
                       num_threads=wgs + 1, thread_name="wg",
                       interpret=plgpu.InterpretGPUParams(detect_races=True))
    res, steps, who = (np.asarray(x) for x in jax.jit(run)(
        *(jnp.asarray(a, jnp.int32) for a in lists), *schedule.arrays(), jnp.asarray(resident),
        jnp.asarray(streamed)))
    # a slot or buffer refilled while a consumer still reads it is a race (jax has no
    # public handle on the interpreter's race detector)
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    assert not gpu_callbacks.get_races().races_found, "the interpreter saw a race"

    full_count, full_index, partial_count, partial_index = lists
    zero_step_items = 0
    for bi in range(b):
        for head in range(item_heads):
            for block in range(nb):
                # one CTA ran the item (both consumers agree), with its resident tiles
                assert len(set(who[bi, head, block].reshape(-1))) == 1
                assert 0 <= who[bi, head, block, 0, 0] < grid[0]
                rows = block * res_rows * wgs + np.arange(res_rows * wgs)
                np.testing.assert_array_equal(res[bi, head, block].reshape(-1, d)[:, 0],
                                              resident[bi, rows, head, 0])
                want = []   # the streamed tiles' first positions, in list order
                for g in range(walk_groups):
                    list_head = head * walk_groups + g if kernel == "dkdv" else head
                    r = list_head if full_count.shape[1] > 1 else 0
                    source_head = list_head if kernel == "dkdv" else head // groups
                    for index, count in ((full_index, full_count), (partial_index, partial_count)):
                        for other in index[0, r, block, :count[0, r, block]]:
                            want.append(streamed[bi, other * step_rows, source_head, 0])
                zero_step_items += not want
                got = steps[bi, head, block, :len(want), 0, 0]
                np.testing.assert_array_equal(got, np.asarray(want, np.float32))
    if mask_name == "causal_shifted":
        assert zero_step_items > 0, "items with no step were checked"
    counts = np.bincount(who[..., 0, 0].reshape(-1), minlength=grid[0])
    assert counts.min() >= 2, f"every CTA ran several items: {counts}"
