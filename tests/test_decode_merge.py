"""The Triton decode kernels' packed layout: the split-merge kernel against a plain
log-sum-exp merge, and whole decodes whose packed query rows (Tq·N/K) and head dim are
not powers of two (interpret mode), and their lowering for an H100. Interpret mode
drops a store past an array's end, so only the GPU-tier case below can catch a store of
a tile's padding rows or columns; on CPU the masked loads are what these tests check."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import masks as M
from jaxattn.decode import kernel_decode
from pallas_kernels.triton.decode import DecodeConfig
from pallas_kernels.triton.decode_merge import merge_launch, merge_splits
from helpers import lower_for_h100
from test_decode import _assert_close, _caches, _decode, _query


def _lse_merge(out_s, lse_s):
    """The definition: lse = log Σ_s exp(lse_s), out = Σ_s exp(lse_s - lse) · out_s; a
    row no split saw gives out 0, lse -inf."""
    lse = jax.nn.logsumexp(lse_s, axis=2)
    weight = jnp.where(jnp.isneginf(lse)[:, :, None], 0.0, jnp.exp(lse_s - lse[:, :, None]))
    return jnp.sum(weight[..., None] * out_s, axis=2), lse


@pytest.mark.parametrize("s, per_step", [(37, 64), (300, 128)])
def test_merge_kernel_is_the_log_sum_exp_merge(s, per_step):
    # 11 packed rows, head dim 40, 37 or 300 splits: none a power of two. The kernel runs
    # tiles of [8, 16] (2 row blocks, the second with 3 real rows; 3 column blocks, the
    # last with 8 real columns) and steps of up to 128 splits: 37 splits in one step of
    # 64 (27 past S), 300 in three of 128 (84 past S), rescaled between steps.
    b, k, rows, h = 2, 2, 11, 40
    launch = merge_launch(b, k, s, rows, h, 64)
    assert (launch.rows, launch.columns, launch.per_step) == (8, 16, per_step)
    rng = np.random.default_rng(0)
    out_s = rng.standard_normal((b, k, s, rows, h)).astype(np.float32)
    lse_s = (40 * rng.standard_normal((b, k, s, rows))).astype(np.float32)   # wide range
    lse_s[rng.random(lse_s.shape) < 0.3] = -np.inf   # splits that saw no key: weight 0
    lse_s[0, 1, :, 2] = -np.inf                      # a row no split saw
    lse_s[1, 0, 1:, 0] = -np.inf                     # a row only split 0 saw
    lse_s[1, 0, 0, 0] = 3.0

    @jax.jit
    def both(out_s, lse_s):
        got = merge_splits(out_s, lse_s, hp=64, out_dtype=jnp.float32, interpret=True)
        return got, _lse_merge(out_s, lse_s)

    (go, gl), (wo, wl) = both(out_s, lse_s)
    np.testing.assert_allclose(go, wo, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.isneginf(gl), np.isneginf(wl))
    finite = np.isfinite(np.asarray(wl))
    np.testing.assert_allclose(np.asarray(gl)[finite], np.asarray(wl)[finite], rtol=1e-6)
    assert np.all(np.asarray(go)[0, 1, 2] == 0) and np.isneginf(gl[0, 1, 2])
    np.testing.assert_allclose(go[1, 0, 0], out_s[1, 0, 0, 0], rtol=1e-6)   # one split: itself


@pytest.mark.parametrize("num_splits", [1, 5])
def test_decode_with_rows_and_head_dim_not_powers_of_two(num_splits):
    # G = 3 query heads per KV head, Tq = 1: 3 packed rows; H = 24. Unwritten slots hold
    # NaN; lengths 0 returns zeros with lse -inf.
    (b, s, n, k, h, tq), lengths = (3, 80, 6, 2, 24, 1), [80, 0, 33]
    kc, vc = _caches(b, s, k, h, lengths)
    q = _query(b, tq, n, h)
    want = _decode("reference", q, kc, vc, lengths, mask=M.LocalMask(60, 0))
    got = _decode("pallas_triton", q, kc, vc, lengths, mask=M.LocalMask(60, 0), num_splits=num_splits)
    _assert_close(got, want)
    assert np.all(np.asarray(got[0][1]) == 0) and np.all(np.isneginf(got[1][1]))


def test_split_decode_lowers_for_h100(monkeypatch):
    # 3 packed rows (N 6, K 2, Tq 1), head dim 96 and 5 splits: the decode kernel's
    # masked loads and stores, then the merge kernel.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    b, tq, n, k, h = 2, 1, 6, 2, 96
    cache_shape = (b, 1000, k, h)

    def fn(q, kc, vc, lengths):
        return kernel_decode("pallas_triton", q, kc, vc, lengths, None, M.FullMask(), scale=0.1,
                             logits_soft_cap=None, num_splits=5, return_residuals=True,
                             interpret=False, config=DecodeConfig())
    sds = [jax.ShapeDtypeStruct((b, tq, n, h), jnp.bfloat16), jax.ShapeDtypeStruct(cache_shape, jnp.bfloat16),
           jax.ShapeDtypeStruct(cache_shape, jnp.bfloat16), jax.ShapeDtypeStruct((b,), np.int32)]
    text = lower_for_h100(fn, *sds)
    assert "jaxattn_flash_decode" in text and "jaxattn_decode_merge" in text


@pytest.mark.gpu
@pytest.mark.parametrize("h", [96, 40])
@pytest.mark.parametrize("num_splits", [1, 7, None])
def test_gpu_rows_and_head_dim_not_powers_of_two(num_splits, h):
    # On the GPU the padding rows and columns of one program's tile lie over the next
    # rows in memory: a store of them would corrupt a neighbour. 3 packed rows, H 96 or
    # 40 (the merge's last block of 16 columns is partly past H), bf16, ragged lengths
    # incl. 0, NaN in unwritten slots; worst error against float32.
    (b, s, n, k), lengths = (4, 4096, 6, 2), np.array([4096, 1000, 77, 0], np.int32)
    kc, vc = _caches(b, s, k, h, lengths)
    kc, vc, q = (jnp.asarray(x, jnp.bfloat16) for x in (kc, vc, _query(b, 1, n, h)))
    got_o, got_l = jaxattn.decode_attention(q, kc, vc, lengths=lengths, num_splits=num_splits,
                                            implementation="pallas_triton", return_residuals=True)
    want_o, want_l = jaxattn.decode_attention(*(x.astype(jnp.float32) for x in (q, kc, vc)),
                                              lengths=lengths, implementation="reference",
                                              return_residuals=True)
    assert not np.isnan(np.asarray(got_o, np.float32)).any()
    np.testing.assert_allclose(np.asarray(got_o, np.float32), want_o, atol=2e-2)
    np.testing.assert_array_equal(np.isneginf(got_l), np.isneginf(want_l))
    finite = np.isfinite(np.asarray(want_l))
    np.testing.assert_allclose(np.asarray(got_l)[finite], np.asarray(want_l)[finite], atol=2e-2)
