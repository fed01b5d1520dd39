"""Ring attention (jaxattn.parallel) on 4 simulated CPU devices, against the reference.

Values and gradients of `ring_attention` must equal `dot_product_attention(...,
implementation="reference")` on the unsharded arrays for causal, windowed, segmented
(documents) and BigBird-style masks with GQA, with lengths that are not a multiple of
the zigzag chunk count; the backward must be bitwise deterministic. The per-shard mask
localisation (jaxattn.parallel.masks) is checked against the dense global mask with
numpy, for every mask type, without compiling anything.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks as M
from jaxattn.parallel import inverse_zigzag_permutation, ring_attention, zigzag_permutation
from jaxattn.parallel import backward as ring_backward_module
from jaxattn.parallel.hops import Packing
from jaxattn.parallel.plan import RingConfig, device_call
from jaxattn.parallel.masks import PiecewiseView, localize, merge_pieces
from pallas_kernels.metadata import EMPTY, FULL

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")

AXIS = "ctx"
T = 64


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4,), (AXIS,))


def _inputs(b=1, t=T, s=None, n=4, kh=2, h=16, seed=0):
    s = t if s is None else s
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32)
    k = jax.random.normal(ks[1], (b, s, kh, h), jnp.float32)
    v = jax.random.normal(ks[2], (b, s, kh, h), jnp.float32)
    do = jax.random.normal(ks[3], (b, t, n, h), jnp.float32)
    return q, k, v, do


def _compiled(fn, *args):
    """jit + AOT compile at XLA CPU backend optimisation level 0: the unrolled ring is
    a large program of small ops, and LLVM optimisation would take ~40% of the test
    time for no benefit at these sizes (numerics are unchanged: no fast-math)."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def _value_and_grads(attn):
    def loss(q, k, v, do, *extra):
        o = attn(q, k, v, *extra)
        return jnp.sum(o * do), o
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def _ring_and_reference_grads(ring, ref, q, k, v, do, x, wrap=None):
    """One compiled call: ((Σ out·dO, out), (dq, dk, dv, dx)) of `ring` and of `ref`, both
    called as attn(q, k, v, wrap(x)): x is the sinks, or the operand of a score function
    that `wrap` builds, so its gradient is compared too."""
    def grads(attn):
        def loss(q, k, v, x):
            o = attn(q, k, v, x if wrap is None else wrap(x))
            return jnp.sum(o * do), o
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)

    ring_grads, ref_grads = grads(ring), grads(ref)
    return _compiled(lambda *a: (ring_grads(*a), ref_grads(*a)), q, k, v, x)(q, k, v, x)


def _ring_vs_reference(mesh, make_mask, q, k, v, do, *extra, atol=2e-5, deterministic=False,
                       **ring_kw):
    """One jit: (out, dq, dk, dv) of the ring and of the reference, compared; with
    `deterministic`, a second run must give the same bits."""
    ring_kw.setdefault("implementation", "reference")

    def ring(q, k, v, *extra):
        return ring_attention(q, k, v, make_mask(*extra), mesh=mesh, axis_name=AXIS, **ring_kw)

    def ref(q, k, v, *extra):
        mask = make_mask(*extra)
        causal = ring_kw.get("is_causal", False)
        return jaxattn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                             implementation="reference")

    def both(q, k, v, do, *extra):
        return _value_and_grads(ring)(q, k, v, do, *extra), _value_and_grads(ref)(q, k, v, do, *extra)

    both = _compiled(both, q, k, v, do, *extra)
    ((_, out), grads), ((_, out_ref), grads_ref) = both(q, k, v, do, *extra)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_ref, *grads_ref)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert not jnp.isnan(got).any(), name
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol, rtol=1e-5, err_msg=name)
    if deterministic:
        (_, out2), grads2 = both(q, k, v, do, *extra)[0]
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (out2, *grads2)):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{name} changed between runs"


def _doc_ids(t=T, lengths=(10, 30, 3, 21)):
    assert sum(lengths) == t
    return jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)


# ---------------------------------------------------------------------------------
# Values and gradients against the reference (GQA: 4 query heads on 2 kv heads).
# ---------------------------------------------------------------------------------
# (mask, implementation of the per-step blocks, backward). The backward takes each
# block's gradients from the global residuals ("residual"), or re-runs the block under
# jax.vjp with an lse cotangent ("vjp": the path of implementations without their own).
CASES = {
    "causal": (lambda: M.CausalMask(), "reference", "residual"),
    "causal_window": (lambda: M.CausalMask() & M.LocalMask(5, 0), "reference", "vjp"),
    "two_sided_window": (lambda: M.LocalMask(6, 3), "xla", "residual"),  # piecewise view
    "bigbird": (lambda: M.bigbird_mask(T, window=3, num_global=4, num_random_blocks=1,
                                       block_size=8, causal=True, seed=1), "reference", "residual"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(mesh, name, monkeypatch):
    make_mask, implementation, backward = CASES[name]
    if backward == "vjp":
        monkeypatch.setattr(ring_backward_module, "_block_backward", lambda implementation: None)
    _ring_vs_reference(mesh, make_mask, *_inputs(), implementation=implementation)


def test_documents_traced_segment_ids_and_determinism(mesh):
    # Segment ids are traced jit arguments: the per-step skip is a lax.cond. The
    # backward sums dK/dV in ring order, so a second run gives the same bits.
    _ring_vs_reference(mesh, M.causal_document_mask, *_inputs(), _doc_ids(), deterministic=True)


def test_lengths_not_multiple_of_chunks_are_padded(mesh):
    # T = 58 and S = 46 are not multiples of 2P = 8: padded inside, padding never
    # attended; T != S (cross-attention shapes; causal in absolute positions).
    q, k, v, do = _inputs(t=58, s=46, n=2, kh=1, seed=3)
    _ring_vs_reference(mesh, lambda: None, q, k, v, do, is_causal=True)


def test_batch_axis_and_zigzag_layout():
    # A 2 x 2 mesh: batch over "data", sequence over "ctx"; inputs already in zigzag order.
    auto = jax.sharding.AxisType.Auto  # (an Auto mesh, where the others are Explicit)
    mesh = jax.make_mesh((2, 2), ("data", AXIS), axis_types=(auto, auto))
    q, k, v, do = _inputs(b=2, t=32, n=2, kh=2, seed=7)
    ids = jnp.asarray(np.stack([np.repeat([0, 1], [20, 12]), np.repeat([0, 1, 2], [5, 5, 22])]), jnp.int32)
    perm, inv = zigzag_permutation(32, 2), inverse_zigzag_permutation(32, 2)

    def run(q, k, v, ids):
        def ring(q, k, v):
            o = ring_attention(q[:, perm], k[:, perm], v[:, perm], M.causal_document_mask(ids),
                               mesh=mesh, axis_name=AXIS, batch_axis_name="data",
                               sequence_layout="zigzag", implementation="reference")
            return o[:, inv]
        ref = lambda q, k, v: jaxattn.dot_product_attention(  # noqa: E731
            q, k, v, mask=M.causal_document_mask(ids), implementation="reference")
        return _value_and_grads(ring)(q, k, v, do), _value_and_grads(ref)(q, k, v, do)

    ((_, out), grads), ((_, out_ref), grads_ref) = _compiled(run, q, k, v, ids)(q, k, v, ids)
    for got, want in zip((out, *grads), (out_ref, *grads_ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_bfloat16_inputs_float32_accumulators(mesh):
    # bf16 K/V travel in one buffer with the float32 dK/dV accumulators (viewed as
    # uint16): a wrong offset or view would scramble the gradients, not round them.
    q, k, v, do = (x.astype(jnp.bfloat16) for x in _inputs(seed=5))
    _ring_vs_reference(mesh, lambda: M.CausalMask(), q, k, v, do, atol=3e-2)


def test_packing_round_trips_mixed_dtypes():
    xs = (jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4) - 5.5,
          jnp.linspace(-1e30, 1e30, 10, dtype=jnp.float32).reshape(2, 5),
          jnp.array([jnp.nan, -jnp.inf, 1e-40], jnp.float32))
    packing = Packing.of(xs)
    buf = jax.jit(packing.pack)(xs)
    assert buf.ndim == 1 and buf.dtype == jnp.uint32 and buf.size == 12 // 2 + 10 + 3
    for a, b in zip(xs, jax.jit(packing.unpack)(buf)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    odd = (jnp.arange(5, dtype=jnp.bfloat16), xs[2])  # an odd count of bf16: padded
    got = Packing.of(odd).unpack(Packing.of(odd).pack(odd))
    assert np.array_equal(np.asarray(got[0]), np.asarray(odd[0])) and got[0].shape == (5,)


@pytest.mark.slow
def test_pallas_triton_blocks():
    # The Pallas kernels (interpret mode on CPU) as the per-step blocks, with a mask whose
    # local pieces need the piecewise position view inside the kernel and traced segment
    # ids; the backward runs the kernels' own dK/dV and dQ from the global residuals
    # (jaxattn.flash.pallas_backward). ~20 s of interpret-mode compiles; this is the path
    # ring attention takes on GPUs, so it runs in CI (deselect with -m "not slow").
    mesh = jax.make_mesh((2,), (AXIS,), devices=jax.devices()[:2])
    ids = jnp.asarray(np.repeat([0, 1, 2], [30, 26, 8])[None], jnp.int32)
    _ring_vs_reference(mesh, lambda ids: M.LocalMask(12, 4) & M.SegmentMask(ids),
                       *_inputs(n=2, kh=1), ids, implementation="pallas_triton", atol=5e-5)


# ---------------------------------------------------------------------------------
# The plan: zigzag balance, static skipping, and simple local masks for causal.
# ---------------------------------------------------------------------------------
def _config(p=4, t=T, s=T):
    return RingConfig(AXIS, p, t // (2 * p), s // (2 * p), t, s, 1.0, None, None)


def _allowed_pairs(call):
    lq, lk = sum(n for _, n in call.q_slices), sum(n for _, n in call.kv_slices)
    return int(np.asarray(call.mask.to_dense(lq, lk)).sum())


def test_zigzag_causal_is_balanced_and_simple():
    cfg, p, c = _config(), 4, T // 8
    for s in range(p):
        calls = [device_call(cfg, M.CausalMask(), d, (d - s) % p) for d in range(p)]
        # Every local problem is a plain CausalMask() (step 0) or FullMask() (later
        # steps, on half of the local rows or columns): what cuDNN and the kernels like.
        assert all(type(c_.mask) is (M.CausalMask if s == 0 else M.FullMask) for c_ in calls)
        if s == 0:
            assert all(c_.mask.offset == 0 for c_ in calls)
        # Same work on every device: 2c² allowed pairs per step (plus the c diagonal
        # pairs at step 0, where each chunk meets itself).
        work = {_allowed_pairs(c_) for c_ in calls}
        assert work == ({2 * c * c + c} if s == 0 else {2 * c * c}), (s, work)


def test_masked_steps_are_skipped_statically():
    cfg, p = _config(), 4
    window = M.CausalMask() & M.LocalMask(3, 0)
    calls = [[device_call(cfg, window, d, (d - s) % p) for d in range(p)] for s in range(p)]
    # A 3-token causal window reaches only the neighbouring chunk: most (device, step)
    # pairs compute nothing, decided at trace time.
    # Device d holds chunks (d, 7-d) of 8; only a kv chunk equal to or just before a
    # query chunk has work: 1 idle device at step 1, all 4 at step 2, 1 at step 3.
    assert [sum(c_ is None for c_ in row) for row in calls] == [0, 1, 4, 1]


def test_zigzag_permutation_helpers():
    perm = zigzag_permutation(16, 2)
    assert perm.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    assert np.array_equal(perm[inverse_zigzag_permutation(16, 2)], np.arange(16))
    with pytest.raises(ValueError, match="multiple of 2"):
        zigzag_permutation(10, 4)


# ---------------------------------------------------------------------------------
# Mask localisation: local masks equal the dense global mask gathered at the pieces.
# ---------------------------------------------------------------------------------
LOCAL_MASKS = {
    "full": M.FullMask(),
    "causal": M.CausalMask(),
    "causal_offset": M.CausalMask(offset=-5),
    "window": M.LocalMask(4, 2),
    "window_left_only": M.LocalMask(None, 3, offset=2),
    "strided": M.StridedMask(3, offset=1),
    "global": M.GlobalMask(5),
    "prefix": M.PrefixLMMask(11),
    "block_sparse": M.BlockSparseMask(np.random.default_rng(0).random((6, 12)) < 0.4, 8, 4),
    "dense_numpy": M.DenseMask(np.random.default_rng(1).random((40, 48)) < 0.5),
    "dense_traced": M.DenseMask(jnp.asarray(np.random.default_rng(2).random((40, 48)) < 0.5)),
    "segments": M.SegmentMask(jnp.asarray(np.repeat([0, 1, 2], [7, 20, 13])[None]),
                              jnp.asarray(np.repeat([0, 1, 2, 3], [9, 15, 20, 4])[None])),
    "bigbird": M.bigbird_mask(40, window=3, num_global=4, num_random_blocks=2, block_size=8,
                              kv_len=48),
    "causal_docs": M.CausalMask() & M.SegmentMask(jnp.asarray(np.repeat([0, 1], [25, 15])[None]),
                                                  jnp.asarray(np.repeat([0, 1, 2], [25, 15, 8])[None])),
    "or_of_views": (M.GlobalMask(3) | M.StridedMask(5)) & M.PrefixLMMask(20),
}
PIECES = [  # (q pieces, kv pieces) as (global_start, length); T = 40, S = 48
    (((0, 5), (35, 5)), ((0, 6), (42, 6))),   # zigzag chunks of device 0 (P = 4)
    (((15, 5), (20, 5)), ((6, 6), (36, 6))),  # adjacent q chunks merge into one piece
    (((8, 12),), ((8, 20),)),                 # one shifted piece each
    (((3, 7), (30, 9), (12, 4)), ((1, 5), (40, 8), (17, 3))),  # unaligned, unordered
]


# Masks holding traced data localise by gathering (eager jnp: slower), so fewer cases.
_DYNAMIC = ("dense_traced", "segments", "causal_docs")
LOCALIZE_CASES = [(m, p) for m, p in itertools.product(LOCAL_MASKS, range(len(PIECES)))
                  if m not in _DYNAMIC or p in (0, 3)]


@pytest.mark.parametrize("name,pieces", LOCALIZE_CASES)
def test_localize_matches_global_mask(name, pieces):
    mask = LOCAL_MASKS[name]
    qp, kp = (merge_pieces(x) for x in PIECES[pieces])
    rows = np.concatenate([np.arange(g, g + n) for g, n in qp])
    cols = np.concatenate([np.arange(g, g + n) for g, n in kp])
    want = np.asarray(mask.to_dense(40, 48))[..., rows[:, None], cols[None, :]]
    local = localize(mask, qp, kp)
    if local is None:
        assert not want.any()
        return
    got = np.asarray(local.to_dense(len(rows), len(cols)))
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)
    # Tile states are sound at several tile sizes: FULL tiles all allowed, EMPTY none.
    for bq, bk in ((4, 4), (8, 16), (5, 3))[:1 if local.is_dynamic else 3]:
        state = np.asarray(local.tile_state(len(rows), len(cols), bq, bk))
        state = state.reshape((-1,) + state.shape[-2:])[0]
        dense = np.broadcast_to(got, want.shape).reshape((-1,) + want.shape[-2:])[0]
        for i, j in np.ndindex(state.shape):
            tile = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            assert state[i, j] != FULL or tile.all()
            assert state[i, j] != EMPTY or not tile.any()


def test_localize_keeps_structured_masks_structured():
    # One contiguous piece re-parameterises instead of wrapping.
    assert localize(M.CausalMask(), ((16, 8),), ((14, 8),)) == M.CausalMask(offset=2)
    assert localize(M.LocalMask(3, 1), ((16, 8),), ((14, 8),)) == M.LocalMask(3, 1, offset=2)
    assert localize(M.CausalMask(), ((0, 8),), ((16, 8),)) is None
    assert isinstance(localize(M.CausalMask(), ((16, 8),), ((0, 8),)), M.FullMask)
    # The docstring's 4x6 example of the piecewise view.
    view = PiecewiseView(M.CausalMask(), ((0, 2), (4, 2)), ((0, 6),))
    np.testing.assert_array_equal(np.asarray(view.to_dense(4, 6)), np.array(
        [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool))
    # Zigzag pieces of a two-sided window need the piecewise view.
    assert isinstance(localize(M.LocalMask(6, 3), ((0, 8), (56, 8)), ((0, 8), (56, 8))), PiecewiseView)


# ---------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------
def test_errors(mesh):
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="axis_name: expected one of the mesh axes"):
        ring_attention(q, k, v, mesh=mesh, axis_name="seq")
    with pytest.raises(ValueError, match="sequence_layout='zigzag' needs T and S multiples of 2"):
        ring_attention(q[:, :60], k[:, :60], v[:, :60], mesh=mesh, axis_name=AXIS,
                       sequence_layout="zigzag")
    with pytest.raises(ValueError, match="sequence_layout: expected one of"):
        ring_attention(q, k, v, mesh=mesh, axis_name=AXIS, sequence_layout="striped")
    with pytest.raises(ValueError, match="batch_axis_name"):
        ring_attention(q, k, v, mesh=mesh, axis_name=AXIS, batch_axis_name=AXIS)
    with pytest.raises(ValueError, match="implementation"):
        ring_attention(q, k, v, mesh=mesh, axis_name=AXIS, implementation="nope")
    with pytest.raises(ValueError, match="head counts"):
        ring_attention(q[:, :, :3], k, v, mesh=mesh, axis_name=AXIS)


def test_sinks_values_and_gradients(mesh):
    """Sinks through the ring (the merge starts from them) equal the reference's,
    including d sinks (summed over every device's rows) and rows with no key."""
    q, k, v, do = _inputs(t=T - 6)     # padded inside: padded rows must not reach d sinks
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    mask = M.CausalMask(offset=-3)     # the first rows see only the sink

    ((got, got_out), got_g), ((want, want_out), want_g) = _ring_and_reference_grads(
        lambda q, k, v, s: ring_attention(q, k, v, mask, mesh=mesh, axis_name=AXIS, sinks=s,
                                          implementation="reference"),
        lambda q, k, v, s: jaxattn.dot_product_attention(q, k, v, mask=mask, sinks=s,
                                                         implementation="reference"),
        q, k, v, do, sinks)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=2e-5, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got_g, want_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------
# score_mod: every ring step's call sees the GLOBAL positions, batch row and head, so the
# ring equals the single-device reference with the same score function, in values,
# dq/dk/dv and the gradients of its floating operands (summed over steps and devices).
# ---------------------------------------------------------------------------------
def _per_row(score, batch, head, q_pos, kv_pos, temperature):
    """Depends on every argument: a wrong batch row, head or global position shows."""
    return (score * temperature[head] * (1.0 + 0.5 * batch.astype(score.dtype))
            - 0.05 * jnp.abs(q_pos - kv_pos).astype(score.dtype))


SCORE_CASES = {   # mask, score_mod of the operand, backward path, B, T, S, batch axis and zigzag
    "causal_alibi_learned_slopes_padded": (M.CausalMask(), jaxattn.alibi, "residual", 1, 58, 58, False),
    # batch split over a second mesh axis (fn's batch index must be the global row), and
    # inputs already in zigzag order (fn still sees natural positions)
    "window_per_row_vjp_batch_axis_zigzag": (M.LocalMask(7, 2), lambda x: jaxattn.ScoreMod(_per_row, x),
                                             "vjp", 2, 44, 52, True),
}


@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_score_mod_values_and_gradients(mesh, name, monkeypatch):
    mask, make_score, backward, b, t, s, batch_axis = SCORE_CASES[name]
    if backward == "vjp":
        monkeypatch.setattr(ring_backward_module, "_block_backward", lambda implementation: None)
    kw, perm_q, perm_kv, inv_q = {}, np.arange(t), np.arange(s), np.arange(t)
    if batch_axis:   # a 2 x 2 mesh: batch over "data", a ring of 2 over AXIS
        auto = jax.sharding.AxisType.Auto
        mesh = jax.make_mesh((2, 2), ("data", AXIS), axis_types=(auto, auto))
        kw = {"batch_axis_name": "data", "sequence_layout": "zigzag"}
        perm_q, perm_kv, inv_q = zigzag_permutation(t, 2), zigzag_permutation(s, 2), inverse_zigzag_permutation(t, 2)
    q, k, v, do = _inputs(b=b, t=t, s=s, seed=9)
    operand = jnp.asarray(jaxattn.alibi_slopes(4)) * 4.0   # steep: positions matter

    ((_, got), got_g), ((_, want), want_g) = _ring_and_reference_grads(
        lambda q, k, v, sm: ring_attention(
            q[:, perm_q], k[:, perm_kv], v[:, perm_kv], mask, mesh=mesh, axis_name=AXIS, score_mod=sm,
            implementation="reference", **kw)[:, inv_q],
        lambda q, k, v, sm: jaxattn.dot_product_attention(q, k, v, mask=mask, score_mod=sm,
                                                          implementation="reference"),
        q, k, v, do, operand, wrap=make_score)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    for name_, a, b in zip(("dq", "dk", "dv", "d_operand"), got_g, want_g):
        assert not np.isnan(np.asarray(a)).any(), name_
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5, err_msg=name_)


@pytest.mark.slow
def test_score_mod_pallas_triton_blocks():
    # The Triton kernels as the per-step blocks: fn inside the forward, dQ and dK/dV
    # kernels at global positions, and the slopes' gradient from the dK/dV kernel.
    mesh = jax.make_mesh((2,), (AXIS,), devices=jax.devices()[:2])
    q, k, v, do = _inputs(t=40, n=2, kh=1, seed=4)
    slopes = jnp.array([0.5, 0.25])

    ((got, got_out), got_g), ((want, want_out), want_g) = _ring_and_reference_grads(
        lambda q, k, v, sm: ring_attention(q, k, v, mesh=mesh, axis_name=AXIS, is_causal=True,
                                           score_mod=sm, implementation="pallas_triton"),
        lambda q, k, v, sm: jaxattn.dot_product_attention(q, k, v, is_causal=True, score_mod=sm,
                                                          implementation="reference"),
        q, k, v, do, slopes, wrap=jaxattn.alibi)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=5e-5, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dslopes"), got_g, want_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-5, err_msg=name)
