"""The Mosaic GPU (Hopper) forward backend.

CPU tier: every shipped configuration lowers for an H100 target (the program carries
a mosaic_gpu custom call), supports() declines what the kernels do not serve, configs
check themselves, and the tile-list walk with its data-dependent TMA offsets runs in
the Mosaic GPU interpreter against numpy (the interpreter cannot run the attention
kernel itself: it has no register-operand wgmma).
GPU tier (marked gpu, skipped on CPU): values and lse against the float32 reference,
compared row by row, on masks, GQA, T != S, ragged lengths and head dims 64/128/256;
two runs bitwise identical.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np

import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

import jaxattn
from jaxattn import masks as M
from jaxattn.masks import build_block_metadata
from jaxattn.masks.complement import NotMask
from jaxattn.reference import reference_attention
from pallas_kernels import mosaic_gpu
from pallas_kernels.mosaic_gpu import nonfinite_fallback
from pallas_kernels.common import backward_lse
from pallas_kernels.flash_vjp import flash_attention
from pallas_kernels.common import prepare_operands as prepare_forward_operands
from pallas_kernels.mosaic_gpu.common import OperandRef, TileLists, prepare_operands
from pallas_kernels.mosaic_gpu.config import SMEM_BYTES, MosaicConfig
from pallas_kernels.mosaic_gpu.forward import forward as mosaic_forward
from pallas_kernels.metadata import decode_positions, encode_tile_counts
from pallas_kernels.mosaic_gpu.schedule import Schedule, dealt_loads, item_work, balanced_deal
from pallas_kernels.triton.config import TritonConfig
from pallas_kernels.triton.config import config_for_head_dim as triton_config_for_head_dim
from helpers import lower_for_h100
from jaxattn.flash import build_call, prepare_call


def _call(mask, t, s, h, config=None, cap=None):
    """(static, metas, operands) for the mosaic backend, as jaxattn builds them."""
    cfg = config or mosaic_gpu.config_for_head_dim(mosaic_gpu.padded_head_dim(h))
    return build_call("pallas_mosaic_gpu", mask, t, s, scale=h ** -0.5, logits_soft_cap=cap,
                        config=cfg, interpret=False)


def _documents(lengths, batch=1):
    """Segment ids [batch, Σ lengths] of packed documents (traced, like data in a jit)."""
    return jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None].repeat(batch, 0))


_lower_for_h100 = lower_for_h100


def _shapes(b, t, s, n, kh, h, dtype=jnp.bfloat16):
    return (jax.ShapeDtypeStruct((b, t, n, h), dtype), jax.ShapeDtypeStruct((b, s, kh, h), dtype),
            jax.ShapeDtypeStruct((b, s, kh, h), dtype))


# Each shipped config (head dims 64, 128, 256) and each mask family at least once.
LOWERING_CASES = {
    "full D64 f16": (M.FullMask(), 256, 256, 2, 2, 64, jnp.float16),
    "causal D128 GQA ragged": (M.CausalMask(), 300, 300, 4, 2, 128, jnp.bfloat16),
    "window D128 T!=S": (M.LocalMask(64, 0), 200, 333, 2, 1, 128, jnp.bfloat16),
    "bigbird D128": (M.bigbird_mask(512, window=64, num_global=32, num_random_blocks=1,
                                    causal=True), 512, 512, 2, 2, 128, jnp.bfloat16),
    # 512 items with global rows: the persistent CTAs read their items from a table
    # (schedule.py; test_bigbird_work_is_dealt_by_a_balanced_table)
    "bigbird D128 table deal": (M.bigbird_mask(4096, window=256, num_global=256, num_random_blocks=3),
                                4096, 4096, 16, 16, 128, jnp.bfloat16),
    "strided D256": (M.CausalMask() & M.StridedMask(3), 256, 256, 2, 1, 256, jnp.bfloat16),
    "prefix D96": (M.PrefixLMMask(40) & M.GlobalMask(8), 256, 256, 2, 2, 96, jnp.bfloat16),
    # a complement (the planner's union parts exclude what another part computed): a bool
    # `not` in the kernel failed Mosaic GPU's lowering until NotMask used an exclusive or
    "complement D64": (M.GlobalMask(3) & NotMask(M.CausalMask() & M.StridedMask(7)), 256, 256, 2, 2, 64,
                       jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_forward_lowers_for_h100(name):
    mask, t, s, n, kh, h, dtype = LOWERING_CASES[name]
    static, metas, operands = _call(mask, t, s, h)
    text = _lower_for_h100(lambda q, k, v: flash_attention(static, q, k, v, None, metas, operands),
                           *_shapes(1, t, s, n, kh, h, dtype))
    assert "mosaic_gpu" in text


# Masks with per-query / per-key operands (segment ids, sequence lengths) and the soft cap:
# the forward reads the "q" vector once per work item and the "kv" vector per PARTIAL tile
# (documents at D128 with a soft cap: test_gradient_lowers_for_h100).
OPERAND_CASES = {
    "documents window soft cap D64 GQA": (
        M.causal_document_mask(_documents([300, 40, 172], 2)) & M.LocalMask(200, 0),
        512, 512, 4, 2, 64, 30.0),
    "lengths soft cap D256 T!=S": (M.LengthMask(jnp.asarray([200, 77]), jnp.asarray([300, 1]),
                                                q_len=256, kv_len=333), 256, 333, 2, 1, 256, 5.0),
    "soft cap full D128": (M.FullMask(), 256, 256, 2, 2, 128, 50.0),
}


@pytest.mark.parametrize("name", list(OPERAND_CASES))
def test_forward_with_operands_and_soft_cap_lowers_for_h100(name):
    mask, t, s, n, kh, h, cap = OPERAND_CASES[name]
    b = 2 if "GQA" in name or "lengths" in name else 1
    static, metas, operands = _call(mask, t, s, h, cap=cap)
    text = _lower_for_h100(lambda q, k, v: mosaic_forward(static, q, k, v, None, metas, operands),
                           *_shapes(b, t, s, n, kh, h))
    assert text.count("mosaic_gpu_v2") == 1


def _dense(t, s, seed=0, heads=1):
    """A random boolean [1, heads, T, S] mask with a causal band: FULL, PARTIAL and EMPTY tiles."""
    rng = np.random.default_rng(seed)
    return M.CausalMask() & M.DenseMask((rng.random((1, heads, t, s)) < 0.7) | np.eye(t, s, dtype=bool))


# A bias [Bb, Hb, T|1, S|1] takes one of three routes (tile_inputs.py): [.., T, S] tiles by
# TMA (in their dtype: float32 slots are the largest), [.., 1, S] per-key and [.., T|1, 1]
# per-query float32 vectors; dense ("qkv") mask tiles by TMA on PARTIAL steps.
# (mask, batch, T, S, N, K, H, bias shape or None, bias dtype, soft cap)
BIAS_LOWERING_CASES = {
    "full bias f32 D64 (the largest slots)": (M.FullMask(), 1, 256, 256, 2, 2, 64, (1, 2, 256, 256),
                                              jnp.float32, None),
    "full bias D128 ragged T!=S": (M.LocalMask(64, 0), 1, 200, 333, 2, 1, 128, (1, 2, 200, 333),
                                   jnp.bfloat16, None),
    "key bias [1,N,1,S] D128": (M.CausalMask(), 1, 256, 256, 4, 2, 128, (1, 4, 1, 256),
                                jnp.float32, None),
    "key bias on listed FULL tiles (bigbird)": (
        M.bigbird_mask(512, window=64, num_global=32, num_random_blocks=1, causal=True),
        1, 512, 512, 2, 2, 128, (1, 1, 1, 512), jnp.float32, None),
    "query bias [B,1,T,1] D64": (M.CausalMask(), 2, 300, 300, 2, 1, 64, (2, 1, 300, 1),
                                 jnp.float32, None),
    "bias soft cap f32 D128": (M.FullMask(), 1, 256, 256, 2, 2, 128, (1, 1, 256, 256),
                               jnp.float32, 30.0),
    "bias causal GQA D256": (M.CausalMask(), 1, 256, 256, 4, 2, 256, (1, 4, 256, 256),
                             jnp.bfloat16, None),
    "dense mask D128": (_dense(256, 256), 1, 256, 256, 2, 1, 128, None, None, None),
    "dense per-head mask + bias D64 T!=S": (_dense(200, 333, heads=2), 1, 200, 333, 2, 1, 64,
                                           (1, 2, 200, 333), jnp.float32, 20.0),
    "dense mask + bias D256 ragged (64-byte mask rows)": (_dense(200, 333), 1, 200, 333, 2, 1, 256,
                                                          (1, 1, 200, 333), jnp.bfloat16, None),
    # layout blocks the tiles do not divide: expanded to a dense operand
    "unaligned block layout D128": (M.BlockSparseMask(np.tril(np.ones((4, 4), bool)), 64, 64),
                                    1, 256, 256, 2, 2, 128, None, None, None),
}


@pytest.mark.parametrize("name", list(BIAS_LOWERING_CASES))
def test_forward_with_bias_or_dense_mask_lowers_for_h100(name):
    mask, b, t, s, n, kh, h, bias_shape, bias_dtype, cap = BIAS_LOWERING_CASES[name]
    static, metas, operands = _call(mask, t, s, h, cap=cap)
    bias = () if bias_shape is None else (jax.ShapeDtypeStruct(bias_shape, bias_dtype),)
    text = _lower_for_h100(
        lambda q, k, v, *bias: mosaic_forward(static, q, k, v, *(bias or (None,)), metas, operands),
        *_shapes(b, t, s, n, kh, h), *bias)
    assert text.count("mosaic_gpu_v2") == 1


def test_tile_inputs_fit_shared_memory_or_are_refused():
    """Bias and dense mask slots shrink to fit beside Q, K and V; what cannot fit one slot
    each (a float32 bias and a dense mask at head dim 128) is refused, and dispatch takes
    the Triton kernels."""
    from pallas_kernels.mosaic_gpu.tile_inputs import plan_tile_inputs
    plan = functools.partial(plan_tile_inputs, bias_route="tile", bias_scale=1.0, block_kv=128,
                             stages=2)
    d128 = SMEM_BYTES - mosaic_gpu.config_for_head_dim(128).smem_bytes(128, 2)
    assert plan(bias_dtype=jnp.bfloat16, dense_positions=(), budget=d128).bias_stream.slots == 2
    assert plan(bias_dtype=jnp.float32, dense_positions=(), budget=d128).bias_stream.slots == 1
    both = plan(bias_dtype=jnp.bfloat16, dense_positions=(0,), budget=d128)
    assert (both.bias_stream.slots, both.dense_streams[0].slots) == (1, 2)
    with pytest.raises(NotImplementedError, match="shared memory"):
        plan(bias_dtype=jnp.float32, dense_positions=(0,), budget=d128)


def test_bias_calls_run_the_triton_backward_and_lower_with_dbias():
    """A bias (or a dense mask) makes default_config pick the Triton backward, which
    computes dbias; the forward stays Mosaic, behind its finite-input check for segment
    ids (one cond: the Triton backward zeroes unattended rows itself)."""
    mask = M.causal_document_mask(_documents([70, 186]))
    request = _request(has_bias=True, bias_shape=(1, 2, 256, 256), operand_kinds=(("q", None), ("kv", None)))
    cfg = mosaic_gpu.default_config(request)
    assert cfg.triton_backward and cfg.finite_check
    assert cfg.backward == triton_config_for_head_dim(128)
    assert mosaic_gpu.default_config(_request(operand_kinds=(("qkv", None),))).triton_backward
    assert not mosaic_gpu.default_config(_request()).triton_backward
    static, metas, operands = prepare_call("pallas_mosaic_gpu", mask, 256, 256, scale=128 ** -0.5,
                                           logits_soft_cap=None, config=cfg, interpret=False)

    def loss(q, k, v, bias):
        out, _ = flash_attention(static, q, k, v, bias, metas, operands)
        return jnp.sum(out.astype(jnp.float32))

    text = _lower_for_h100(jax.grad(loss, argnums=(0, 1, 2, 3)), *_shapes(1, 256, 256, 2, 1, 128),
                           jax.ShapeDtypeStruct((1, 2, 256, 256), jnp.float32))
    assert text.count("mosaic_gpu_v2") == 1 and text.count("stablehlo.case") == 1
    assert text.count("__gpu$xla.gpu.triton") == 3   # forward fallback, dK/dV, dQ (with dS)


@pytest.mark.parametrize("h, mosaic_kernels, mask, cap", [
    (128, 3, M.CausalMask(), None),
    (256, 3, M.CausalMask(), None),
    (128, 3, M.causal_document_mask(_documents([70, 186])), 20.0),   # segments + soft cap
], ids=["causal D128", "causal D256", "documents soft cap D128"])
def test_gradient_lowers_for_h100(h, mosaic_kernels, mask, cap):
    """Forward, dK/dV and dQ are Mosaic kernels (at D256 the dK/dV warpgroups split the
    columns).
    Documents (traced segment ids: unattended keys may sit in PARTIAL tiles): each of the
    three Mosaic kernels sits in a cond beside its Triton fallback for NaN/Inf inputs."""
    static, metas, operands = _call(mask, 256, 256, h, cap=cap)

    def loss(q, k, v):
        out, _ = flash_attention(static, q, k, v, None, metas, operands)
        return jnp.sum(out.astype(jnp.float32))

    text = _lower_for_h100(jax.grad(loss, argnums=(0, 1, 2)), *_shapes(1, 256, 256, 2, 1, h))
    checked = mask.is_dynamic
    assert text.count("mosaic_gpu_v2") == mosaic_kernels
    assert text.count("stablehlo.case") == (2 if checked else 0)   # forward, backward
    triton_kernels = text.count("__gpu$xla.gpu.triton")
    assert triton_kernels == (3 if checked else 0)


def test_finite_check_stays_one_cond_under_vmap():
    """Under vmap a per-example finite flag would turn the cond into a select running both
    the Mosaic and the Triton kernels on every call: the flag is one for the batch."""
    static, metas, operands = _call(M.causal_document_mask(_documents([70, 186])), 256, 256, 128)

    def forward(q, k, v):
        return flash_attention(static, q, k, v, None, metas, operands)[0]

    shapes = [jax.ShapeDtypeStruct((3, *x.shape), x.dtype) for x in _shapes(1, 256, 256, 2, 1, 128)]
    text = _lower_for_h100(jax.vmap(forward), *shapes)
    assert text.count("stablehlo.case") == 1
    assert text.count("mosaic_gpu_v2") == 1 and text.count("__gpu$xla.gpu.triton") == 1


def test_every_shipped_config_fits_shared_memory():
    for h in (64, 128, 256):
        cfg = mosaic_gpu.config_for_head_dim(h)
        assert cfg.smem_bytes(h, 2) <= SMEM_BYTES
        assert cfg.metadata_tiles()["forward"] == (128, cfg.block_kv)
    assert not mosaic_gpu.config_for_head_dim(256).triton_backward
    assert not mosaic_gpu.config_for_head_dim(128).triton_backward


def test_config_checks_itself():
    with pytest.raises(ValueError, match="block_q must be 128"):
        MosaicConfig(block_q=64)
    with pytest.raises(ValueError, match="multiple of 64"):
        MosaicConfig(block_kv=96)
    with pytest.raises(ValueError, match="num_stages"):
        MosaicConfig(num_stages=0)
    with pytest.raises(ValueError, match="MosaicBackwardConfig or a TritonConfig"):
        MosaicConfig(backward=None)
    tiles = MosaicConfig(backward=TritonConfig()).metadata_tiles()
    assert tiles["forward"] == (128, 128) and tiles["dq"] == (TritonConfig().block_q_dq,
                                                              TritonConfig().block_kv_dq)


def test_padded_head_dim():
    assert [mosaic_gpu.padded_head_dim(h) for h in (8, 64, 65, 128, 200, 256)] == \
        [64, 64, 128, 128, 256, 256]
    with pytest.raises(NotImplementedError, match="256"):
        mosaic_gpu.padded_head_dim(257)


def _request(**changes):
    base = dict(dtype=jnp.bfloat16, head_dim=128, q_len=1024, kv_len=1024, num_heads=8,
                num_kv_heads=2, batch=1, has_bias=False, bias_shape=None, operand_kinds=(),
                has_partial_tiles=True, logits_soft_cap=None, dropout_rate=0.0, has_score_mod=False,
                platform="gpu",
                device_kind="NVIDIA H200")
    return types.SimpleNamespace(**{**base, **changes})


def test_supports_serves_what_the_kernels_run():
    assert mosaic_gpu.supports(_request()) is None
    assert mosaic_gpu.supports(_request(dtype=jnp.float16, head_dim=256)) is None
    assert mosaic_gpu.supports(_request(operand_kinds=(("block", (128, 256)),))) is None
    assert mosaic_gpu.supports(_request(operand_kinds=(("q", None), ("kv", None)))) is None
    assert mosaic_gpu.supports(_request(logits_soft_cap=30.0)) is None
    for bias_shape in [(1, 8, 1024, 1024), (1, 8, 1, 1024), (1, 1, 1024, 1), (1, 1, 1, 1)]:
        assert mosaic_gpu.supports(_request(has_bias=True, bias_shape=bias_shape)) is None
    assert mosaic_gpu.supports(_request(operand_kinds=(("qkv", None),))) is None
    assert mosaic_gpu.supports(_request(operand_kinds=(("block", (64, 128)),))) is None   # as dense tiles
    assert mosaic_gpu.supports(_request(has_bias=True, bias_shape=(1, 8, 1024, 1024),
                                        operand_kinds=(("qkv", None), ("q", None)))) is None


@pytest.mark.parametrize("changes, reason", [
    (dict(platform="cpu"), "sm90"),
    (dict(device_kind="NVIDIA A100-SXM4-80GB"), "sm90"),
    (dict(dtype=jnp.float32), "bfloat16/float16"),
    (dict(head_dim=512), "up to 256"),
    (dict(dropout_rate=0.1), "no attention dropout"),
    (dict(has_score_mod=True), "score_mod"),
])
def test_supports_declines_with_a_reason(changes, reason):
    assert reason in mosaic_gpu.supports(_request(**changes))


def test_supports_declines_interpret_mode():
    assert "interpreter" in mosaic_gpu.supports(_request(), interpret=True)


@pytest.mark.parametrize("mask", [M.CausalMask(),
                                  M.bigbird_mask(64, window=10, num_global=4, num_random_blocks=1,
                                                 block_size=16, causal=True)],
                         ids=["causal (FULL lists are runs)", "bigbird (listed FULL tiles)"])
def test_tile_walk_and_tma_offsets_in_the_interpreter(mask):
    """The producer's walk: step j of q-block i copies K tile (FULL list, then PARTIAL
    list)[j] by TMA at a data-dependent offset; checked against the lists in numpy."""
    bq, bk, t, d = 16, 8, 64, 8
    meta = build_block_metadata(mask, t, t, bq, bk)
    lists = TileLists.from_metadata(meta)
    nq, nk = t // bq, t // bk
    keys = jnp.arange(t * d, dtype=jnp.float32).reshape(1, t, 1, d)

    def body(fc, fi, pc, pi, k_ref, o_ref, smem, ready):
        qi = lax.axis_index("q")
        walk = lists.bind((fc, fi, pc, pi)).walker(jnp.int32(0), jnp.int32(0), qi)

        @pl.loop(0, walk.total)
        def _(step):
            plgpu.copy_gmem_to_smem(k_ref.at[0, pl.ds(walk.kv_block(step) * bk, bk), 0], smem,
                                    ready)
            plgpu.barrier_wait(ready)
            plgpu.copy_smem_to_gmem(smem, o_ref.at[qi, step])
            plgpu.wait_smem_to_gmem(0)

    walked = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((nq, nk, bk, d), jnp.float32),
                          grid=(nq,), grid_names=("q",),
                          scratch_types=(plgpu.SMEM((bk, d), jnp.float32), plgpu.Barrier()),
                          interpret=plgpu.InterpretGPUParams())
    got = np.asarray(jax.jit(walked)(*lists.arrays(), keys))
    m = jax.tree_util.tree_map(np.asarray, meta)
    for i in range(nq):
        blocks = [*m.full_index[0, 0, i, :m.full_count[0, 0, i]],
                  *m.partial_index[0, 0, i, :m.partial_count[0, 0, i]]]
        assert blocks, "every q-block sees some key under these masks"
        for j, blk in enumerate(blocks):
            np.testing.assert_array_equal(got[i, j], np.asarray(keys)[0, blk * bk:(blk + 1) * bk, 0])


def test_segment_operands_of_partial_tiles_in_the_interpreter():
    """The consumers' operand reads: a warpgroup's 64 query ids once ("q", one value per
    accumulator row) and, per PARTIAL step, the key ids at that step's data-dependent
    kv-block ("kv", one per column), broadcast over the tile and given to the mask;
    the mask values checked against the mask on every pair in numpy. T = 200, padded."""
    t, tp, bq, bk, rows = 200, 256, 128, 64, 64
    ids = jnp.asarray(np.repeat([0, 1, 2], [70, 60, 70])[None])
    mask = M.causal_document_mask(ids)
    meta = build_block_metadata(mask, t, t, bq, bk)
    lists = TileLists.from_metadata(meta)
    kinds = tuple((o.kind, o.layout_block) for o in mask.operands())
    operands = prepare_operands(tuple(o.array for o in mask.operands()), kinds, q_pad=tp, kv_pad=tp)
    wgmma = plgpu.Layout.WGMMA

    def body(fc, fi, pc, pi, q_ids, kv_ids, keep_ref):
        qi, half = lax.axis_index("q"), lax.axis_index("half")
        walk = lists.bind((fc, fi, pc, pi)).walker(jnp.int32(0), jnp.int32(0), qi)
        q_start = qi * bq + half * rows
        q_vec = OperandRef(q_ids, "q", None).vector(0, q_start, rows, wgmma.reduce(1))

        @pl.loop(walk.num_full, walk.total)
        def _(step):
            kv_start = walk.partial_block(step) * bk
            kv_vec = OperandRef(kv_ids, "kv", None).vector(0, kv_start, bk, wgmma.reduce(0))
            iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, (rows, bk), layout=wgmma)
            tiles = (lax.broadcast_in_dim(q_vec, (rows, bk), [0]),
                     lax.broadcast_in_dim(kv_vec, (rows, bk), [1]))
            keep = mask.evaluate(q_start + iota(0), kv_start + iota(1), tiles)
            keep_ref[qi, half, step] = keep.astype(jnp.int32)

    nq, nk = tp // bq, tp // bk
    walked = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((nq, 2, nk, rows, bk), jnp.int32),
                          grid=(nq, 2), grid_names=("q", "half"),
                          interpret=plgpu.InterpretGPUParams())
    got = np.asarray(jax.jit(walked)(*lists.arrays(), *operands))
    pos = np.arange(tp)
    seg = np.pad(np.asarray(ids)[0], (0, tp - t))
    allowed = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    m = jax.tree_util.tree_map(np.asarray, meta)
    checked = 0
    for i in range(nq):
        nf, npart = m.full_count[0, 0, i], m.partial_count[0, 0, i]
        for j, blk in enumerate(m.partial_index[0, 0, i, :npart]):
            for half in range(2):
                r0 = i * bq + half * rows
                want = allowed[r0:r0 + rows, blk * bk:(blk + 1) * bk]
                valid = (pos[r0:r0 + rows, None] < t) & (pos[None, blk * bk:(blk + 1) * bk] < t)
                np.testing.assert_array_equal(got[i, half, nf + j][valid], want[valid])
                checked += 1
    assert checked >= 4


@pytest.mark.parametrize("bias_shape, bias_dtype", [
    ((1, 2, 200, 200), jnp.float32), ((1, 1, 200, 200), jnp.bfloat16), ((1, 2, 1, 200), jnp.float32),
    ((1, 1, 200, 1), jnp.float32)], ids=["tile f32", "tile bf16", "per-key", "per-query"])
def test_bias_and_dense_mask_tiles_in_the_interpreter(bias_shape, bias_dtype):
    """The tile inputs of forward.py, run by three warpgroups in the Mosaic GPU interpreter:
    the producer copies each listed tile's bias rows (one 64-row half per consumer) by TMA
    into rotating slots, and a dense mask tile on PARTIAL steps only, into slots counted
    over PARTIAL steps; each consumer takes its half in the wgmma layout (or reads a
    per-key / per-query vector) and gets scale·s + bias. Checked against numpy on every
    visited tile of head 1 (T = 200, padded; FULL and PARTIAL tiles)."""
    from pallas_kernels.mosaic_gpu.tile_inputs import plan_tile_inputs, prepare_forward_bias
    t, tp, bq, bk, rows, head = 200, 256, 128, 64, 64, 1
    rng = np.random.default_rng(0)
    pos = np.arange(t)
    dense = (rng.random((t, t)) < 0.6) | (pos[:, None] >= pos[None, :] + 60)   # some FULL tiles
    mask = M.CausalMask() & M.DenseMask(dense)
    meta = build_block_metadata(mask, t, t, bq, bk)
    lists = TileLists.from_metadata(meta)
    kinds = tuple((o.kind, o.layout_block) for o in mask.operands())
    operands = tuple(arr for _, _, arr in prepare_forward_operands(
        tuple(o.array for o in mask.operands()), kinds, t, t, tp, tp, bq, bk))
    bias = jnp.asarray(rng.normal(size=bias_shape), bias_dtype)
    route, bias_arr = prepare_forward_bias(bias, q_pad=tp, kv_pad=tp)
    spec = plan_tile_inputs(bias_route=route, bias_dtype=bias_arr.dtype, bias_scale=0.5,
                            dense_positions=(0,), block_kv=bk, stages=2, budget=1 << 20)
    wgmma = plgpu.Layout.WGMMA

    def body(fc, fi, pc, pi, dense_ref, bias_ref, out_ref, keep_ref):
        wg, qi = lax.axis_index("wg"), lax.axis_index("q")
        walk = lists.bind((fc, fi, pc, pi)).walker(jnp.int32(0), jnp.int32(0), qi)

        def scoped(*scratch):
            inputs = spec.bind(bias_ref, (dense_ref,), scratch)

            @pl.when(wg == 2)
            def _producer():
                @pl.loop(0, walk.total)
                def _(step):
                    inputs.copy_step(step, step - walk.num_full, step >= walk.num_full, 0, head,
                                     qi * bq, walk.kv_block(step) * bk)
                # The interpreter wants every release observed by the thread that waits on
                # the barrier: wait for each slot's last release (the kernel need not).
                streams = [(inputs.dense_scratch[0], spec.dense_streams[0], walk.total - walk.num_full)]
                if spec.bias_stream:
                    streams.append((inputs.bias_scratch, spec.bias_stream, walk.total))
                for (_, _, consumed), stream, count in streams:
                    @pl.loop(jnp.maximum(count - stream.slots, 0), count)
                    def _(c):
                        plgpu.barrier_wait(consumed.at[lax.rem(c, stream.slots)])

            @pl.when(wg < 2)
            def _consumer():
                row_values = inputs.row_bias(0, head, qi * bq + wg * rows)

                @pl.loop(0, walk.total)
                def _(step):
                    col_values = inputs.col_bias(0, head, walk.kv_block(step) * bk, bk)
                    s = plgpu.layout_cast(jnp.full((rows, bk), 1.0, jnp.float32), wgmma)
                    out_ref[qi, wg, step] = inputs.add_bias(s, step_count=step, wg=wg,
                                                            row_values=row_values,
                                                            col_values=col_values)

                    @pl.when(step >= walk.num_full)
                    def _():
                        keep_ref[qi, wg, step] = inputs.dense_tiles(step - walk.num_full, wg)[0]

        pl.run_scoped(scoped, *spec.scratch_types(), collective_axes="wg")

    nq, nk = tp // bq, tp // bk
    kernel = plgpu.kernel(body, out_type=(jax.ShapeDtypeStruct((nq, 2, nk, rows, bk), jnp.float32),
                                          jax.ShapeDtypeStruct((nq, 2, nk, rows, bk), jnp.int32)),
                          grid=(nq,), grid_names=("q",), num_threads=3, thread_name="wg",
                          interpret=plgpu.InterpretGPUParams())
    got, keep = (np.asarray(x) for x in jax.jit(kernel)(*lists.arrays(), *operands, bias_arr))
    want_bias = np.broadcast_to(np.asarray(bias, np.float32)[0, head if bias_shape[1] > 1 else 0], (t, t))
    want_keep = dense
    m = jax.tree_util.tree_map(np.asarray, meta)
    seen = set()
    for i in range(nq):
        nf = m.full_count[0, 0, i]
        blocks = [*m.full_index[0, 0, i, :nf], *m.partial_index[0, 0, i, :m.partial_count[0, 0, i]]]
        for j, blk in enumerate(blocks):
            for half in range(2):
                r0, c0 = i * bq + half * rows, blk * bk
                r, c = slice(r0, min(r0 + rows, t)), slice(c0, min(c0 + bk, t))   # padding: any value
                if r.start >= r.stop:
                    continue
                valid = (slice(0, r.stop - r0), slice(0, c.stop - c0))
                np.testing.assert_allclose(got[i, half, j][valid], 0.5 + want_bias[r, c], rtol=1e-6)
                if j >= nf:
                    np.testing.assert_array_equal(keep[i, half, j][valid], want_keep[r, c])
                seen.add(j >= nf)
    assert seen == {False, True}, "both FULL and PARTIAL tiles checked"


@pytest.mark.parametrize("mask, t, s, isolates", [
    (M.CausalMask(), 1000, 1000, False),
    (M.LocalMask(256, 0, offset=512), 768, 1280, False),   # window at the cache end, aligned
    (M.bigbird_mask(1024, window=128, num_global=128, num_random_blocks=2, causal=True), 1024, 1024, False),
    (M.LocalMask(256, 0, offset=523), 777, 1300, True),    # its edges cut tiles
    (M.CausalMask(), 777, 1300, True),                     # keys past the last query
    (M.CausalMask(offset=-300), 700, 700, True),           # keys no query attends
    (M.LocalMask(100, 0) & M.CausalMask(), 1024, 1024, True),   # window edge inside a tile
], ids=["causal", "window-at-cache-end", "bigbird", "window-unaligned", "causal-T<S", "empty-rows",
                         "window100"])
def test_masks_that_leave_unattended_keys_in_a_tile_are_checked_or_refused(mask, t, s, isolates):
    """The Mosaic kernels do not zero K/V rows that no query of a PARTIAL tile attends,
    so NaN/Inf held there (padding, unwritten cache) would leak. Where the metadata says
    such rows exist, calls up to head dim 128 check their inputs (Triton kernels when
    non-finite: nonfinite_fallback.py); at head dim 256 they are refused and dispatch
    takes the Triton kernels."""
    prepare = functools.partial(prepare_call, "pallas_mosaic_gpu", mask, t, s, scale=1.0,
                                logits_soft_cap=None, interpret=False)
    static, metas, _ = prepare(config=mosaic_gpu.config_for_head_dim(128))
    assert nonfinite_fallback.forward_needs_check(metas) == isolates
    if isolates:
        with pytest.raises(NotImplementedError, match="NaN/Inf"):
            prepare(config=mosaic_gpu.config_for_head_dim(256))
    else:
        prepare(config=mosaic_gpu.config_for_head_dim(256))


def _stand_in_forward(static, q, k, v, bias, metas, operands):
    """The Mosaic forward's place in the finite check's cond on CPU: zeros, (out, lse)."""
    b, t, n, _ = q.shape
    return jnp.zeros_like(q), jnp.zeros((b, n, t), jnp.float32)


def _stand_in_backward(static, q, k, v, bias, out, lse, dout, delta, metas, operands, parts):
    """The Mosaic backward's place on CPU: zero gradients for the parts asked for."""
    dkdv = "dkdv" in parts
    return (jnp.zeros_like(q) if "dq" in parts else None, jnp.zeros_like(k) if dkdv else None,
            jnp.zeros_like(v) if dkdv else None, None)


def test_nonfinite_inputs_take_the_triton_kernels_on_the_mosaic_metadata():
    """The finite-input check's other branch, run on CPU: NaN/Inf in keys no query
    attends and in a query that attends no key send the call to the Triton kernels
    (Pallas interpret mode here), which walk the metadata built for the Mosaic tiles and
    zero those rows: results equal the reference on clean inputs. Finite inputs take
    the Mosaic branch (a stand-in returning zeros: the real kernels need a GPU)."""
    b, t, n, h = 1, 256, 2, 64
    q_ids = np.repeat([0, 1], [100, 156])[None]
    kv_ids = q_ids.copy()
    bad_keys, bad_query = np.r_[140:150, 250:256], 7
    kv_ids[:, bad_keys] = -1
    q_ids[:, bad_query] = -2
    mask = M.CausalMask() & M.SegmentMask(jnp.asarray(q_ids), jnp.asarray(kv_ids))
    static, metas, operands = _call(mask, t, t, h)
    assert nonfinite_fallback.forward_needs_check(metas)
    static = dataclasses.replace(static, interpret=True)
    ks = jax.random.split(jax.random.key(3), 4)
    q, k, v, do = (jax.random.normal(kk, (b, t, n if i in (0, 3) else 1, h)) for i, kk in enumerate(ks))
    dirty = (q.at[:, bad_query].set(jnp.nan), k.at[:, bad_keys].set(jnp.inf),
             v.at[:, bad_keys].set(jnp.nan))
    clean = (q.at[:, bad_query].set(0), k.at[:, bad_keys].set(0), v.at[:, bad_keys].set(0))

    def reference(q, k, v):
        return reference_attention(q, k, v, None, mask, scale=h ** -0.5, return_residuals=True)

    (out, lse), vjp = jax.vjp(reference, *clean)
    want = vjp((do, jnp.zeros_like(lse)))
    delta = jnp.einsum("btnh,btnh->bnt", do, out)

    @jax.jit
    def guarded(q, k, v):
        fwd = nonfinite_fallback.guarded_forward(_stand_in_forward, static, q, k, v, None, metas,
                                                 operands)
        bwd = nonfinite_fallback.guarded_backward(_stand_in_backward, static, q, k, v, None, out,
                                                  backward_lse(lse), do, delta, metas, operands,
                                                  ("dq", "dkdv"))
        return fwd, bwd[:3]

    (got_out, got_lse), grads = guarded(*dirty)
    np.testing.assert_allclose(got_out, out, atol=2e-5)
    finite = np.isfinite(np.asarray(lse))
    np.testing.assert_array_equal(np.isneginf(np.asarray(got_lse)), ~finite)   # the bad query
    np.testing.assert_allclose(np.asarray(got_lse)[finite], np.asarray(lse)[finite], atol=2e-5)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want):
        np.testing.assert_allclose(got, ref, atol=2e-4, err_msg=name)
    (zero_out, _), zero_grads = guarded(*clean)
    assert not np.any(np.asarray(zero_out)) and not any(np.any(np.asarray(g)) for g in zero_grads)


def test_the_finite_check_reads_only_rows_the_kernels_may_treat_differently():
    """A static mask's check gathers only the keys (queries) some PARTIAL tile holds
    unattended: there the Mosaic kernels would multiply NaN by a zero probability and
    the Triton ones zero the row. `Causal & ~Local(1, 0)` (a strided plan's part on its
    residue classes) leaves the last two keys and first two queries of each diagonal
    tile so. NaN there takes the Triton kernels; NaN at a key some row of every tile
    holding it attends reaches the same rows in both, and the check lets the Mosaic
    kernels (a stand-in returning zeros on CPU) run."""
    b, t, n, h = 1, 256, 2, 64
    mask = M.CausalMask() & NotMask(M.LocalMask(1, 0))
    static, metas, operands = _call(mask, t, t, h)
    positions = lambda raw: decode_positions(raw).tolist()
    assert positions(metas["forward"].isolated_keys) == [126, 127, 254, 255]
    assert positions(metas["dq"].isolated_keys) == [126, 127, 254, 255]
    assert positions(metas["dkdv"].isolated_queries) == [0, 1, 128, 129]
    static = dataclasses.replace(static, interpret=True)
    ks = jax.random.split(jax.random.key(4), 4)
    q, k, v, do = (jax.random.normal(kk, (b, t, n, h)) for kk in ks)
    out, lse = reference_attention(q, k, v, None, mask, scale=h ** -0.5, return_residuals=True)
    delta = jnp.einsum("btnh,btnh->bnt", do, out)

    @jax.jit
    def guarded(q, k, v):
        fwd = nonfinite_fallback.guarded_forward(_stand_in_forward, static, q, k, v, None, metas,
                                                 operands)[0]
        bwd = nonfinite_fallback.guarded_backward(_stand_in_backward, static, q, k, v, None, out,
                                                  backward_lse(lse), do, delta, metas, operands,
                                                  ("dq", "dkdv"))[0]
        return jnp.any(fwd != 0), jnp.any(bwd != 0)    # True: the Triton kernels ran

    assert guarded(q, k, v.at[:, 5].set(jnp.nan)) == (False, False)   # attended in its tiles
    assert guarded(q, k.at[:, 200].set(jnp.inf), v) == (False, False)
    assert guarded(q.at[:, 64].set(jnp.nan), k, v) == (False, False)
    assert guarded(q, k, v.at[:, 127].set(jnp.nan)) == (True, False)   # unattended in tile 0:
    assert guarded(q, k.at[:, 255].set(jnp.inf), v) == (False, True)   # V in the forward (P·V),
    assert guarded(q.at[:, 129].set(jnp.nan), k, v) == (False, True)   # K (dQ += dS·K) and Q
    # (dK += dSᵀ·Q) in the backward, whose dS is 0 where P is (V and D never multiply a 0)

    def backward_only(parts, q, k, v):
        grads = nonfinite_fallback.guarded_backward(
            _stand_in_backward, static, q, k, v, None, out, backward_lse(lse), do, delta, metas,
            operands, parts)[:3]
        return jnp.any(jnp.stack([jnp.any(g != 0) for g in grads if g is not None]))

    # A call that asks for one pass (ring attention's hops) checks what that pass multiplies.
    for parts, bad_k, bad_q in ((("dq",), True, False), (("dkdv",), False, True)):
        assert bool(jax.jit(functools.partial(backward_only, parts))(q, k.at[:, 255].set(jnp.inf), v)) is bad_k
        assert bool(jax.jit(functools.partial(backward_only, parts))(q.at[:, 129].set(jnp.nan), k, v)) is bad_q


def test_the_fused_backward_checks_k_where_its_dkdv_tiles_leave_keys_unattended():
    """The fused backward adds dQ += dS·K inside the dK/dV tiles (64 query rows): causal
    self-attention leaves keys unattended there (a diagonal tile's upper half), which the
    two-kernel backward's dQ tiles (128 rows) do not, so only the fused one is checked."""
    static, metas, _ = _call(M.CausalMask(), 1024, 1024, 128)
    parts = ("dq", "dkdv")
    assert not nonfinite_fallback.backward_needs_check(metas, parts)
    assert nonfinite_fallback.backward_needs_check(metas, parts, fused=True)
    fused = dataclasses.replace(static, config=dataclasses.replace(
        static.config, backward=dataclasses.replace(static.config.backward, fused=True)))
    assert nonfinite_fallback.fused_backward(fused, parts)
    assert not nonfinite_fallback.fused_backward(fused, ("dkdv",))
    assert not nonfinite_fallback.fused_backward(static, parts)


# ---------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------
GPU_CASES = {
    "full D128": (M.FullMask(), 2, 1024, 1024, 4, 4, 128, jnp.bfloat16),
    "causal D64 GQA ragged": (M.CausalMask(), 1, 1000, 1000, 4, 2, 64, jnp.bfloat16),
    "causal D256": (M.CausalMask(), 1, 512, 512, 2, 1, 256, jnp.bfloat16),
    "window T!=S f16": (M.LocalMask(256, 0), 1, 777, 1300, 4, 1, 128, jnp.float16),
    "bigbird": (M.bigbird_mask(1024, window=128, num_global=64, num_random_blocks=2,
                               causal=True), 1, 1024, 1024, 2, 2, 128, jnp.bfloat16),
    "strided D96": (M.CausalMask() & M.StridedMask(3), 1, 640, 640, 2, 2, 96, jnp.bfloat16),
    "empty rows": (M.CausalMask(offset=-256), 1, 768, 768, 2, 1, 128, jnp.bfloat16),   # aligned
    # traced segment ids (the "q" / "kv" operands), a soft cap (an optional last field)
    "documents GQA ragged": (M.causal_document_mask(jnp.asarray(np.stack([
        np.repeat(np.arange(4), [130, 300, 70, 500]), np.repeat(np.arange(2), [640, 360])]))),
        2, 1000, 1000, 4, 2, 128, jnp.bfloat16),
    "documents window soft cap D64": (M.causal_document_mask(_documents([700, 90, 490]))
                                      & M.LocalMask(300, 0), 1, 1280, 1280, 2, 1, 64,
                                      jnp.bfloat16, 30.0),
    "soft cap causal f16": (M.CausalMask(), 1, 1024, 1024, 4, 4, 128, jnp.float16, 20.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_forward_matches_reference_row_by_row(name):
    mask, b, t, s, n, kh, h, dtype, *cap = GPU_CASES[name]
    _check_rows_against_reference(mask, b, t, s, n, kh, h, dtype, cap[0] if cap else None)


# (mask, B, T, S, N, K, H, dtype, soft cap, bias shape, bias dtype)
GPU_BIAS_CASES = {
    "full bias f32 causal GQA ragged": (M.CausalMask(), 2, 1000, 1000, 4, 2, 128, jnp.bfloat16, None,
                                        (2, 4, 1000, 1000), jnp.float32),
    "full bias bf16 soft cap D64": (M.FullMask(), 1, 1024, 1024, 4, 4, 64, jnp.bfloat16, 30.0,
                                    (1, 4, 1024, 1024), jnp.bfloat16),
    "key bias [1,N,1,S] bigbird": (M.bigbird_mask(1024, window=128, num_global=64, num_random_blocks=2,
                                                  causal=True), 1, 1024, 1024, 2, 2, 128, jnp.bfloat16,
                                   None, (1, 2, 1, 1024), jnp.float32),
    "query bias [B,1,T,1] window T!=S f16": (M.LocalMask(256, 0), 2, 777, 1300, 4, 1, 128, jnp.float16,
                                             None, (2, 1, 777, 1), jnp.float32),
    "full bias D256 causal": (M.CausalMask(), 1, 512, 512, 2, 1, 256, jnp.bfloat16, None,
                              (1, 1, 512, 512), jnp.bfloat16),
    "dense mask per head T!=S": (M.DenseMask(np.random.default_rng(3).random((1, 4, 900, 1100)) < 0.3),
                                 1, 900, 1100, 4, 2, 128, jnp.bfloat16, None, None, None),
    # 256 work items: each persistent CTA runs two, its slot counters carried across them
    "dense causal mask + bias B4 H8 D64": (M.CausalMask() & M.DenseMask(
        np.random.default_rng(4).random((1024, 1024)) < 0.5), 4, 1024, 1024, 8, 8, 64, jnp.bfloat16,
        None, (4, 8, 1024, 1024), jnp.bfloat16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_BIAS_CASES))
def test_forward_with_bias_or_dense_mask_matches_reference_row_by_row(name):
    *case, bias_shape, bias_dtype = GPU_BIAS_CASES[name]
    bias = None if bias_shape is None else (
        2.0 * jax.random.normal(jax.random.key(3), bias_shape, jnp.float32)).astype(bias_dtype)
    _check_rows_against_reference(*case, bias=bias)


def _check_rows_against_reference(mask, b, t, s, n, kh, h, dtype, cap, bias=None):
    """Mosaic forward (out, lse) against the float32 reference, row by row; two runs
    bitwise identical."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, kh, h), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, kh, h), jnp.float32).astype(dtype)
    static, metas, operands = _call(mask, t, s, h, cap=cap)
    run = jax.jit(lambda q, k, v, bias: flash_attention(static, q, k, v, bias, metas, operands))
    out, lse = run(q, k, v, bias)
    out2, lse2 = run(q, k, v, bias)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
    ref_out, ref_lse = reference_attention(f32(q), f32(k), f32(v), f32(bias), mask, scale=h ** -0.5,
                                           logits_soft_cap=cap, return_residuals=True)
    row_err = np.abs(np.asarray(out, np.float32) - np.asarray(ref_out)).max(axis=(2, 3))
    assert row_err.max() <= (2e-2 if dtype == jnp.bfloat16 else 5e-3), np.argmax(row_err)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert np.abs(lse[finite] - ref_lse[finite]).max() <= 1e-3
    assert np.array_equal(np.asarray(out), np.asarray(out2))
    assert np.array_equal(lse, np.asarray(lse2))


@pytest.mark.gpu
@pytest.mark.parametrize("mask, t, n, kh, h", [
    (M.CausalMask(), 640, 4, 2, 256),
    # a window and global keys of whole 64-key tiles: at head dim 256, with no finite-
    # input check, the kernels serve only masks leaving no unattended key in a tile
    (M.bigbird_mask(640, window=128, num_global=64, num_random_blocks=1, block_size=128,
                    causal=True), 640, 2, 1, 256),
    (M.CausalMask(), 500, 2, 2, 200),                       # padded to 256, ragged T
], ids=["causal GQA D256", "bigbird D256", "causal D200 ragged"])
def test_head_dim_256_trains_on_the_hopper_kernels(mask, t, n, kh, h):
    """Through the public API, at head dim 256 (and 200, padded to it): the forward and
    both backward kernels are Mosaic ones (the dK/dV warpgroups split the columns), and
    the value and every gradient (<out, dO> + Σ lse, so the lse cotangent too) match the
    float32 reference row by row."""
    ks = jax.random.split(jax.random.key(4), 4)
    q, do = (jax.random.normal(x, (1, t, n, h), jnp.float32).astype(jnp.bfloat16) for x in ks[:2])
    k, v = (jax.random.normal(x, (1, t, kh, h), jnp.float32).astype(jnp.bfloat16) for x in ks[2:])
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def loss(impl):
        def value(q, k, v):
            out, lse = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                                     return_residuals=True)
            return jnp.sum(f32(out) * f32(do)) + jnp.sum(lse), out
        return value

    mine = jax.jit(jax.value_and_grad(loss("pallas_mosaic_gpu"), argnums=(0, 1, 2), has_aux=True))
    text = mine.lower(q, k, v).as_text()
    assert text.count("mosaic_gpu_v2") == 3 and "triton" not in text
    (_, out), grads = mine(q, k, v)
    (_, want_out), want = jax.jit(jax.value_and_grad(loss("reference"), argnums=(0, 1, 2),
                                                     has_aux=True))(f32(q), f32(k), f32(v))

    def worst_row(got, ref):
        got = np.asarray(got, np.float32).reshape(-1, h)
        ref = np.asarray(ref, np.float32).reshape(-1, h)
        norm = np.linalg.norm(ref, axis=-1)
        floor = 0.05 * np.sqrt(np.mean(norm ** 2))
        return float(np.max(np.linalg.norm(got - ref, axis=-1) / np.maximum(norm, floor)))
    assert worst_row(out, want_out) < 0.02, "out"
    for label, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert bool(jnp.all(jnp.isfinite(g))), label
        # D = rowsum(dO ∘ O) − dlse from the bf16 O moves near-zero rows by up to ~9 %
        assert worst_row(g, w) < 0.15, label


@pytest.mark.gpu
def test_documents_under_vmap_with_and_without_poison():
    """Segment ids on the GPU under vmap: a clean batch runs the Mosaic kernels; a batch
    with NaN in one example's padding keys (a segment no query has, so no row attends
    them, though PARTIAL tiles hold them) runs the Triton kernels for every example; both
    equal the float32 reference on clean inputs, padding queries (attending nothing) 0."""
    t, n, h = 1024, 2, 128
    kv_ids = np.repeat([0, 1, 2, -1], [300, 411, 250, 63])[None]
    q_ids = np.where(kv_ids < 0, -2, kv_ids)
    mask = M.CausalMask() & M.SegmentMask(jnp.asarray(q_ids), jnp.asarray(kv_ids))
    static, metas, operands = _call(mask, t, t, h)
    ks = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(kk, (3, 1, t, n, h), jnp.float32).astype(jnp.bfloat16) for kk in ks)
    run = jax.jit(jax.vmap(lambda q, k, v: flash_attention(static, q, k, v, None, metas, operands)[0]))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = np.asarray(jax.vmap(lambda q, k, v: reference_attention(f32(q), f32(k), f32(v), None, mask,
                                                                   scale=h ** -0.5))(q, k, v))
    padding = kv_ids[0] < 0
    for poisoned in (False, True):
        vv = v.at[1, :, padding].set(jnp.nan) if poisoned else v
        got = np.asarray(run(q, k, vv), np.float32)
        err = np.abs(got - want).max()
        assert np.isfinite(got).all() and err <= 2e-2, (poisoned, err)



@pytest.mark.gpu
@pytest.mark.parametrize("mask, t, poison_k", [
    (M.CausalMask(), 320, True),
    (M.CausalMask(), 300, False),    # V only: the dK/dV kernel's last q-block is padded
    (M.CausalMask() & NotMask(M.LocalMask(1, 0)), 320, True),
], ids=["causal", "causal-padded-rows-v-only", "causal-minus-diagonal-pair"])
def test_static_mask_gradients_with_poisoned_unattended_keys_and_queries(mask, t, poison_k):
    """A static mask whose PARTIAL tiles hold keys no query attends (T < S: the keys past
    the last query share the last q-block's tiles) and, for the last mask, queries that
    attend nothing: NaN/Inf there reaches no output and no gradient. The forward's check
    sends it to the Triton kernels (V there is NaN). The backward's check reads K and Q at
    the listed rows only: in the first two cases K past the last query is Inf only where a
    dQ tile holds it (T = 320: none, so the Mosaic backward runs, its dS selected to 0
    where P is; T = 300 poisons V alone, and the padding rows 300–319 of the dK/dV kernel's
    last q-block must attend nothing); the last one's Q rows 0–1 send it to Triton."""
    b, s, n, h = 1, 512, 2, 128
    ks = jax.random.split(jax.random.key(5), 4)
    q, k, v, do = (jax.random.normal(kk, (b, length, n, h), jnp.float32)
                   for kk, length in zip(ks, (t, s, s, t)))
    bad_keys = np.arange(t, s)                       # attended by no query (causal, T < S)
    bad_queries = np.array([0, 1]) if isinstance(mask, M.AndMask) else np.zeros(0, int)
    clean = (q.at[:, bad_queries].set(0), k.at[:, bad_keys].set(0), v.at[:, bad_keys].set(0))
    dirty = (q.at[:, bad_queries].set(jnp.nan),
             k.at[:, bad_keys].set(jnp.inf) if poison_k else clean[1],
             v.at[:, bad_keys].set(jnp.nan))

    def loss(impl, q, k, v):
        out = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * do), out

    def run(impl, xs):
        (_, out), grads = jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2),
                                             has_aux=True)(*xs)
        return out, grads

    bf16 = tuple(x.astype(jnp.bfloat16) for x in dirty)
    out, grads = jax.jit(functools.partial(run, "pallas_mosaic_gpu"))(bf16)
    want_out, want_grads = jax.jit(functools.partial(run, "reference"))(clean)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads)):
        got = np.asarray(got, np.float32)
        assert np.isfinite(got).all(), name
        err = np.abs(got - np.asarray(want)).max(axis=(0, 2, 3))      # worst per row
        assert (err <= 4e-2 * max(1.0, float(np.abs(np.asarray(want)).max()))).all(), (name, err.max())
    assert not np.asarray(grads[1], np.float32)[:, bad_keys].any()
    assert not np.asarray(grads[2], np.float32)[:, bad_keys].any()


@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("nq, heads, batch, ctas", [(16, 20, 1, 132), (3, 5, 2, 7), (8, 40, 1, 132)])
def test_persistent_schedule_covers_every_item_once_and_balances_causal_work(nq, heads, batch, ctas,
                                                                              balance):
    """The persistent CTAs' shares (lax.axis_index evaluated under vmap) hold every
    (q-block, head, batch row) exactly once, and causal work (q-block q costs q + 1
    tiles) is spread evenly: within 20 % of the mean in the worst CTA here, where
    dealing q-blocks fastest in plain rounds put 1.7–1.8x the mean on one CTA."""
    sched = Schedule(nq, heads, batch, True, ctas, balance=balance)
    shares = _cta_shares(sched)
    got = sorted(item for share in shares for item in share)
    want = sorted((q, h, b) for q in range(nq) for h in range(heads) for b in range(batch))
    assert got == want
    load = np.array([sum(q + 1 for q, _, _ in share) for share in shares])
    if balance and sched.num_items >= 2 * ctas:
        assert load.max() <= 1.2 * load.mean(), load
    # The host-side model of the deal (what the table is judged against) is this deal.
    work = np.broadcast_to(np.arange(nq) + 1, (batch, heads, nq)).reshape(-1)
    np.testing.assert_array_equal(dealt_loads(sched, work), load)


def _cta_shares(sched):
    """Each CTA's items [(q-block, head, batch row), ...] in its order, from the kernel's
    own item arithmetic (lax.axis_index("cta") under vmap)."""
    ctas = sched.num_ctas
    rounds = max(-(-sched.num_items // ctas),
                 0 if sched.table is None else int(np.asarray(sched.table[1]).shape[1]))

    def share(_):
        items = jnp.stack([jnp.stack(sched.item(jnp.int32(i))) for i in range(rounds)])
        return sched.my_item_count(), items
    counts, items = jax.vmap(share, axis_name="cta")(jnp.arange(ctas))
    counts, items = np.asarray(counts), np.asarray(items)
    return [[tuple(int(x) for x in items[c, i]) for i in range(counts[c])] for c in range(ctas)]


@pytest.mark.parametrize("batch, heads", [(1, 16), (2, 3)])
def test_bigbird_work_is_dealt_by_a_balanced_table(batch, heads):
    """BigBird's global q-blocks visit every kv-block, the others about a tenth of them:
    both arithmetic deals give every CTA the same number of items, so the CTAs holding a
    global q-block carry ~1.5x the mean work. The table deal (longest first, built from
    the metadata's static tile counts) is chosen, covers every item once, and keeps the
    busiest CTA within 10 % of the mean or at the largest single item (with 3 heads,
    132 CTAs share 384 items)."""
    t = 8192
    mask = M.bigbird_mask(t, window=256, num_global=256, num_random_blocks=3, block_size=128,
                          causal=False, seed=0)
    meta = build_block_metadata(mask, t, t, 128, 128)
    nq = t // 128
    base = Schedule(nq, heads, batch, True, min(132, nq * heads * batch), balance=not meta.even_q_work)
    sched = balanced_deal(base, meta)
    assert sched.table is not None
    work = item_work(meta.tile_counts, meta.full_count.shape, nq, heads, batch)
    dealt = dealt_loads(base, work)
    shares = _cta_shares(sched)
    assert sorted(i for s in shares for i in s) == sorted(
        (q, h, b) for q in range(nq) for h in range(heads) for b in range(batch))
    flat = lambda q, h, b: (b * heads + h) * nq + q  # noqa: E731
    load = np.array([sum(work[flat(*i)] for i in s) for s in shares])
    assert load.max() <= max(1.1 * load.mean(), work.max()), load
    assert load.max() < 0.8 * dealt.max() and dealt.max() >= 1.3 * dealt.mean(), (load, dealt)


def test_documents_work_is_dealt_in_a_sorted_snake():
    """Packed causal documents: segment ids are data, so the tile counts are tracers and
    the items are sorted by work on the device, then dealt in a snake. Every item once;
    the busiest CTA within 10 % of the mean, where the snake by q-block put 1.3x on it."""
    t, heads = 16384, 16
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, t), 7, replace=False))
    ids = np.repeat(np.arange(8), np.diff(np.r_[0, cuts, t]))[None]
    meta = build_block_metadata(M.causal_document_mask(jnp.asarray(ids, jnp.int32)), t, t, 128, 128)
    assert meta.tile_counts is None
    nq = t // 128
    base = Schedule(nq, heads, 1, True, 132, balance=not meta.even_q_work)
    sched = balanced_deal(base, meta)
    assert sched.order is not None and sched.balance
    shares = _cta_shares(sched)
    assert sorted(i for s in shares for i in s) == sorted((q, h, 0) for q in range(nq) for h in range(heads))
    fc, pc = np.asarray(meta.full_count), np.asarray(meta.partial_count)
    work = item_work(encode_tile_counts(fc, pc), fc.shape, nq, heads, 1)
    load = np.array([sum(work[h * nq + q] for q, h, _ in s) for s in shares])
    dealt = dealt_loads(base, work)
    assert load.max() <= 1.1 * load.mean() and dealt.max() >= 1.3 * dealt.mean(), (load, dealt)


@pytest.mark.parametrize("mask", [M.FullMask(), M.CausalMask(), M.LocalMask(256, 0)],
                         ids=["full", "causal", "window"])
def test_evenly_dealt_masks_keep_their_arithmetic_deal(mask):
    t = 8192
    meta = build_block_metadata(mask, t, t, 128, 128)
    sched = Schedule(t // 128, 16, 1, True, 132, balance=not meta.even_q_work)
    assert balanced_deal(sched, meta) is sched


@pytest.mark.parametrize("mask", [M.CausalMask(), M.bigbird_mask(8192, window=256, num_global=256,
                                                                  num_random_blocks=3, block_size=128,
                                                                  causal=True, seed=0),
                                  M.causal_document_mask(_documents([3000, 700, 1500, 2992]))],
                         ids=["causal", "bigbird", "documents"])
def test_persistent_dkdv_deal_balances_the_transposed_work(mask):
    """The persistent dK/dV kernel deals kv-blocks by the transposed lists' work
    (schedule.dealt_by_counts): the LPT table from the static counts, or, for data masks
    (segment ids), a snake over the items sorted on the device. Every item once, the
    heaviest first (kv-block 0 under a causal mask; BigBird's global keys, ~5x the rest),
    the busiest CTA within 10 % of the mean (25 % for the sorted snake)."""
    from pallas_kernels.metadata import decode_tile_counts
    from pallas_kernels.mosaic_gpu.schedule import dealt_by_counts
    t, heads = 8192, 16
    meta = build_block_metadata(mask, t, t, 64, 128)
    nk = t // 128
    static = (None if meta.t_tile_counts is None else
              decode_tile_counts(meta.t_tile_counts, meta.t_full_count.shape))
    assert (static is None) == mask.is_dynamic
    sched = dealt_by_counts(Schedule(nk, heads, 1, True, 132), static, meta.t_full_count,
                            meta.t_partial_count)
    assert (sched.table is not None) == (static is not None)
    shares = _cta_shares(sched)
    assert sorted(i for s in shares for i in s) == sorted((j, h, 0) for j in range(nk) for h in range(heads))
    tf, tp = np.asarray(meta.t_full_count)[0, 0], np.asarray(meta.t_partial_count)[0, 0]
    work = tf + 2 * tp + 1
    assert work[shares[0][0][0]] == work.max()
    load = np.array([sum(work[j] for j, _, _ in s) for s in shares])
    # the table places every item; the sorted snake only alternates directions
    assert load.max() <= (1.1 if static is not None else 1.25) * load.mean(), (load.max(), load.mean())
