"""Shared test set-up. Environment variables must be set before jax is imported."""

import os

# Four simulated CPU devices for the ring-attention / sharding tests that share this
# process; CPU unless the caller chose a platform (the GPU tier sets JAX_PLATFORMS=cuda).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

try:
    # Importing this once up front avoids compiling the first interpret-mode
    # pallas_call twice.
    import jax._src.pallas.mosaic.interpret.interpret_pallas_call  # noqa: F401
except Exception:  # pragma: no cover - private module; absent in other jax versions
    pass


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (jax.default_backend() != 'gpu')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def x64():
    """Enable float64 for the body only; the previous setting is restored on exit."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def enable_x64():
    with x64():
        yield
