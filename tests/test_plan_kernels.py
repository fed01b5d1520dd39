"""Planned masks through the Pallas-Triton kernels in interpret mode, against the
reference: output, lse and dq/dk/dv. Each case takes a different route of the planner
(heads view or batch fold, one part or a merge, keys shifted, segments), on odd lengths,
T != S and GQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks as M
from jaxattn.planned import plan_for

IMPL = "pallas_triton"


def _inputs(b, t, s, n, k, h, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, s, k, h)),
            jax.random.normal(ks[2], (b, s, k, h)), jax.random.normal(ks[3], (b, t, n, h)))


def _segments(b, t, s):
    """Three documents of uneven lengths per row, the second row split differently."""
    q = np.stack([np.arange(t) * 3 // t, np.minimum(np.arange(t) * 2 // t, 1)])[:b]
    kv = np.stack([np.arange(s) * 3 // s, np.minimum(np.arange(s) * 2 // s, 1)])[:b]
    return M.SegmentMask(jnp.asarray(q), jnp.asarray(kv))


@jax.jit
def _both(q, k, v, do, mask):
    def run(impl):
        def loss(q, k, v):
            out, lse = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                                     return_residuals=True)
            return jnp.sum(out * do) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)
        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads
    return run("reference"), run(IMPL)


# (B, T, S, N, K, H), mask, segments?, (layouts of the parts: "natural" or stride)
CASES = {
    # heads view (lengths multiples of 4): a dilated window is a window per class
    "dilated_window_heads_gqa": ((1, 128, 128, 2, 1, 16), M.LocalMask(24, 0) & M.StridedMask(4), False, (4,)),
    # two parts merged: the window in natural order, the strided rest in residue order
    "local_or_strided_causal": ((1, 256, 256, 2, 1, 16),
                                (M.LocalMask(8, 0) | M.StridedMask(8)) & M.CausalMask(), False,
                                ("natural", 8)),
    # batch fold: classes padded (T, S not multiples of 8, T != S), keys shifted by the
    # strided offset (pre = 5), segment ids permuted like the tokens; the global rows and
    # columns run in natural order minus the strided part; GQA
    # classes mod 64 would be 3 rows long: mod 8 they are 24 rows, the mask strided by 8
    # inside them (offset 1 after shifting keys by 3); T != S, classes padded
    "local_or_strided_in_longer_classes": ((1, 192, 176, 2, 1, 16),
                                           M.LocalMask(4, 4) | M.StridedMask(64, offset=5), False,
                                           ("natural", 8)),
    "strided_causal_offset_or_global_segments": ((2, 160, 150, 4, 2, 16),
                                                 (M.StridedMask(8, offset=3) & M.CausalMask()) | M.GlobalMask(5),
                                                 True, (8, "natural")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_planned_matches_reference(name):
    shape, mask, segments, layouts = CASES[name]
    b, t, s = shape[:3]
    if segments:
        mask = mask & _segments(b, t, s)
    q, k, v, do = _inputs(*shape)
    plan, _, _ = plan_for(mask, q, k, IMPL)
    assert tuple("natural" if p.layout is None else p.layout.stride for p in plan.parts) == layouts
    (ro, rl, rg), (po, pl_, pg) = _both(q, k, v, do, mask)
    assert not jnp.isnan(po).any() and not any(jnp.isnan(g).any() for g in pg)
    np.testing.assert_allclose(po, ro, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.isneginf(pl_), np.isneginf(rl))
    finite = np.isfinite(np.asarray(rl))
    np.testing.assert_allclose(np.asarray(pl_)[finite], np.asarray(rl)[finite], atol=2e-5, rtol=1e-5)
    for d, got, want in zip("qkv", pg, rg):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"d{d}")


def test_backward_runs_on_the_classes():
    """Every kernel of the forward and the backward sees one residue class (rows of
    T / stride), never the whole sequence: the backward follows the plan."""
    q, k, v, do = _inputs(1, 128, 128, 2, 1, 16)
    mask = M.LocalMask(24, 0) & M.StridedMask(4)

    def loss(q, k, v):
        return jnp.sum(jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=IMPL) * do)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    lengths = set()

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "pallas_call":
                lengths.update(x.aval.shape[1] for x in eqn.invars
                               if x.aval.ndim == 4 and jnp.issubdtype(x.aval.dtype, jnp.floating))
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    walk(getattr(inner, "jaxpr", inner))
    walk(jaxpr.jaxpr)
    assert lengths == {32}, lengths


def test_default_dispatch_runs_parts_on_the_planned_kernels(monkeypatch):
    """With implementation=None each part runs on the kernel backend the plan was sized
    for (not wherever dispatch would send a plain window or causal mask); a part those
    kernels decline goes to the default dispatch; the result stays exact."""
    from jaxattn import planned
    monkeypatch.setattr(planned, "default_order", lambda: (IMPL, "reference"))
    # The kernels "decline" a part, so the merge is differentiated through instead of
    # running the parts' backward kernels on the merged residuals.
    monkeypatch.setattr(planned, "_kernels_serve_all", lambda *a: False)
    mask = (M.LocalMask(8, 0) | M.StridedMask(8)) & M.CausalMask()
    q, k, v, _ = _inputs(1, 256, 256, 2, 1, 16)
    calls = []

    def attend(q, k, v, *, implementation, **kw):
        calls.append(implementation)
        if implementation == IMPL and len(calls) == 1:
            raise NotImplementedError("this part is declined")
        return jaxattn.dot_product_attention(q, k, v, implementation=implementation or "reference", **kw)
    out, lse = planned.run_planned(q, k, v, None, mask, implementation=None, scale=16 ** -0.5,
                                   logits_soft_cap=None, return_residuals=True, attend_fn=attend)
    assert calls == [IMPL, None, IMPL]
    want, want_lse = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation="reference",
                                                   return_residuals=True)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    finite = np.isfinite(np.asarray(want_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], atol=2e-5, rtol=1e-5)


def test_merged_backward_runs_each_parts_kernels_on_the_merged_residuals(monkeypatch):
    """A union of two parts on one kernel backend: the backward calls each part's
    backward kernels once, with the merged lse (brought into the part's layout); the
    gradients (dO and the lse's own cotangent) match the reference."""
    from jaxattn import planned
    mask = (M.LocalMask(8, 0) | M.StridedMask(8)) & M.CausalMask()
    q, k, v, do = _inputs(1, 256, 256, 2, 1, 16)
    seen = []

    def recording(name, q, k, v, out, lse, *args, **kw):
        seen.append((name, q.shape, lse.shape))
        return pallas_backward(name, q, k, v, out, lse, *args, **kw)
    pallas_backward = planned.pallas_backward
    monkeypatch.setattr(planned, "pallas_backward", recording)

    def loss(impl):
        def f(q, k, v):
            out, lse = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                                     return_residuals=True)
            return jnp.sum(out * do) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))
        return f
    got = jax.jit(jax.grad(loss(IMPL), argnums=(0, 1, 2)))(q, k, v)
    # natural order [1, 256, 2, 16] with lse [1, 2, 256]; mod 8 as heads [1, 32, 16, 16]
    assert seen == [(IMPL, (1, 256, 2, 16), (1, 2, 256)), (IMPL, (1, 32, 16, 16), (1, 16, 32))], seen
    want = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2)))(q, k, v)
    for d, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"d{d}")


def test_merged_backward_float64_gradient_check(monkeypatch):
    """The merge's own VJP against finite differences, in float64: two parts, one in
    classes folded into the batch and padded (T, S not multiples of the stride, T != S,
    keys shifted; padding query rows), GQA, a soft cap, the lse differentiated too."""
    from jax.test_util import check_grads
    from jaxattn import planned
    mask = M.LocalMask(4, 4) | M.StridedMask(32, offset=5)
    served = []
    serve_all = planned._kernels_serve_all
    monkeypatch.setattr(planned, "_kernels_serve_all", lambda *a: served.append(serve_all(*a)) or served[-1])
    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.key(3), 3)
        q = jax.random.normal(ks[0], (1, 150, 2, 8), jnp.float64)
        k = jax.random.normal(ks[1], (1, 130, 1, 8), jnp.float64)
        v = jax.random.normal(ks[2], (1, 130, 1, 8), jnp.float64)
        plan, _, _ = plan_for(mask, q, k, IMPL)
        # mod 8, keys shifted by 3: 19 query rows per class (152 for 150), 17 key rows
        assert [(p.layout and (p.layout.stride, p.layout.pre), p.q_len, p.kv_len)
                for p in plan.parts] == [(None, 150, 130), ((8, 3), 19, 17)]

        def f(q, k, v):
            out, lse = jaxattn.dot_product_attention(q, k, v, mask=mask, logits_soft_cap=4.0,
                                                     implementation=IMPL, return_residuals=True)
            return jnp.sum(jnp.tanh(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) ** 2)
        check_grads(jax.jit(f), (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
    assert served and all(served), "the merge's own VJP ran"


def test_nan_past_the_last_query_never_reaches_a_folded_part():
    """Classes folded into the batch and padded at the end (T = 250 is not a multiple of
    8): the padding query rows must attend nothing, or the keys past the last query
    (causal, T < S), which only they would reach, count as attended in a PARTIAL tile
    and their NaN K/V rows are multiplied into the tile's real rows."""
    mask = M.StridedMask(8) & M.CausalMask()
    q, k, v, do = _inputs(1, 250, 270, 2, 1, 16)
    plan, _, _ = plan_for(mask, q, k, IMPL)
    assert [(p.layout.stride, p.q_len) for p in plan.parts] == [(8, 32)]   # 256 rows for 250
    tail = jnp.arange(250, 270)
    poisoned = (q, k.at[:, tail].set(jnp.nan), v.at[:, tail].set(jnp.inf), do)
    (_, _, clean), (out, _, grads) = _both(q, k, v, do, mask)[1], _both(*poisoned, mask)[1]
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(grads[0])))
    np.testing.assert_allclose(grads[0], clean[0], atol=1e-5, rtol=1e-5)
    for d, got, want in zip("kv", grads[1:], clean[1:]):   # the poisoned keys' own rows aside
        np.testing.assert_allclose(got[:, :250], want[:, :250], atol=1e-5, rtol=1e-5, err_msg=f"d{d}")
