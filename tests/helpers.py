"""Helpers several test files share: lowering for an H100 without a GPU, and importing
the example script as a module."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")


def lower_for_h100(fn, *shapes) -> str:
    """The text of `fn` jitted and lowered for an H100 (CUDA), traced on `shapes`
    (jax.ShapeDtypeStructs): catches Triton and Mosaic GPU lowering errors on a CPU."""
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def load_example(name: str = "long_range_lm"):
    """examples/<name>.py imported as a module (examples are scripts, not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module
