"""The Pallas-Triton backend in interpret mode (CPU): the shared kernel suite
(tests/kernel_suite.py) plus what is particular to Triton (its config type, the
kernels it runs for a constant bias).

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
from kernel_suite import InterpretOnlyCases, KernelCases, make_inputs
from pallas_kernels.triton.config import TritonConfig

IMPL = "pallas_triton"


class TestTritonInterpret(KernelCases, InterpretOnlyCases):
    backend = IMPL
    lowered_names = ("jaxattn_flash_forward", "jaxattn_flash_dkdv", "jaxattn_flash_dq")


def test_explicit_config_and_validation():
    q, k, v, _ = make_inputs(1, 40, 40, 2, 2, 16)
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


def test_compiled_kernels_need_a_gpu():
    # supports() declines compiled (non-interpret) kernels on CPU: NotImplementedError,
    # so implementation=None would move on.
    q, k, v, _ = make_inputs(1, 8, 8, 1, 1, 16)
    with pytest.raises(NotImplementedError, match="need a CUDA GPU"):
        pallas_attention(IMPL, q, k, v, None, M.FullMask(), scale=0.25, logits_soft_cap=None,
                         return_residuals=False, interpret=False)


def test_constant_bias_gets_no_gradient_kernel_output():
    # A bias that is not differentiated (symbolic zeros in the custom VJP): the dQ kernel
    # has dQ as its only output, and no [B, N, T, S] dS is written.
    q, k, v, do = make_inputs(1, 40, 40, 2, 2, 16)
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
