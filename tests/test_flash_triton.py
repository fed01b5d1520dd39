"""The Pallas-Triton kernels in interpret mode (CPU) against the reference.

Forward output, lse and dq/dk/dv for every mask kind and compositions, odd shapes (T, S
not multiples of the tile; head dims 40 and 96), GQA, T != S, soft cap and segments;
float64 gradient checks; empty rows; determinism; and lowering of every shipped kernel
configuration for an H100 (no GPU needed).

Padding note: the wrapper pads T, S and H with zeros before the kernels and slices the
results, so "padding never leaks" is proven by exact agreement with the reference on
ragged shapes (interpret mode fills any unwritten output with NaN, which would fail).
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import masks as M
from jaxattn.flash import pallas_attention
from pallas_kernels.triton.config import TritonConfig

IMPL = "pallas_triton"


def _inputs(b, t, s, n, k, h, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    kk = jax.random.normal(ks[1], (b, s, k, h), dtype)
    v = jax.random.normal(ks[2], (b, s, k, h), dtype)
    do = jax.random.normal(ks[3], (b, t, n, h), dtype)
    return q, kk, v, do


def _run(impl, q, k, v, do, mask, cap=None):
    """out, lse and the gradients of <out, do> + Σ finite lse (so dlse is exercised)."""
    def loss(q, k, v):
        out, lse = jaxattn.dot_product_attention(q, k, v, mask=mask, logits_soft_cap=cap,
                                                 implementation=impl, return_residuals=True)
        return jnp.sum(out * do) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)
    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads


def _assert_matches(shape, mask, cap=None, atol=2e-5):
    q, k, v, do = _inputs(*shape)
    ro, rl, rg = _run("reference", q, k, v, do, mask, cap)
    po, pl_, pg = _run(IMPL, q, k, v, do, mask, cap)
    assert not jnp.isnan(po).any() and not any(jnp.isnan(g).any() for g in pg)
    np.testing.assert_allclose(po, ro, atol=atol, rtol=1e-5)
    np.testing.assert_array_equal(np.isneginf(pl_), np.isneginf(rl))
    finite = np.isfinite(np.asarray(rl))
    np.testing.assert_allclose(np.asarray(pl_)[finite], np.asarray(rl)[finite], atol=atol, rtol=1e-5)
    for name, got, want in zip("qkv", pg, rg):
        np.testing.assert_allclose(got, want, atol=5 * atol, rtol=1e-4, err_msg=f"d{name}")


# (B, T, S, N, K, H), mask, soft cap
CASES = {
    "full_odd_lengths_gqa": ((2, 50, 77, 4, 2, 40), M.FullMask(), None),
    "causal_t_gt_s_d96": ((1, 70, 45, 2, 1, 96), M.CausalMask(), None),
    "causal_offset_decode": ((1, 20, 83, 2, 2, 32), M.CausalMask(offset=63), None),
    "local_softcap_mqa": ((1, 100, 100, 3, 1, 16), M.LocalMask(20, 5), 5.0),
    "longformer": ((1, 96, 96, 2, 2, 16), M.longformer_mask(8, 5, causal=True), None),
    "strided_or_global": ((1, 64, 64, 2, 2, 16), (M.CausalMask() & M.StridedMask(7)) | M.GlobalMask(3), None),
    "prefix_lm": ((1, 70, 70, 2, 2, 16), M.PrefixLMMask(23), None),
    # layout blocks that the 32x32 interpret tiles divide: the scalar "block" operand path
    "block_sparse_aligned": ((1, 128, 96, 2, 2, 16),
                             M.BlockSparseMask(np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], bool), 32, 32),
                             None),
    # layout blocks of 16 the tiles do not divide: expanded to a dense operand
    "bigbird_unaligned": ((1, 96, 96, 2, 2, 16),
                          M.bigbird_mask(96, window=8, num_global=4, num_random_blocks=1, block_size=16, causal=True),
                          None),
    # layout blocks (16, 48) the tiles do not divide, on ragged lengths (regression:
    # the expanded dense operand was padded twice)
    "block_sparse_unaligned_ragged": ((1, 40, 53, 1, 1, 16),
                                      M.BlockSparseMask(np.random.default_rng(3).random((3, 2)) < 0.6, 16, 48),
                                      None),
    "dense_random": ((2, 45, 60, 2, 2, 16), M.DenseMask(np.random.default_rng(0).random((45, 60)) < 0.2), None),
    "dense_per_head": ((1, 33, 40, 2, 1, 16), M.DenseMask(np.random.default_rng(1).random((1, 2, 33, 40)) < 0.5), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    shape, mask, cap = CASES[name]
    _assert_matches(shape, mask, cap)


def test_segments_documents_traced():
    """Causal document packing with segment ids passed through jit as traced values."""
    ids = jnp.asarray(np.repeat([0, 1, 2, 3], [30, 41, 9, 20])[None].repeat(2, 0))
    ids = ids.at[1].set(jnp.asarray(np.repeat([0, 1], [64, 36])))
    q, k, v, do = _inputs(2, 100, 100, 2, 1, 32)

    @jax.jit
    def both(ids, q, k, v):
        mask = M.causal_document_mask(ids)
        return _run("reference", q, k, v, do, mask), _run(IMPL, q, k, v, do, mask)

    (ro, rl, rg), (po, pl_, pg) = both(ids, q, k, v)
    np.testing.assert_allclose(po, ro, atol=2e-5)
    np.testing.assert_allclose(pl_, rl, atol=2e-5)
    for got, want in zip(pg, rg):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_empty_rows_give_zero_and_zero_grads():
    dense = np.random.default_rng(2).random((40, 50)) < 0.3
    dense[[0, 7, 33, 39]] = False  # rows with no allowed key
    q, k, v, do = _inputs(1, 40, 50, 2, 2, 16)
    out, lse, (dq, dk, dv) = _run(IMPL, q, k, v, do, M.DenseMask(dense))
    empty = [0, 7, 33, 39]
    assert np.all(np.asarray(out)[:, empty] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, empty]))
    assert np.all(np.asarray(dq)[:, empty] == 0)
    assert not any(np.isnan(np.asarray(g)).any() for g in (dq, dk, dv))


def test_all_masked_gives_zeros():
    q, k, v, do = _inputs(1, 20, 30, 1, 1, 16)
    out, lse, grads = _run(IMPL, q, k, v, do, M.CausalMask(offset=-100))
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_backward_bitwise_deterministic():
    q, k, v, do = _inputs(1, 64, 64, 4, 2, 16)
    mask = M.CausalMask() & M.LocalMask(20, 0)
    f = jax.jit(lambda q, k, v: _run(IMPL, q, k, v, do, mask)[2])
    a, b = f(q, k, v), f(q, k, v)
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_float64_check_grads():
    from jax.test_util import check_grads
    with jax.enable_x64(True):
        q, k, v, _ = _inputs(1, 37, 29, 2, 1, 16, dtype=jnp.float64)
        mask = M.CausalMask(offset=3) & M.LocalMask(9, 2)

        def f(q, k, v):
            return jaxattn.dot_product_attention(q, k, v, mask=mask, logits_soft_cap=4.0,
                                                 implementation=IMPL)
        check_grads(jax.jit(f), (q, k, v), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_explicit_config_and_validation():
    q, k, v, do = _inputs(1, 40, 40, 2, 2, 16)
    cfg = TritonConfig(block_q=16, block_kv=32, block_q_dkv=32, block_kv_dkv=16,
                       block_q_dq=16, block_kv_dq=16)
    out = pallas_attention(IMPL, q, k, v, None, M.CausalMask(), scale=0.25, logits_soft_cap=None,
                           return_residuals=False, config=cfg, interpret=True)
    ref = jaxattn.dot_product_attention(q, k, v, is_causal=True, scale=0.25, implementation="reference")
    np.testing.assert_allclose(out, ref, atol=2e-5)
    with pytest.raises(ValueError, match=r"block_q=24 must be a power of two"):
        TritonConfig(block_q=24)
    with pytest.raises(ValueError, match=r"num_warps=3"):
        TritonConfig(num_warps=3)


@pytest.mark.parametrize("bias_shape,mask,cap", [
    ((2, 4, 45, 60), M.CausalMask(offset=15), None),        # full [B, N, T, S]
    ((45, 60), M.LocalMask(10, 3) | M.GlobalMask(2), 3.0),  # shared [T, S], soft cap
    ((2, 1, 1, 60), None, None),                             # per-key (padding-style) bias
    ((1, 4, 45, 60), M.CausalMask(), None),                  # per query head, GQA 4/2
    ((1, 4, 1, 60), M.CausalMask(offset=15), None),          # per-head key bias: dK/dV kernel sums
    ((2, 1, 45, 1), M.CausalMask(offset=15), 2.0),           # per-query bias (soft cap: dbias ≠ 0)
])
def test_bias_values_and_grads_match_reference(bias_shape, mask, cap):
    q, k, v, do = _inputs(2, 45, 60, 4, 2, 16)
    bias = jax.random.normal(jax.random.key(5), bias_shape)

    @jax.jit
    def both(q, k, v, bias):
        def run(impl):
            def loss(q, k, v, bias):
                out = jaxattn.dot_product_attention(q, k, v, bias, mask=mask, logits_soft_cap=cap,
                                                    implementation=impl)
                return jnp.sum(out * do), out
            return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)
        return run("reference"), run(IMPL)

    ((_, ref), ref_grads), ((_, out), grads) = both(q, k, v, bias)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=name)


def test_constant_bias_gets_no_gradient_kernel_output():
    # A bias that is not differentiated (symbolic zeros in the custom VJP): the dQ kernel
    # has dQ as its only output, and no [B, N, T, S] dS is written.
    q, k, v, do = _inputs(1, 40, 40, 2, 2, 16)
    bias = jnp.ones((1, 2, 40, 40))

    def outputs_of_dq_kernel(argnums):
        def loss(q, k, v, bias):
            return jnp.sum(jaxattn.dot_product_attention(q, k, v, bias, implementation=IMPL) * do)
        lines = str(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(q, k, v, bias)).splitlines()
        found = []
        for i, line in enumerate(lines):
            if "= pallas_call[" in line:
                name = next(x for x in lines[i:] if "name=jaxattn_flash" in x)
                if "name=jaxattn_flash_dq" in name:   # outputs: the typed names left of "="
                    found.append(line.split("=")[0].count(":"))
        assert len(found) == 1
        return found[0]

    assert outputs_of_dq_kernel((0, 1, 2)) == 1
    assert outputs_of_dq_kernel((0, 1, 2, 3)) == 2


def test_minus_inf_bias_row_is_empty_not_nan():
    q, k, v, do = _inputs(1, 20, 30, 1, 1, 16)
    bias = jnp.zeros((1, 1, 20, 30)).at[:, :, 4].set(-jnp.inf)

    def loss(q, k, v):
        return jnp.sum(jaxattn.dot_product_attention(q, k, v, bias, implementation=IMPL) * do)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    out = jaxattn.dot_product_attention(q, k, v, bias, implementation=IMPL)
    assert np.all(np.asarray(out)[:, 4] == 0)
    assert not any(np.isnan(np.asarray(g)).any() for g in (out, *grads))


# ------------------------------------------------------------------------------------
# Lowering of every shipped configuration for an H100, on the CPU machine.
# ------------------------------------------------------------------------------------
_H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")


def _lower_for_h100(b, t, s, n, k, h, mask, dtype=jnp.bfloat16, cap=None, bias=None):
    """bias: None or the bias's shape (differentiated too)."""

    def fn(q, kk, v):
        bias_arr = jnp.zeros(bias, jnp.bfloat16) if bias else None

        def loss(q, kk, v, bias_arr):
            out = pallas_attention(IMPL, q, kk, v, bias_arr, mask, scale=h ** -0.5, logits_soft_cap=cap,
                                   return_residuals=False, interpret=False)
            return jnp.sum(out.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2) + ((3,) if bias else ()))(q, kk, v, bias_arr)

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=_H100)
    sds = [jax.ShapeDtypeStruct((b, t, n, h), dtype), jax.ShapeDtypeStruct((b, s, k, h), dtype),
           jax.ShapeDtypeStruct((b, s, k, h), dtype)]
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(*sds).lower(lowering_platforms=("cuda",)).as_text()
    # one forward and two backward kernels, all lowered through Triton
    for name in ("jaxattn_flash_forward", "jaxattn_flash_dkdv", "jaxattn_flash_dq"):
        assert name in text


@pytest.fixture
def pretend_gpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


@pytest.mark.parametrize("h,mask", [
    (64, M.CausalMask()),
    (128, M.bigbird_mask(512, window=64, num_global=16, num_random_blocks=1, block_size=128, causal=True)),
    (96, M.causal_document_mask(jnp.zeros((1, 512), jnp.int32))),
    (256, M.DenseMask(np.tril(np.ones((300, 300), bool)))),
    # per query head under GQA: the dK/dV kernel picks head g of its group in the same
    # indexer as the tile (a chained ref view does not lower on a GPU)
    (64, M.DenseMask(np.stack([np.tril(np.ones((300, 300), bool), k=-i) for i in range(4)])[None])),
])
def test_lowers_for_h100(pretend_gpu, h, mask):
    t = 300 if isinstance(mask, M.DenseMask) else 512
    _lower_for_h100(1, t, t, 4, 2, h, mask, cap=30.0 if h == 64 else None)


@pytest.mark.parametrize("bias_shape", [(1, 1, 384, 384), (1, 4, 384, 384), (2, 1, 1, 384),
                                        (1, 4, 1, 384), (2, 4, 384, 1)])
def test_bias_lowers_for_h100(pretend_gpu, bias_shape):
    # Every bias layout the kernels read differently (per head in the dK/dV kernel once
    # failed to lower on an H100: "No support for multiple indexers", not seen in interpret mode).
    _lower_for_h100(2, 384, 384, 4, 2, 128, M.CausalMask(), bias=bias_shape)


# ------------------------------------------------------------------------------------
# Explicit sharding (jax.make_mesh's default): batch- and head-sharded inputs run the
# kernel per shard; the result and gradients equal the unsharded reference.
# ------------------------------------------------------------------------------------
def test_explicit_batch_and_head_sharding():
    from jax.sharding import NamedSharding, PartitionSpec as P
    if jax.device_count() < 4:
        pytest.skip("needs 4 (simulated) devices")
    mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4])
    q, k, v, do = _inputs(2, 40, 40, 4, 2, 16)
    ids = jnp.asarray(np.stack([np.repeat([0, 1], [25, 15]), np.repeat([0, 1, 2], [10, 10, 20])]))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", None, "model", None)))  # noqa: E731

    def run(q, k, v, ids, impl):
        mask = M.causal_document_mask(ids)

        def loss(q, k, v):
            out = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
            return jnp.sum(out * do), out
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    run = jax.jit(run, static_argnums=4)
    (_, out), grads = run(put(q), put(k), put(v), jax.device_put(ids, NamedSharding(mesh, P("data"))),
                          IMPL)
    (_, ref), ref_grads = run(q, k, v, ids, "reference")
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(out, ref, atol=2e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_sequence_sharded_input_is_refused_for_ring_attention():
    from jax.sharding import NamedSharding, PartitionSpec as P
    if jax.device_count() < 2:
        pytest.skip("needs 2 (simulated) devices")
    mesh = jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2])
    q = jax.device_put(_inputs(1, 32, 32, 1, 1, 16)[0], NamedSharding(mesh, P(None, "seq")))
    with pytest.raises(NotImplementedError, match="ring_attention"):
        jax.jit(lambda q: jaxattn.dot_product_attention(q, q, q, implementation=IMPL))(q)
