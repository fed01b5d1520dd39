"""The kernel backends, by name. Adding a backend is one folder under pallas_kernels/
and one `register_backend` line below.

A backend is registered by the path of the module (or "module:attribute") that holds
it and imported only when first asked for, so importing the registry costs nothing.
A registered backend whose module is not installed is never listed: `backend_names()`
names only backends that can be imported.
"""

from __future__ import annotations

import importlib
import importlib.util

from pallas_kernels.backend import KernelBackend

_PATHS: dict[str, str] = {}
_LOADED: dict[str, KernelBackend] = {}


def register_backend(name: str, path: str) -> None:
    """Make the backend at `path` ("package.module" or "package.module:attribute")
    available as `name`. Registration order is preference order (see jaxattn's
    default implementation order)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"backend name: expected a non-empty string, got {name!r}.")
    _PATHS[name] = path
    _LOADED.pop(name, None)


def _module_exists(path: str) -> bool:
    module = path.split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:   # a parent package is missing
        return False


def backend_names() -> tuple[str, ...]:
    """Registered backends whose module is installed, in preference order."""
    return tuple(name for name, path in _PATHS.items() if _module_exists(path))


def get_backend(name: str) -> KernelBackend:
    """The backend registered as `name`, imported on first use."""
    if name not in _LOADED:
        if name not in backend_names():
            raise ValueError(f"kernel backend: expected one of {list(backend_names())}, got {name!r}. "
                             "Register it with pallas_kernels.registry.register_backend.")
        module, _, attribute = _PATHS[name].partition(":")
        backend = importlib.import_module(module)
        if attribute:
            backend = getattr(backend, attribute)
        if not isinstance(backend, KernelBackend) or backend.name != name:
            missing = [m for m in ("name", "decode", "padded_head_dim", "supports", "default_config",
                                   "forward", "backward") if not hasattr(backend, m)]
            raise TypeError(f"{_PATHS[name]} does not implement the kernel backend protocol as "
                            f"{name!r} (missing {missing}, name {getattr(backend, 'name', None)!r}); "
                            "see pallas_kernels/backend.py.")
        _LOADED[name] = backend
    return _LOADED[name]


# The built-in backends, most preferred first.
register_backend("pallas_mosaic_gpu", "pallas_kernels.mosaic_gpu")   # Hopper; listed once its folder exists
register_backend("pallas_triton", "pallas_kernels.triton")
