"""One test suite for every kernel backend, written once.

A backend joins by subclassing, in its own test file, with its implementation name and
its capability flags (what it declares it cannot do is asserted to raise
NotImplementedError, so dispatch can fall back):

    class TestMyBackend(KernelCases, InterpretOnlyCases):
        backend = "pallas_mybackend"
        supports_softcap = False

`KernelCases` are value and gradient checks against the reference (attention dropout
included: the same seed must drop the same pairs) that run on both tiers:
on CPU in Pallas interpret mode at the backend's interpret tiles (small odd shapes,
float32, element-wise tolerances), and on a GPU (tests/test_flash_gpu.py) at the
backend's real tiles on `length_scale`-times longer sequences in bfloat16, compared
row by row against a tolerance derived from a naive bfloat16 computation's own error
(`check` is the one method the GPU tier overrides). `InterpretOnlyCases` only make sense
on CPU: float64 gradient checks, lowering for an H100 without a GPU, explicit sharding on
simulated devices.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import masks as M
from jaxattn.dropout import dropout_keep
from jaxattn.flash import default_interpret, kernel_request, pallas_attention, prepare_call
from jaxattn.reference import allowed_pairs
from pallas_kernels.common import MASK_VALUE
from pallas_kernels.registry import get_backend
from helpers import lower_for_h100


def kernel_cases(f: int = 1):
    """name -> ((B, T, S, N, K, H), mask, soft cap); lengths and mask sizes times f.
    Every mask kind and composition, GQA/MQA, T != S, ragged lengths (not multiples of
    any tile), head dims 16/40/64/96/128."""
    rng = np.random.default_rng
    return {
        "full_odd_lengths_gqa_d40": ((2, 50 * f, 77 * f, 4, 2, 40), M.FullMask(), None),
        "causal_t_gt_s_d96": ((1, 70 * f, 45 * f, 2, 1, 96), M.CausalMask(), None),
        "causal_offset_decode_d64": ((1, 20 * f, 83 * f, 2, 2, 64), M.CausalMask(offset=63 * f), None),
        "local_softcap_mqa": ((1, 100 * f, 100 * f, 3, 1, 16), M.LocalMask(20 * f, 5 * f), 5.0),
        "longformer_d128": ((1, 96 * f, 96 * f, 2, 2, 128), M.longformer_mask(8 * f, 5, causal=True), None),
        "strided_or_global": ((1, 64 * f, 64 * f, 2, 2, 16),
                              (M.CausalMask() & M.StridedMask(7)) | M.GlobalMask(3), None),
        "prefix_lm": ((1, 70 * f, 70 * f, 2, 2, 16), M.PrefixLMMask(23 * f), None),
        # layout blocks that the tiles divide: the scalar "block" operand path
        "block_sparse_aligned": ((1, 128 * f, 96 * f, 2, 2, 16),
                                 M.BlockSparseMask(np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], bool),
                                                   32 * f, 32 * f), None),
        # layout blocks the tiles do not divide: expanded to a dense operand
        "bigbird_unaligned": ((1, 96 * f, 96 * f, 2, 2, 16),
                              M.bigbird_mask(96 * f, window=8 * f, num_global=4, num_random_blocks=1,
                                             block_size=16 * f + 8, causal=True), None),
        "block_sparse_unaligned_ragged": ((1, 40 * f, 53 * f, 1, 1, 16),
                                          M.BlockSparseMask(rng(3).random((3, 2)) < 0.6, 16 * f, 48 * f), None),
        "dense_random": ((2, 45 * f, 60 * f, 2, 2, 16), M.DenseMask(rng(0).random((45 * f, 60 * f)) < 0.2), None),
        "dense_per_head_gqa": ((1, 33 * f, 40 * f, 2, 1, 16),
                               M.DenseMask(rng(1).random((1, 2, 33 * f, 40 * f)) < 0.5), None),
    }


def bias_cases(f: int = 1):
    """(bias shape, mask, soft cap) for B=2, T=45f, S=60f, N=4, K=2: every layout the
    kernels read (and reduce dbias to) differently."""
    t, s = 45 * f, 60 * f
    return [
        ((2, 4, t, s), M.CausalMask(offset=15 * f), None),        # full [B, N, T, S]
        ((t, s), M.LocalMask(10 * f, 3 * f) | M.GlobalMask(2), 3.0),  # shared [T, S], soft cap
        ((2, 1, 1, s), None, None),                                # per-key (padding-style) bias
        ((1, 4, t, s), M.CausalMask(), None),                      # per query head, GQA 4/2
        ((1, 4, 1, s), M.CausalMask(offset=15 * f), None),         # per-head key bias: column sums
        ((2, 1, t, 1), M.CausalMask(offset=15 * f), 2.0),          # per-query bias (cap: dbias ≠ 0)
    ]


def dropout_cases(f: int = 1):
    """name -> ((B, T, S, N, K, H), mask, soft cap, bias shape or None, rate, broadcast):
    attention dropout with masks (FULL and PARTIAL tiles), GQA (the dK/dV kernel numbers
    query heads k·G + g), T != S, ragged lengths, a bias and its gradient, a soft cap,
    broadcast_dropout. (The full mask's path: test_dropout_deterministic_per_seed.)"""
    dense = np.random.default_rng(6).random((33 * f, 40 * f)) < 0.6
    return {
        "causal_gqa_ragged": ((2, 37 * f, 53 * f, 4, 2, 16), M.CausalMask(offset=16 * f), None, None,
                              0.3, False),
        "dense_bias_softcap_broadcast": ((1, 33 * f, 40 * f, 2, 1, 16), M.DenseMask(dense), 5.0,
                                         (1, 2, 33 * f, 40 * f), 0.5, True),
    }


def make_inputs(b, t, s, n, k, h, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    kk = jax.random.normal(ks[1], (b, s, k, h), dtype)
    v = jax.random.normal(ks[2], (b, s, k, h), dtype)
    do = jax.random.normal(ks[3], (b, t, n, h), dtype)
    return q, kk, v, do


def run(impl, q, k, v, do, mask, cap=None, bias=None, dropout=None):
    """out, lse and the gradients (dq, dk, dv[, dbias]) of <out, dO> + Σ finite lse, so the
    lse cotangent (dlse) is exercised too. dropout: None or (rate, seed, broadcast)."""
    rate, seed, broadcast = dropout or (0.0, None, False)

    def loss(q, k, v, bias):
        out, lse = jaxattn.dot_product_attention(q, k, v, bias, mask=mask, logits_soft_cap=cap,
                                                 dropout_rate=rate, dropout_seed=seed,
                                                 broadcast_dropout=broadcast,
                                                 implementation=impl, return_residuals=True)
        value = jnp.sum(out.astype(lse.dtype) * do.astype(lse.dtype))
        return value + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(q, k, v, bias)
    return out, lse, grads


def run_scored(impl, q, k, v, do, mask, score_fn=None, operands=(), sinks=None, cap=None, bias=None,
               operand_grads=True):
    """out, lse and the gradients of <out, dO> + Σ finite lse with respect to q, k, v, the
    score operands (when operand_grads) and the sinks (when given)."""
    def attend(q, k, v, score_mod, sinks):
        out, lse = jaxattn.dot_product_attention(q, k, v, bias, mask=mask, logits_soft_cap=cap,
                                                 score_mod=score_mod, sinks=sinks,
                                                 implementation=impl, return_residuals=True)
        return out, lse, jnp.sum(out.astype(lse.dtype) * do.astype(lse.dtype))
    return _scored_value_and_grads(attend, q, k, v, score_fn, operands, sinks, operand_grads)


def _scored_value_and_grads(attend, q, k, v, score_fn, operands, sinks, operand_grads):
    """(out, lse, [dq, dk, dv, d operands..., d sinks]) of <out, dO> + Σ finite lse, where
    attend(q, k, v, score_mod, sinks) -> (out, lse, <out, dO>)."""
    def loss(q, k, v, operands, sinks):
        score_mod = None if score_fn is None else jaxattn.ScoreMod(score_fn, *operands)
        out, lse, value = attend(q, k, v, score_mod, sinks)
        return value + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)
    argnums = (0, 1, 2) + ((3,) if operand_grads and operands else ()) + ((4,) if sinks is not None else ())
    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(
        q, k, v, tuple(operands), sinks)
    flat = [*grads[:3]]
    for g in grads[3:]:
        flat.extend(g if isinstance(g, tuple) else (g,))
    return out, lse, flat


def alibi_fn(score, batch, head, q_pos, kv_pos, slopes):
    return score + slopes[head] * (kv_pos - q_pos).astype(score.dtype)


def per_batch_temperature_fn(score, batch, head, q_pos, kv_pos, temperature, table):
    """Two operands, one per batch row (scalar index) and one table read with a tile of
    indices (not differentiated): exercises every way a score function reads."""
    return score * temperature[batch] + table[head, jnp.clip(kv_pos - q_pos + 4, 0, 7)]


def masked_garbage_fn(score, batch, head, q_pos, kv_pos):
    """Huge values and NaN exactly where the causal mask rules pairs out: a score
    function never revives a masked pair."""
    return jnp.where(kv_pos > q_pos + 1, jnp.where((kv_pos - q_pos) % 2 == 0, jnp.nan, 1e30), score)


def score_mod_cases(f: int = 1):
    """name -> ((B, T, S, N, K, H), mask, cap, score fn, operands (numpy), sinks, operand
    gradients wanted)."""
    rng = np.random.default_rng(11)
    return {
        "alibi_learned_slopes_gqa_t_ne_s": ((1, 40 * f, 57 * f, 4, 2, 16), M.CausalMask(offset=17 * f), None,
                                            alibi_fn, (np.array([0.5, 0.25, 0.125, 0.0625], np.float32),),
                                            None, True),
        "two_operands_cap_sinks_local_or_global": ((2, 33 * f, 33 * f, 2, 1, 16), M.LocalMask(9 * f, 3 * f) | M.GlobalMask(2),
                                        3.0, per_batch_temperature_fn,
                                        (np.array([0.7, 1.3], np.float32), rng.normal(size=(2, 8)).astype(np.float32)),
                                        np.array([0.5, -1.0], np.float32), False),
        "sinks_empty_rows_mqa": ((1, 40 * f, 50 * f, 3, 1, 16), M.CausalMask(offset=-5 * f), None, None, (),
                                 np.array([0.0, 1.5, -2.0], np.float32), False),
        "masked_pairs_stay_masked": ((1, 40 * f, 40 * f, 2, 1, 16), M.CausalMask(), None, masked_garbage_fn, (),
                                     None, False),
    }


def _nonfinite(*xs):
    return any(bool(jnp.any(~jnp.isfinite(jnp.asarray(x, jnp.float32)))) for x in xs)


class KernelCases:
    """Values and gradients against the reference; see the module docstring."""

    backend: str                      # the implementation name, e.g. "pallas_triton"
    supports_bias = True              # additive bias (and its gradient)
    supports_softcap = True           # logits_soft_cap
    supports_dynamic_masks = True     # masks holding traced data (segment ids)
    length_scale = 1                  # sequence lengths (and mask sizes) multiplied by this
    dtype = jnp.float32               # input dtype; the reference runs in float32 on the same values

    # -- comparison -----------------------------------------------------------------
    def check(self, name, got, want, naive=None, *, atol=2e-5):
        """got vs the reference's `want`; `naive` (a plain low-precision computation of
        the same) is what the GPU tier derives its tolerances from. CPU: element-wise."""
        del naive
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                                   atol=atol, rtol=1e-4, err_msg=name)

    def naive_run(self, q, k, v, do, mask, cap=None, bias=None, dropout=None):
        """What `check` gets as `naive`; the CPU tier needs none."""
        return None

    def naive_run_scored(self, *args, **kwargs):
        """run_scored's `naive` counterpart for `check`; the CPU tier needs none."""
        return None

    def declined(self, q, k, v, do, mask, cap=None, bias=None, dropout=None):
        """True when the backend's supports() declines this call (a finer form of the
        capability flags: e.g. mask operands it does not read), after checking that the
        call raises NotImplementedError so dispatch can fall back."""
        canonical = M.canonical_mask(mask)
        bias4 = None if bias is None else jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)
        request = kernel_request(q, k, bias4, canonical, cap, dropout[0] if dropout else 0.0)
        backend, interpret = get_backend(self.backend), default_interpret()
        if backend.supports(request, interpret=interpret) is None:
            try:   # the backend may still refuse once the block metadata is known
                prepare_call(self.backend, canonical, q.shape[1], k.shape[1], scale=1.0,
                             logits_soft_cap=cap, config=backend.default_config(request, interpret=interpret),
                             interpret=interpret)
                return False
            except NotImplementedError:
                pass
        with pytest.raises(NotImplementedError):
            run(self.backend, q, k, v, do, mask, cap, bias, dropout)
        return True

    def compare(self, q, k, v, do, mask, cap=None, bias=None, dropout=None):
        """The backend against the reference (float32 on the same values), values, lse,
        and every gradient; dropout: None or (rate, seed, broadcast), the seed traced."""
        if cap is not None and not self.supports_softcap:
            with pytest.raises(NotImplementedError):
                run(self.backend, q, k, v, do, mask, cap, bias)
            return
        if bias is not None and not self.supports_bias:
            with pytest.raises(NotImplementedError):
                run(self.backend, q, k, v, do, mask, cap, bias)
            return
        if self.declined(q, k, v, do, mask, cap, bias, dropout):
            return
        f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
        rate, seed, broadcast = dropout or (0.0, None, False)

        @jax.jit
        def both(q, k, v, do, bias, seed):
            drop = None if seed is None else (rate, seed, broadcast)
            mine = run(self.backend, q, k, v, do, mask, cap, bias, drop)
            ref = run("reference", f32(q), f32(k), f32(v), f32(do), mask, cap, f32(bias), drop)
            return mine, ref, self.naive_run(q, k, v, do, mask, cap, bias, drop)

        (out, lse, grads), (r_out, r_lse, r_grads), naive = both(q, k, v, do, bias, seed)
        naive = naive or (None, None, (None,) * len(grads))
        assert not _nonfinite(out, *grads), "NaN/Inf in the kernel's output or gradients"
        self.check("out", out, r_out, naive[0])
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(r_lse), err_msg="empty rows")
        finite = jnp.isfinite(r_lse)
        self.check("lse", jnp.where(finite, lse, 0)[..., None], jnp.where(finite, r_lse, 0)[..., None],
                   None if naive[1] is None else jnp.where(finite, naive[1], 0)[..., None])
        for name, got, want, nv in zip(("dq", "dk", "dv", "dbias"), grads, r_grads, naive[2]):
            assert got.shape == want.shape, name
            self.check(name, got, want, nv, atol=2e-4)

    # -- the cases ------------------------------------------------------------------
    @pytest.mark.parametrize("name", list(kernel_cases()))
    def test_matches_reference(self, name):
        shape, mask, cap = kernel_cases(self.length_scale)[name]
        self.compare(*make_inputs(*shape, dtype=self.dtype), mask, cap)

    @pytest.mark.parametrize("index", range(len(bias_cases())))
    def test_bias_values_and_grads(self, index):
        shape, mask, cap = bias_cases(self.length_scale)[index]
        f = self.length_scale
        q, k, v, do = make_inputs(2, 45 * f, 60 * f, 4, 2, 16, dtype=self.dtype)
        bias = jax.random.normal(jax.random.key(5), shape, jnp.float32)
        self.compare(q, k, v, do, mask, cap, bias)

    # -- attention dropout ----------------------------------------------------------
    @pytest.mark.parametrize("name", list(dropout_cases()))
    def test_dropout_matches_reference(self, name):
        """The kernels drop the pairs the reference drops (same seed, traced): values, lse
        (of the undropped attention) and every gradient."""
        shape, mask, cap, bias_shape, rate, broadcast = dropout_cases(self.length_scale)[name]
        if cap is not None and not self.supports_softcap or bias_shape and not self.supports_bias:
            cap, bias_shape = None, None
        q, k, v, do = make_inputs(*shape, dtype=self.dtype, seed=3)
        bias = None if bias_shape is None else jax.random.normal(jax.random.key(8), bias_shape)
        self.compare(q, k, v, do, mask, cap, bias, dropout=(rate, jnp.uint32(0xC0FFEE), broadcast))

    def test_dropout_deterministic_per_seed(self):
        """Same seed: bitwise the same output and gradients; another seed: another mask.
        Rate 0 with a seed is no dropout. Full mask: the kernels' tiles without mask work."""
        f = self.length_scale
        q, k, v, do = make_inputs(1, 40 * f, 40 * f, 2, 1, 16, dtype=self.dtype, seed=4)
        mask = M.FullMask()
        if self.declined(q, k, v, do, mask, dropout=(0.4, jnp.uint32(1), False)):
            return

        @jax.jit
        def runs(seed):
            return [run(self.backend, q, k, v, do, mask, dropout=drop)
                    for drop in ((0.4, seed, False), (0.0, seed, False), None)]

        a, zero, plain = runs(jnp.uint32(1))
        again, *_ = runs(jnp.uint32(1))
        other, *_ = runs(jnp.uint32(2))
        leaves = lambda r: [r[0], *r[2]]  # noqa: E731   out, dq, dk, dv
        for x, y, z in zip(leaves(a), leaves(again), leaves(other)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            assert not np.array_equal(np.asarray(x), np.asarray(z))
        for x, y in zip(leaves(zero), leaves(plain)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def test_segments_documents_traced(self):
        """Causal document packing with segment ids traced through jit."""
        if not self.supports_dynamic_masks:
            pytest.skip("backend declares no masks with traced data")
        f = self.length_scale
        ids = np.repeat([0, 1, 2, 3], [30 * f, 41 * f, 9 * f, 20 * f])[None].repeat(2, 0)
        ids[1] = np.repeat([0, 1], [64 * f, 36 * f])
        q, k, v, do = make_inputs(2, 100 * f, 100 * f, 2, 1, 32, dtype=self.dtype)
        self.compare(q, k, v, do, M.causal_document_mask(jnp.asarray(ids)))

    def test_empty_rows_give_zero_and_zero_grads(self):
        f = self.length_scale
        dense = np.random.default_rng(2).random((40 * f, 50 * f)) < 0.3
        empty = [0, 7, 33 * f, 40 * f - 1]
        dense[empty] = False  # rows with no allowed key
        q, k, v, do = make_inputs(1, 40 * f, 50 * f, 2, 2, 16, dtype=self.dtype)
        if self.declined(q, k, v, do, M.DenseMask(dense)):
            return
        out, lse, (dq, dk, dv) = jax.jit(lambda *a: run(self.backend, *a, M.DenseMask(dense)))(q, k, v, do)
        assert np.all(np.asarray(out)[:, empty] == 0)
        assert np.all(np.isneginf(np.asarray(lse)[:, :, empty]))
        assert np.all(np.asarray(dq)[:, empty] == 0)
        assert not _nonfinite(out, dq, dk, dv)
        # nothing allowed at all: zeros everywhere
        out, lse, grads = jax.jit(lambda *a: run(self.backend, *a, M.CausalMask(offset=-100 * f)))(q, k, v, do)
        assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
        assert all(np.all(np.asarray(g) == 0) for g in grads)

    def test_minus_inf_bias_row_is_empty_not_nan(self):
        if not self.supports_bias:
            pytest.skip("backend declares no bias")
        q, k, v, do = make_inputs(1, 20, 30, 1, 1, 16, dtype=self.dtype)
        bias = jnp.zeros((1, 1, 20, 30)).at[:, :, 4].set(-jnp.inf)
        out, lse, grads = jax.jit(lambda *a: run(self.backend, *a, None, None, bias))(q, k, v, do)
        assert np.all(np.asarray(out)[:, 4] == 0) and np.isneginf(np.asarray(lse)[0, 0, 4])
        assert not _nonfinite(out, *grads)

    def test_large_key_bias_with_padded_query_rows_stays_finite(self):
        """A per-key bias of +100 (a logit whose exp overflows float32 until the lse comes
        off) with T not a multiple of the query tile: the backward's padding rows must
        get P = 0, not exp(100) = inf times their dO = 0 (NaN in dK, dV and dbias)."""
        if not self.supports_bias:
            pytest.skip("backend declares no bias")
        f = self.length_scale
        q, k, v, do = make_inputs(1, 21 * f, 30 * f, 2, 1, 16, dtype=self.dtype)
        bias = jnp.zeros((1, 1, 1, 30 * f)).at[..., ::3].set(100.0)
        self.compare(q, k, v, do, None, None, bias)

    def test_backward_bitwise_deterministic(self):
        f = self.length_scale
        q, k, v, do = make_inputs(1, 64 * f, 64 * f, 4, 2, 16, dtype=self.dtype)
        mask = M.CausalMask() & M.LocalMask(32 * f, 0)
        if self.declined(q, k, v, do, mask):
            return
        grads = jax.jit(lambda *a: run(self.backend, *a, mask)[2])
        for x, y in zip(grads(q, k, v, do), grads(q, k, v, do)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # -- score_mod and sinks ----------------------------------------------------------
    supports_score_mod = True         # score_mod inside the kernels (sinks need only the lse)

    @pytest.mark.parametrize("name", list(score_mod_cases()))
    def test_score_mod_and_sinks(self, name):
        """Values, lse and every gradient (q, k, v, learned operands, sinks) against the
        reference; a backend without score_mod must decline it."""
        shape, mask, cap, fn, operands, sinks, operand_grads = score_mod_cases(self.length_scale)[name]
        q, k, v, do = make_inputs(*shape, dtype=self.dtype)
        operands = tuple(jnp.asarray(x) for x in operands)
        sinks = None if sinks is None else jnp.asarray(sinks)
        args = dict(score_fn=fn, operands=operands, sinks=sinks, cap=cap, operand_grads=operand_grads)
        if fn is not None and not self.supports_score_mod:
            with pytest.raises(NotImplementedError):
                run_scored(self.backend, q, k, v, do, mask, **args)
            return
        if self.declined(q, k, v, do, mask, cap):   # the mask alone may be declined
            return
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

        @jax.jit
        def both(q, k, v, do):
            return (run_scored(self.backend, q, k, v, do, mask, **args),
                    run_scored("reference", f32(q), f32(k), f32(v), f32(do), mask, **args),
                    self.naive_run_scored(q, k, v, do, mask, **args))

        (out, lse, grads), (r_out, r_lse, r_grads), naive = both(q, k, v, do)
        naive = naive or (None, None, (None,) * len(grads))
        assert not _nonfinite(out, lse, *grads), "NaN/Inf in the kernel's results"
        self.check("out", out, r_out, naive[0])
        self.check("lse", lse[..., None], r_lse[..., None],
                   None if naive[1] is None else naive[1][..., None])
        for i, (got, want, nv) in enumerate(zip(grads, r_grads, naive[2])):
            assert got.shape == want.shape, i
            # operand and sink gradients are 1-d sums: compared as one row
            as_row = (lambda x: None if x is None else x.reshape(1, -1)) if got.ndim == 1 else (lambda x: x)
            self.check(f"grad {i}", as_row(got), as_row(want), as_row(nv), atol=2e-4)

    def test_score_mod_table_gradient_is_declined(self):
        """An operand read with a tile of indices is not differentiated by the kernels:
        a clear NotImplementedError (pointing to bias=), never a wrong gradient."""
        if not self.supports_score_mod:
            pytest.skip("backend declares no score_mod")
        q, k, v, do = make_inputs(1, 16, 16, 2, 2, 16, dtype=self.dtype)
        table = jnp.zeros((2, 8))
        with pytest.raises(NotImplementedError, match="bias="):
            jax.jit(lambda *a: run_scored(self.backend, *a, M.CausalMask(), per_batch_temperature_fn,
                                          (jnp.ones((1,)), table)))(q, k, v, do)

    # -- masked keys and queries cannot poison results ------------------------------
    def _poisoned(self, f):
        """Inputs where every key no query may attend and every query that may attend no
        key hold NaN or Inf, with the masks that rule them out, and the same inputs
        clean (zeros there). B=2, T=40f, S=53f, N=2, K=1."""
        t, s = 40 * f, 53 * f
        q, k, v, do = make_inputs(2, t, s, 2, 1, 16, dtype=self.dtype, seed=7)
        bad_keys = np.r_[10 * f:13 * f, s - 5 * f:s]        # inside a tile, and the tail
        bad_queries = np.r_[3, 30 * f:31 * f]
        dense = np.random.default_rng(4).random((t, s)) < 0.7
        dense[:, bad_keys] = False
        dense[bad_queries] = False
        # The same rule as packed segments: padding queries and keys get ids no one shares.
        q_ids = np.repeat([0, 1], [t // 2, t - t // 2])[None].repeat(2, 0)
        kv_ids = np.repeat([0, 1], [s // 2, s - s // 2])[None].repeat(2, 0)
        q_ids[:, bad_queries], kv_ids[:, bad_keys] = -1, -2
        masks = {"dense": M.DenseMask(dense),
                 "segments": M.CausalMask(offset=s - t) & M.SegmentMask(jnp.asarray(q_ids), jnp.asarray(kv_ids))}
        poison = lambda x, rows, axis_len: x.at[:, rows].set(  # noqa: E731
            jnp.where(jnp.arange(axis_len)[rows][None, :, None, None] % 2 == 0, jnp.nan, jnp.inf).astype(x.dtype))
        clean = (q.at[:, bad_queries].set(0), k.at[:, bad_keys].set(0), v.at[:, bad_keys].set(0), do)
        dirty = (poison(q, bad_queries, t), poison(k, bad_keys, s), poison(v, bad_keys, s), do)
        return masks, clean, dirty, bad_keys, bad_queries

    @pytest.mark.parametrize("mask_name", ["dense", "segments"])
    def test_masked_nan_and_inf_never_reach_results(self, mask_name):
        """NaN/Inf in keys and values no query may attend, and in queries that may attend
        no key, change no output and no gradient, in the reference and in the kernels."""
        f = self.length_scale
        masks, clean, dirty, bad_keys, bad_queries = self._poisoned(f)
        mask = masks[mask_name]
        if self.declined(*dirty, mask):
            return

        f32 = lambda xs: tuple(x.astype(jnp.float32) for x in xs)  # noqa: E731

        @jax.jit
        def all_runs(clean, dirty):
            return (run("reference", *f32(clean), mask), run("reference", *f32(dirty), mask),
                    run(self.backend, *dirty, mask), self.naive_run(*clean, mask))

        want, ref_dirty, mine, naive = all_runs(clean, dirty)
        naive = naive or (None, None, (None,) * 3)
        for label, (out, lse, grads) in (("reference", ref_dirty), (self.backend, mine)):
            assert not _nonfinite(out, *grads), f"{label}: NaN/Inf reached a result"
            dq, dk, dv = grads
            assert np.all(np.asarray(dk)[:, bad_keys] == 0) and np.all(np.asarray(dv)[:, bad_keys] == 0), label
            assert np.all(np.asarray(dq)[:, bad_queries] == 0) and np.all(np.asarray(out)[:, bad_queries] == 0), label
        np.testing.assert_array_equal(np.asarray(ref_dirty[0]), np.asarray(want[0]))
        self.check("out", mine[0], want[0], naive[0], atol=2e-5)
        for name, got, ref, nv in zip(("dq", "dk", "dv"), mine[2], want[2], naive[2]):
            self.check(name, got, ref, nv, atol=2e-4)

    def test_nan_past_the_last_query_never_reaches_results(self):
        """Causal with T < S, T not a multiple of the query tile: the keys past the last
        query are attended by no row, only by the last tile's padding rows (which attend
        nothing), so NaN/Inf held there changes no output and no gradient."""
        f = self.length_scale
        t, s = 40 * f + 3, 53 * f
        q, k, v, do = make_inputs(1, t, s, 2, 1, 16, dtype=self.dtype, seed=9)
        mask, tail = M.CausalMask(), np.arange(t, s)
        clean = (q, k.at[:, tail].set(0), v.at[:, tail].set(0), do)
        # K and V poisoned, and V alone (a check that reads K would not see it)
        poisoned = {"k_and_v": (q, k.at[:, tail].set(jnp.inf), v.at[:, tail].set(jnp.nan), do),
                    "v_only": (q, clean[1], v.at[:, tail].set(jnp.nan), do)}
        if self.declined(*poisoned["k_and_v"], mask):
            return
        f32 = lambda xs: tuple(x.astype(jnp.float32) for x in xs)  # noqa: E731

        @jax.jit
        def all_runs(clean, poisoned):
            return (run("reference", *f32(clean), mask),
                    {name: run(self.backend, *dirty, mask) for name, dirty in poisoned.items()},
                    self.naive_run(*clean, mask))

        want, mine_by_poison, naive = all_runs(clean, poisoned)
        naive = naive or (None, None, (None,) * 3)
        for label, mine in mine_by_poison.items():
            out, _, (dq, dk, dv) = mine
            assert not _nonfinite(out, dq, dk, dv), f"{label}: NaN/Inf past the last query reached a result"
            assert not np.asarray(dk)[:, tail].any() and not np.asarray(dv)[:, tail].any(), label
            self.check(f"{label} out", out, want[0], naive[0], atol=2e-5)
            for name, got, ref, nv in zip(("dq", "dk", "dv"), mine[2], want[2], naive[2]):
                self.check(f"{label} {name}", got, ref, nv, atol=2e-4)




class InterpretOnlyCases:
    """Checks that run on the CPU machine only."""

    backend: str
    supports_float64 = True
    supports_bias = True
    # Names that must appear in the module lowered for an H100 (e.g. the kernels' names).
    lowered_names: tuple[str, ...] = ()

    def test_float64_check_grads_with_dropout(self):
        """Dropout is a fixed function of the inputs for a fixed seed: its kernel gradients
        pass a float64 finite-difference check."""
        from jax.test_util import check_grads
        with jax.enable_x64(True):
            q, k, v, _ = make_inputs(1, 29, 37, 2, 1, 16, dtype=jnp.float64)

            def f(q, k, v):
                return jaxattn.dot_product_attention(q, k, v, mask=M.CausalMask(offset=8),
                                                     dropout_rate=0.25, dropout_seed=11,
                                                     implementation=self.backend)
            if not self.supports_float64:
                return
            check_grads(jax.jit(f), (q, k, v), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)

    def test_float64_check_grads(self):
        from jax.test_util import check_grads
        with jax.enable_x64(True):
            q, k, v, _ = make_inputs(1, 37, 29, 2, 1, 16, dtype=jnp.float64)
            mask = M.CausalMask(offset=3) & M.LocalMask(9, 2)

            def f(q, k, v):
                return jaxattn.dot_product_attention(q, k, v, mask=mask, logits_soft_cap=4.0,
                                                     implementation=self.backend)
            if not self.supports_float64:
                with pytest.raises(NotImplementedError):
                    f(q, k, v)
                return
            check_grads(jax.jit(f), (q, k, v), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)

    def test_float64_check_grads_score_mod_and_sinks(self):
        from jax.test_util import check_grads
        if not self.supports_float64 or not getattr(self, "supports_score_mod", True):
            pytest.skip("backend declares no float64 or no score_mod")
        with jax.enable_x64(True):
            q, k, v, _ = make_inputs(1, 21, 29, 2, 1, 16, dtype=jnp.float64)
            slopes = jnp.array([0.3, 0.1], jnp.float64)
            sinks = jnp.array([0.2, -0.4], jnp.float64)
            mask = M.CausalMask(offset=8)

            def f(q, k, v, slopes, sinks):
                return jaxattn.dot_product_attention(q, k, v, mask=mask, logits_soft_cap=4.0,
                                                     score_mod=jaxattn.ScoreMod(alibi_fn, slopes),
                                                     sinks=sinks, implementation=self.backend)
            check_grads(jax.jit(f), (q, k, v, slopes, sinks), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)

    # -- lowering of the shipped (GPU) configurations for an H100, without a GPU -----
    def lower_for_h100(self, b, t, s, n, k, h, mask, cap=None, bias=None, dropout_rate=0.0):
        """Forward and backward lowered for an H100 with the backend's GPU config
        (interpret=False); bias: None or its shape (differentiated too); with a
        dropout_rate, the seed is a traced uint32 (the hash's uint32 ops must lower)."""
        def fn(q, kk, v, seed):
            bias_arr = jnp.zeros(bias, jnp.bfloat16) if bias else None

            def loss(q, kk, v, bias_arr):
                out = pallas_attention(self.backend, q, kk, v, bias_arr, mask, scale=h ** -0.5,
                                       logits_soft_cap=cap, return_residuals=False, interpret=False,
                                       dropout_rate=dropout_rate, dropout_seed=seed)
                return jnp.sum(out.astype(jnp.float32))
            return jax.grad(loss, argnums=(0, 1, 2) + ((3,) if bias else ()))(q, kk, v, bias_arr)

        sds = [jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16),
               jax.ShapeDtypeStruct((b, s, k, h), jnp.bfloat16),
               jax.ShapeDtypeStruct((b, s, k, h), jnp.bfloat16),
               jax.ShapeDtypeStruct((), jnp.uint32)]
        text = lower_for_h100(fn, *sds)
        for name in self.lowered_names:
            assert name in text, name

    @pytest.fixture
    def pretend_gpu(self, monkeypatch):
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    @pytest.mark.parametrize("h,mask", [
        (64, M.CausalMask()),
        (128, M.bigbird_mask(512, window=64, num_global=16, num_random_blocks=1, block_size=128, causal=True)),
        (96, M.causal_document_mask(jnp.zeros((1, 512), jnp.int32))),
        (256, M.DenseMask(np.tril(np.ones((300, 300), bool)))),
        # per query head under GQA: per-head tables and mask tiles in the dK/dV kernel
        (64, M.DenseMask(np.stack([np.tril(np.ones((300, 300), bool), k=-i) for i in range(4)])[None])),
    ])
    def test_lowers_for_h100(self, pretend_gpu, h, mask):
        t = 300 if isinstance(mask, M.DenseMask) else 512
        self.lower_for_h100(1, t, t, 4, 2, h, mask, cap=30.0 if h == 64 else None)

    @pytest.mark.parametrize("h,mask,bias", [
        (64, M.CausalMask(), None),
        # per-head mask tiles and a bias in the dK/dV kernel under GQA
        (128, M.DenseMask(np.stack([np.tril(np.ones((300, 300), bool), k=-i) for i in range(4)])[None]),
         (1, 4, 300, 300)),
    ])
    def test_dropout_lowers_for_h100(self, pretend_gpu, h, mask, bias):
        self.lower_for_h100(1, 300, 300, 4, 2, h, mask, bias=bias, dropout_rate=0.1)

    def test_score_mod_lowers_for_h100(self, pretend_gpu):
        """A score function with a scalar-indexed operand (differentiated) and a gather
        from a table, in the forward and both backward kernels, lowered for an H100."""
        if not getattr(self, "supports_score_mod", True):
            pytest.skip("backend declares no score_mod")

        def fn(q, kk, v, temperature, table):
            def loss(q, kk, v, temperature):
                out = pallas_attention(
                    self.backend, q, kk, v, None, M.CausalMask(), scale=128 ** -0.5, logits_soft_cap=None,
                    return_residuals=False, interpret=False,
                    score_mod=jaxattn.ScoreMod(per_batch_temperature_fn, temperature, table))
                return jnp.sum(out.astype(jnp.float32))
            return jax.grad(loss, argnums=(0, 1, 2, 3))(q, kk, v, temperature)

        text = lower_for_h100(fn, jax.ShapeDtypeStruct((2, 384, 4, 128), jnp.bfloat16),
                              jax.ShapeDtypeStruct((2, 384, 2, 128), jnp.bfloat16),
                              jax.ShapeDtypeStruct((2, 384, 2, 128), jnp.bfloat16),
                              jax.ShapeDtypeStruct((2,), jnp.float32), jax.ShapeDtypeStruct((4, 8), jnp.float32))
        for name in self.lowered_names:
            assert name in text, name

    @pytest.mark.parametrize("bias_shape", [(1, 1, 384, 384), (1, 4, 384, 384), (2, 1, 1, 384),
                                            (1, 4, 1, 384), (2, 4, 384, 1)])
    def test_bias_lowers_for_h100(self, pretend_gpu, bias_shape):
        if not self.supports_bias:
            pytest.skip("backend declares no bias")
        self.lower_for_h100(2, 384, 384, 4, 2, 128, M.CausalMask(), bias=bias_shape)

    # -- explicit sharding (jax.make_mesh's default) ----------------------------------
    @pytest.mark.parametrize("dropout_rate", [0.0, 0.3])
    def test_explicit_batch_and_head_sharding(self, dropout_rate):
        """Batch- and head-sharded inputs run the kernels per shard; values and gradients
        equal the unsharded reference, with attention dropout too (each shard hashes its
        global batch rows and heads)."""
        from jax.sharding import NamedSharding, PartitionSpec as P
        if jax.device_count() < 4:
            pytest.skip("needs 4 (simulated) devices")
        mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4])
        q, k, v, do = make_inputs(2, 40, 40, 4, 2, 16)
        ids = jnp.asarray(np.stack([np.repeat([0, 1], [25, 15]), np.repeat([0, 1, 2], [10, 10, 20])]))
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", None, "model", None)))  # noqa: E731

        def grads(q, k, v, ids, impl):
            mask = M.causal_document_mask(ids)

            def loss(q, k, v):
                out = jaxattn.dot_product_attention(q, k, v, mask=mask, dropout_rate=dropout_rate,
                                                    dropout_seed=jnp.uint32(5), implementation=impl)
                return jnp.sum(out * do), out
            return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

        grads = jax.jit(grads, static_argnums=4)
        (_, out), got = grads(put(q), put(k), put(v), jax.device_put(ids, NamedSharding(mesh, P("data"))),
                              self.backend)
        (_, ref), want = grads(q, k, v, ids, "reference")
        assert out.sharding.spec[0] == "data"
        np.testing.assert_allclose(out, ref, atol=2e-5)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-4)

    def test_static_per_row_mask_under_batch_sharding_is_refused(self):
        """A numpy mask that differs per batch row is not split with the inputs: refused
        with a message (before, each shard read row 0's pattern); as a jax array it is
        split and the result is the reference's."""
        from jax.sharding import NamedSharding, PartitionSpec as P
        if jax.device_count() < 2:
            pytest.skip("needs 2 (simulated) devices")
        mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
        q, k, v, _ = make_inputs(2, 40, 40, 2, 1, 16)
        allowed = np.random.default_rng(0).random((2, 1, 40, 40)) < 0.5
        allowed[..., 0] = True
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731

        def attend(q, k, v, mask):
            return jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=self.backend)
        with pytest.raises(NotImplementedError, match="static .numpy. data per batch row"):
            jax.jit(lambda q, k, v: attend(q, k, v, M.DenseMask(allowed)))(put(q), put(k), put(v))
        got = jax.jit(lambda q, k, v, a: attend(q, k, v, M.DenseMask(a)))(
            put(q), put(k), put(v), put(jnp.asarray(allowed)))
        want = jaxattn.dot_product_attention(q, k, v, mask=M.DenseMask(allowed),
                                             implementation="reference")
        np.testing.assert_allclose(got, want, atol=2e-5)

    def test_sequence_sharded_input_is_refused_for_ring_attention(self):
        from jax.sharding import NamedSharding, PartitionSpec as P
        if jax.device_count() < 2:
            pytest.skip("needs 2 (simulated) devices")
        mesh = jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2])
        q = jax.device_put(make_inputs(1, 32, 32, 1, 1, 16)[0], NamedSharding(mesh, P(None, "seq")))
        with pytest.raises(NotImplementedError, match="ring_attention"):
            jax.jit(lambda q: jaxattn.dot_product_attention(q, q, q, implementation=self.backend))(q)


# ---------------------------------------------------------------------------------
# The GPU tier: real tiles, bfloat16, per-row tolerances.
# ---------------------------------------------------------------------------------
def naive_attention(q, k, v, bias, mask, cap, *, return_residuals=True, dropout=None,
                    score_mod=None, sinks=None):
    """Attention computed plainly in the inputs' dtype (bfloat16: every product, sum and
    exponential rounded to it): the yardstick of the GPU tier's tolerances. dropout: None
    or (rate, seed, broadcast), jaxattn.dropout's keep-mask."""
    dt = q.dtype
    b, t, n, h = q.shape
    s, g = k.shape[1], n // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=dt) * jnp.asarray(h ** -0.5, dt)
    if bias is not None:
        logits = logits + bias.astype(dt)
    if cap is not None:
        logits = jnp.asarray(cap, dt) * jnp.tanh(logits / jnp.asarray(cap, dt))
    if score_mod is not None:
        ids = [jnp.arange(x, dtype=jnp.int32).reshape([x if a == i else 1 for a in range(4)])
               for i, x in enumerate((b, n, t, s))]
        logits = score_mod.reference_apply(logits, *ids).astype(dt)
    allowed = jnp.ones((1, 1, 1, 1), bool) if mask is None else allowed_pairs(mask, t, s)
    logits = jnp.where(allowed, logits, jnp.asarray(MASK_VALUE, dt))
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros((), dt))
    p = jnp.where(allowed, jnp.exp(logits - m), jnp.zeros((), dt))
    l = jnp.sum(p, axis=-1, keepdims=True)
    l_safe = jnp.where(l > 0, l, jnp.ones((), dt))
    weights = p / l_safe
    if dropout is not None:
        rate, seed, broadcast = dropout
        keep = dropout_keep(seed, weights.shape, rate, broadcast=broadcast)
        weights = jnp.where(keep, weights / jnp.asarray(1.0 - rate, dt), jnp.zeros((), dt))
    out = jnp.einsum("bnts,bsnh->btnh", weights, v, preferred_element_type=dt)
    lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)[..., 0].astype(jnp.float32)
    if sinks is not None:
        from jaxattn.sinks import add_sinks
        out, lse = add_sinks(out, lse, sinks)
    return out, lse


def naive_run_scored(q, k, v, do, mask, score_fn=None, operands=(), sinks=None, cap=None, bias=None,
                     operand_grads=True):
    """run_scored() of naive_attention (every step in q's dtype)."""
    def attend(q, k, v, score_mod, sinks):
        out, lse = naive_attention(q, k, v, bias, mask, cap, score_mod=score_mod, sinks=sinks)
        return out, lse, jnp.sum(out * do).astype(jnp.float32)
    return _scored_value_and_grads(attend, q, k, v, score_fn, operands, sinks, operand_grads)


def naive_run(q, k, v, do, mask, cap=None, bias=None, dropout=None):
    """run() of naive_attention: (out, lse, grads) with every step in q's dtype."""
    def loss(q, k, v, bias):
        out, lse = naive_attention(q, k, v, bias, mask, cap, dropout=dropout)
        value = jnp.sum(out * do).astype(jnp.float32)
        return value + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(q, k, v, bias)
    return out, lse, grads


class GPUTier(KernelCases):
    """KernelCases on a GPU: real tile sizes (the backend's default config), sequences
    `length_scale` times longer, bfloat16 inputs against the float32 reference on the
    same values, compared row by row (the last axis is the row: a head-dim vector of
    out/dq/dk/dv, one lse). A row passes when

        max |got − ref| ≤ rows_factor · max |naive − ref| + 2⁻⁸ · max |ref| + floor

    with `naive` the plain bfloat16 computation of the same row (naive_attention), 2⁻⁸
    of the row's largest value for the rounding of the result itself to bfloat16, and
    floor = 1e-3 · max |ref| over the tensor; so one wrong tile fails its own rows
    however many right rows surround it."""

    length_scale = 16
    dtype = jnp.bfloat16
    rows_factor = 2.0

    def naive_run(self, q, k, v, do, mask, cap=None, bias=None, dropout=None):
        return naive_run(q, k, v, do, mask, cap, bias, dropout)

    def naive_run_scored(self, *args, **kwargs):
        return naive_run_scored(*args, **kwargs)

    def check(self, name, got, want, naive=None, *, atol=None):
        del atol
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        err = np.max(np.abs(got - want), axis=-1)
        floor = 1e-3 * float(np.max(np.abs(want))) + 1e-6
        if naive is None:   # no yardstick: bfloat16's own rounding of the row
            budget = 2.0 ** -7 * np.max(np.abs(want), axis=-1)
        else:
            budget = np.max(np.abs(np.asarray(naive, np.float32) - want), axis=-1)
        tol = self.rows_factor * budget + 2.0 ** -8 * np.max(np.abs(want), axis=-1) + floor
        bad = ~(err <= tol)   # NaN fails too
        if bad.any():
            worst = np.unravel_index(np.argmax(np.where(bad, err / tol, -1)), err.shape)
            raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} rows over tolerance; worst row "
                                 f"{tuple(int(i) for i in worst)}: error {err[worst]:.3g} > tolerance "
                                 f"{tol[worst]:.3g} (naive bf16 error {budget[worst]:.3g})")
