"""ring_attention on the meshes users make: jax.make_mesh's default (Explicit axes), with
gradients taken outside jit, as a first try at the API would take them.

On an Explicit mesh a result's type carries the mesh, and JAX cannot build the loss's
cotangent for a `jax.grad` outside `jit` without `jax.set_mesh`. Inputs that carry no
mesh themselves therefore run on the Auto twin of the mesh (same devices, same shards);
inputs already placed on the Explicit mesh keep it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxattn
from jaxattn.parallel.ring import _mesh_for

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")

AXIS = "ctx"


def test_grad_outside_jit_on_make_mesh_default():
    mesh = jax.make_mesh((4,), (AXIS,))  # Explicit axes by default
    assert jax.sharding.AxisType.Explicit in mesh.axis_types
    q, k, v = (jax.random.normal(key, (1, 16, 2, 8)) for key in jax.random.split(jax.random.key(0), 3))

    def grads(attn):  # (out, (dq, dk, dv)) eagerly: outside jit, as the issue was found
        def loss(q, k, v):
            out = attn(q, k, v)
            return jnp.sum(jnp.sin(out)), out
        (_, out), dqkv = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, dqkv

    ring = lambda q, k, v: jaxattn.ring_attention(  # noqa: E731
        q, k, v, mesh=mesh, axis_name=AXIS, is_causal=True, implementation="reference")
    ref = lambda q, k, v: jaxattn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, implementation="reference")
    out, got = grads(ring)
    assert out.sharding.spec[1] == AXIS and len(out.sharding.device_set) == 4
    out_ref, want = grads(ref)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out, *got), (out_ref, *want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-5, err_msg=name)


def test_which_mesh_runs():
    explicit = jax.make_mesh((4,), (AXIS,))
    auto = jax.make_mesh((4,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    x = np.zeros((1, 8, 1, 4), np.float32)
    # Untyped inputs on an Explicit mesh: its Auto twin, same devices in the same order.
    twin = _mesh_for(explicit, x)
    assert twin.axis_types == auto.axis_types and (twin.devices == explicit.devices).all()
    assert _mesh_for(auto, x) is auto
    # Inputs placed on the Explicit mesh, or a mesh context set by the caller: unchanged.
    placed = jax.device_put(x, NamedSharding(explicit, P(None, AXIS)))
    assert _mesh_for(explicit, x, placed) is explicit
    with jax.set_mesh(explicit):
        assert _mesh_for(explicit, x) is explicit
