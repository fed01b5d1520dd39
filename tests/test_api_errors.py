"""Every bad input to jaxattn.dot_product_attention raises ValueError naming what was
expected, what came, and how to fix it; each message is pinned here. Also the dispatch
rule: ValueError is raised at once, NotImplementedError moves on to the next backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import implementations
from jaxattn import masks as M
from pallas_kernels.registry import backend_names

B, T, S, N, K, H = 2, 5, 7, 4, 2, 8


def arr(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


Q, KV = arr(B, T, N, H), arr(B, S, K, H)


def call(q=Q, k=KV, v=KV, **kw):
    return jaxattn.dot_product_attention(q, k, v, implementation=kw.pop("implementation", "reference"), **kw)


CASES = {
    # --- shapes --------------------------------------------------------------------
    "query_rank": (dict(q=arr(B, T, H)),
                   r"query rank: expected 4 dims in BTNH layout .*or 3 for one unbatched example.*"
                   r"got shape \(2, 5, 8\)\. Add the missing axes"),
    "key_rank": (dict(k=arr(B, S, K, H, 1)),
                 r"key rank: expected 4 dims .*got shape \(2, 7, 2, 8, 1\)\. Add the missing axes"),
    "not_an_array": (dict(q=[[1.0]]), r"query: expected an array, got list\. Pass a jax or numpy array"),
    "batch": (dict(k=arr(3, S, K, H), v=arr(3, S, K, H)),
              r"key batch size: expected query's batch size 2, got 3\. Give query and key the same B"),
    "kv_length": (dict(v=arr(B, S - 1, K, H)),
                  r"value shape: expected the key's shape \(2, 7, 2, 8\), got \(2, 6, 2, 8\)\. "
                  r"key and value must be \[B, S, K, H\] with the same S"),
    "head_dim": (dict(k=arr(B, S, K, 4), v=arr(B, S, K, 4)),
                 r"key head dim: expected query's head dim 8, got 4\. Project q and k to the same head dim"),
    "heads_not_multiple": (dict(k=arr(B, S, 3, H), v=arr(B, S, 3, H)),
                           r"head counts: query heads N must be a multiple of key/value heads K .*"
                           r"got N=4, K=3\. Use K dividing N"),
    "zero_head_dim": (dict(q=arr(B, T, N, 0), k=arr(B, S, K, 0), v=arr(B, S, K, 0)),
                      r"query shape: expected heads and head_dim >= 1, got \(2, 5, 4, 0\)\. Only the batch"),
    "mixed_ranks": (dict(k=arr(S, K, H), v=arr(S, K, H)),
                    r"key rank: expected 4 dims .*same rank.*got shape \(7, 2, 8\)"),
    # --- dtypes --------------------------------------------------------------------
    "int_query": (dict(q=arr(B, T, N, H, dtype=np.int32)),
                  r"query: expected a floating dtype \(bfloat16, float16, float32, float64\), got int32\. "
                  r"Cast with"),
    "bool_value": (dict(v=arr(B, S, K, H, dtype=bool)), r"value: expected a floating dtype .*got bool\. Cast"),
    "mixed_dtypes": (dict(k=jnp.zeros((B, S, K, H), jnp.bfloat16), v=jnp.zeros((B, S, K, H), jnp.bfloat16)),
                     r"dtypes: expected query, key and value of one dtype, got float32, bfloat16, "
                     r"bfloat16\. Cast them to one dtype"),
    # --- mask ----------------------------------------------------------------------
    "mask_shape": (dict(mask=np.ones((T, S - 1), bool)),
                   r"mask shape: expected a bool array broadcastable to \[B, N, T, S\] = \[2, 4, 5, 7\], "
                   r"got shape \(5, 6\)\. Give a bool array of shape \[T, S\]"),
    "mask_batch": (dict(mask=np.ones((3, 1, T, S), bool)),
                   r"mask shape: expected .* = \[2, 4, 5, 7\], got shape \(3, 1, 5, 7\)\. Give"),
    "mask_rank": (dict(mask=np.ones((1, B, N, T, S), bool)),
                  r"DenseMask array must have at most 4 dims.*got shape \(1, 2, 4, 5, 7\)\. Reshape it"),
    "mask_not_bool": (dict(mask=np.ones((T, S), np.int32)),
                      r"mask must be boolean \(True = attend\), got dtype int32\. Convert with `mask != 0`"),
    "mask_float_jax": (dict(mask=jnp.ones((T, S))),
                       r"mask must be boolean \(True = attend\), got dtype float32\. A float mask is ambiguous: "
                       r"an additive mask .* is a bias, pass it as .*bias=additive"),
    "seq_lengths_shape": (dict(query_seq_lengths=np.array([3, 4, 5], np.int32)),
                          r"query_seq_lengths: expected shape \[B\] = \[2\], got \(3,\)\. One length"),
    "seq_lengths_float": (dict(key_value_seq_lengths=np.array([3.0, 4.0])),
                          r"key_value_seq_lengths: expected an int32 array of shape \[B\] = \[2\], got float64"),
    "precision": (dict(precision="fast"), r"precision: expected None, a jax.lax.Precision .*got 'fast'\."),
    "dropout_rate": (dict(dropout_rate=1.0, dropout_seed=0), r"dropout_rate must be in the range \[0, 1\), got 1\.0\."),
    "dropout_seed": (dict(dropout_rate=0.5), r"dropout_seed: expected a uint32 seed for attention dropout .*got None\."),
    "mask_type": (dict(mask=[[True]]),
                  r"mask: expected None, a bool array or a jaxattn.masks.Mask, got list\. Build one"),
    "is_causal": (dict(is_causal="yes"), r"is_causal: expected a bool, got 'yes'\. Pass True or False"),
    "block_layout_too_small": (dict(mask=M.BlockSparseMask(np.ones((2, 2), bool), 2, 2)),
                               r"BlockSparseMask layout: expected at least \(3, 4\) blocks of \(2, 2\) "
                               r"to cover T=5, S=7, got \(2, 2\)\. Pass a layout of shape"),
    "segment_q_length": (dict(mask=M.SegmentMask(np.zeros((B, T - 1), np.int32), np.zeros((B, S), np.int32))),
                         r"q_segment_ids must have shape \[B, T\] = \[2, 5\], got \(2, 4\)\. One id per query"),
    "segment_kv_length": (dict(mask=M.SegmentMask(np.zeros((B, T), np.int32), np.zeros((B, S + 1), np.int32))),
                          r"kv_segment_ids must have shape \[B, S\] = \[2, 7\], got \(2, 8\)\. One id per key"),
    "segment_batch": (dict(mask=M.SegmentMask(np.zeros((3, T), np.int32), np.zeros((3, S), np.int32))),
                      r"q_segment_ids must have shape \[B, T\] = \[2, 5\], got \(3, 5\)"),
    # --- window --------------------------------------------------------------------
    "window_negative": (dict(local_window_size=(-1, 0)),
                        r"local_window_size must be non-negative, got \(-1, 0\)\. Pass the number of keys"),
    "window_negative_int": (dict(local_window_size=-3), r"local_window_size must be non-negative, got \(-3, -3\)"),
    "window_float": (dict(local_window_size=2.5),
                     r"local_window_size must be an int or a \(left, right\) pair of ints, got 2\.5\. "
                     r"Example: local_window_size=\(256, 0\)"),
    "window_triple": (dict(local_window_size=(1, 2, 3)), r"pair of ints, got \(1, 2, 3\)\. Example"),
    "window_bool": (dict(local_window_size=True), r"pair of ints, got True\. Example"),
    "window_float_pair": (dict(local_window_size=(1.0, 2)), r"pair of ints, got \(1\.0, 2\)\. Example"),
    # --- implementation, scale, softcap, bias --------------------------------------
    "implementation": (dict(implementation="flash"),
                       r"implementation: expected None, one of \[.*'reference'.*\] or a sequence of them "
                       r"tried in order, got 'flash'\. Leave it None"),
    "implementation_in_list": (dict(implementation=("reference", "flash")),
                               r"implementation: expected .*got \('reference', 'flash'\)\."),
    "scale_nan": (dict(scale=float("nan")), r"scale: expected a finite float, a scalar array .*got nan\. Leave it None"),
    "scale_nan_array": (dict(scale=jnp.float32(np.nan)), r"scale: expected a finite float.*got .*nan"),
    "scale_vector": (dict(scale=np.ones(2, np.float32)), r"scale: expected a finite float, a scalar array"),
    "scale_str": (dict(scale="0.5"), r"scale: expected a finite float, .*got '0\.5'\. Leave"),
    "scale_bool": (dict(scale=True), r"scale: expected a finite float, .*got True"),
    "softcap_zero": (dict(logits_soft_cap=0.0),
                     r"logits_soft_cap: expected a positive finite float or None, got 0\.0\. Typical values"),
    "softcap_negative": (dict(logits_soft_cap=-30), r"logits_soft_cap: expected .*, got -30\. Typical"),
    "softcap_inf": (dict(logits_soft_cap=float("inf")), r"logits_soft_cap: expected .*, got inf\. .*pass None"),
    "softcap_nan": (dict(logits_soft_cap=float("nan")), r"logits_soft_cap: expected .*, got nan\."),
    "softcap_str": (dict(logits_soft_cap="30"), r"logits_soft_cap: expected .*, got '30'\."),
    "bias_shape": (dict(bias=arr(B, N, T, S - 1)),
                   r"bias shape: expected broadcastable to \[B, N, T, S\] = \[2, 4, 5, 7\], got "
                   r"\(2, 4, 5, 6\)\. Use size-1 dims to broadcast"),
    "bias_heads": (dict(bias=arr(1, K, 1, S)), r"bias shape: expected .* got \(1, 2, 1, 7\)\. Use size-1"),
    "bias_int": (dict(bias=arr(T, S, dtype=np.int32)),
                 r"bias: expected a float array broadcastable to \[B, N, T, S\], got int32 \(5, 7\)\. "
                 r"Pass additive logits"),
    "bias_rank": (dict(bias=arr(1, B, N, T, S)), r"bias: expected a float array .*got float32 \(1, 2, 4, 5, 7\)"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("implementation", ["reference", None])
def test_bad_input_raises_value_error(name, implementation):
    kwargs, match = CASES[name]
    kwargs = dict(kwargs)
    if implementation is None and "implementation" not in kwargs:
        kwargs["implementation"] = None  # the dispatcher must not swallow a ValueError
    with pytest.raises(ValueError, match=match):
        call(**kwargs)


@pytest.mark.parametrize("make,match", [
    (lambda: M.SegmentMask(np.zeros(T, np.int32)),
     r"q_segment_ids must have shape \[B, length\], got \(5,\)\. Add a batch axis: ids\[None\]"),
    (lambda: M.SegmentMask(np.zeros((B, T), np.int32), np.zeros((1, 2, S), np.int32)),
     r"kv_segment_ids must have shape \[B, length\], got \(1, 2, 7\)"),
    (lambda: M.SegmentMask(np.zeros((B, T), np.float32)),
     r"q_segment_ids must be integers, got dtype float32\. Use ids.astype\(jnp.int32\)"),
    (lambda: M.SegmentMask(np.zeros((B, T), np.int32), np.zeros((B + 1, S), np.int32)),
     r"must share the batch size, got 2 and 3\. Give both one row of ids per batch element"),
])
def test_segment_mask_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_every_message_says_expected_got_and_fix():
    # A coarse guard on top of the pinned regexes: each message is a sentence that
    # names what came and ends with advice (at least two sentences).
    for name, (kwargs, _) in CASES.items():
        with pytest.raises(ValueError) as info:
            call(**kwargs)
        msg = str(info.value)
        assert "got" in msg and ("expected" in msg or "must" in msg), (name, msg)
        assert msg.count(". ") >= 1, (name, msg)


# ---------------------------------------------------------------------------------
# Dispatch by error kind.
# ---------------------------------------------------------------------------------
def test_not_implemented_falls_back_and_value_error_does_not(monkeypatch):
    calls = []

    def cannot(*args, **kwargs):
        calls.append("cannot")
        raise NotImplementedError("this fake backend serves nothing")

    monkeypatch.setitem(implementations._IMPLEMENTATIONS, "cannot", cannot)
    monkeypatch.setattr(implementations, "default_order", lambda *request, **facts: ("cannot", "reference"))
    q, kv = jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 1, 4))
    out = jaxattn.dot_product_attention(q, kv, kv, is_causal=True)  # falls back to the reference
    assert calls == ["cannot"] and out.shape == (1, 3, 2, 4)
    np.testing.assert_allclose(np.asarray(out), 1.0)
    with pytest.raises(NotImplementedError, match="serves nothing"):  # named: no fallback
        jaxattn.dot_product_attention(q, kv, kv, implementation="cannot")

    def bad(*args, **kwargs):
        raise ValueError("bad input seen by the backend")

    monkeypatch.setitem(implementations._IMPLEMENTATIONS, "cannot", bad)
    with pytest.raises(ValueError, match="seen by the backend"):
        jaxattn.dot_product_attention(q, kv, kv)


def test_gpu_order_falls_back_through_cudnn_to_reference(monkeypatch):
    """On a GPU, a request the kernels decline goes to cuDNN, and one cuDNN declines too
    (float32 here) ends at the reference, never at an error."""
    assert implementations.default_order() == ("reference",)  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    kernels = tuple(n for n in backend_names() if n.startswith("pallas_"))
    assert implementations.default_order() == (*kernels, "cudnn", "reference")
    # masks jax.nn expresses natively, on 16-bit inputs, go to cuDNN first (measured faster)
    for mask in (M.FullMask(), M.CausalMask(), M.CausalMask() & M.LocalMask(2048, 0),
                 M.CausalMask() & M.LocalMask(2048, 64)):
        assert implementations.default_order(mask, jnp.bfloat16) == ("cudnn", *kernels, "reference")
    # a window reaching past the query without causality: cuDNN declines it, so not first
    assert implementations.default_order(M.LocalMask(128, 128), jnp.bfloat16) == (
        *kernels, "cudnn", "reference")
    # ... where the Hopper kernels were measured ahead (head dim 128, >= 1024 queries):
    # causal windows up to 2048 keys back to them first, then cuDNN
    rest = tuple(n for n in kernels if n != "pallas_mosaic_gpu")
    hopper_first = ("pallas_mosaic_gpu", "cudnn", *rest, "reference")
    for mask in (M.CausalMask() & M.LocalMask(128, 0), M.LocalMask(256, 0), M.LocalMask(1024, 0),
                 M.CausalMask() & M.LocalMask(500, 16), M.CausalMask() & M.LocalMask(2048, 0),
                 M.LocalMask(1025, 0)):
        for dtype in (jnp.bfloat16, jnp.float16):
            assert implementations.default_order(mask, dtype, None, 128, q_len=1024) == hopper_first
    # ... and so do causal attention (no window) up to 8192 tokens and the full mask up
    # to 4096, as self-attention (as many keys as queries), where their training step
    # leads cuDNN's or is level with it
    for mask, longest in ((M.CausalMask(), 8192), (M.FullMask(), 4096), (M.FullMask() & M.FullMask(), 4096)):
        for length in (1024, longest):
            assert implementations.default_order(mask, jnp.bfloat16, None, 128, q_len=length,
                                                 kv_len=length) == hopper_first
    # ... the other causal and full masks: the Hopper forward for values, cuDNN for
    # training steps (mosaic_forward_cudnn_training), then cuDNN where the split declines:
    # longer, T != S (or an unknown key length), and causal windows past 2048 keys
    split_first = ("mosaic_forward_cudnn_training", "cudnn", *kernels, "reference")
    for mask, longest in ((M.CausalMask(), 8192), (M.FullMask(), 4096), (M.FullMask() & M.FullMask(), 4096)):
        for q_len, kv_len in ((32768, 32768), (longest + 1, longest + 1), (1024, None), (1024, 2048),
                              (2048, 1024)):
            for dtype in (jnp.bfloat16, jnp.float16):
                assert implementations.default_order(mask, dtype, None, 128, q_len=q_len,
                                                     kv_len=kv_len) == split_first
    for mask in (M.CausalMask() & M.LocalMask(2049, 0), M.LocalMask(4096, 0)):
        for length in (1024, 8192, 32768):
            assert implementations.default_order(mask, jnp.bfloat16, None, 128, q_len=length,
                                                 kv_len=length) == split_first
    # windows up to 2048 keys back go to the Hopper kernels whatever the key length
    for kv_len in (None, 1024, 32768):
        assert implementations.default_order(M.LocalMask(2048, 0), jnp.bfloat16, None, 128, q_len=32768,
                                             kv_len=kv_len) == hopper_first
    # ... not where they were not measured: other head dims (the kernels pad 65-127 to
    # 128), fewer queries (a decoding step's), unknown sizes, or with a bias
    for mask in (M.LocalMask(256, 0), M.CausalMask() & M.LocalMask(2048, 0), M.CausalMask(),
                 M.FullMask()):
        for head_dim, q_len in ((96, 4096), (120, 4096), (64, 4096), (256, 4096), (None, 4096),
                                (128, 1023), (128, 1), (128, None)):
            assert implementations.default_order(mask, jnp.bfloat16, None, head_dim,
                                                 q_len=q_len)[0] == "cudnn"
        assert implementations.default_order(mask, jnp.bfloat16, None, 128, has_bias=True,
                                             q_len=4096)[0] == "cudnn"
    # head dim 256: causal self-attention of 4k-16k tokens takes the split (the Hopper
    # forward measured ahead there); longer or shorter, T != S, windows, the full mask and
    # a bias stay with cuDNN
    for length in (4096, 16384):
        assert implementations.default_order(M.CausalMask(), jnp.bfloat16, None, 256, q_len=length,
                                             kv_len=length) == split_first
    for mask, q_len, kv_len in ((M.CausalMask(), 2048, 2048), (M.CausalMask(), 32768, 32768),
                                (M.CausalMask(), 4096, 8192), (M.CausalMask(), 4096, None),
                                (M.CausalMask() & M.LocalMask(2048, 0), 4096, 4096),
                                (M.FullMask(), 4096, 4096)):
        assert implementations.default_order(mask, jnp.bfloat16, None, 256, q_len=q_len,
                                             kv_len=kv_len)[0] == "cudnn", (mask, q_len, kv_len)
    assert implementations.default_order(M.CausalMask(), jnp.bfloat16, None, 256, has_bias=True,
                                         q_len=4096, kv_len=4096)[0] == "cudnn"
    for mask, dtype, cap in ((M.CausalMask(), jnp.float32, None), (M.CausalMask(), jnp.bfloat16, 30.0),
                             (M.CausalMask() & M.StridedMask(4), jnp.bfloat16, None)):
        assert implementations.default_order(mask, dtype, cap) == (*kernels, "cudnn", "reference")

    def declines(*args, **kwargs):
        raise NotImplementedError("pretend the kernels cannot serve this")
    for name in kernels:
        monkeypatch.setitem(implementations._IMPLEMENTATIONS, name, declines)
    q = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
    bias = jax.random.normal(jax.random.key(1), (1, 2, 6, 6))
    got = jaxattn.dot_product_attention(q, q, q, bias)
    want = jaxattn.dot_product_attention(q, q, q, bias, implementation="reference")
    np.testing.assert_allclose(got, want, atol=1e-6)
