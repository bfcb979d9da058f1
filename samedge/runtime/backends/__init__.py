"""Inference backends behind one small protocol; each is imported only when asked for."""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

from samedge.errors import BackendUnavailableError
from samedge.runtime.backends.base import Backend

# backend name → (module, class, pip extra)
_BACKENDS = {
    "onnxruntime": ("samedge.runtime.backends.onnxruntime", "OnnxRuntimeBackend", "onnxruntime"),
    "openvino": ("samedge.runtime.backends.openvino", "OpenVinoBackend", "openvino"),
    "tensorrt": ("samedge.runtime.backends.tensorrt", "TensorRtBackend", "tensorrt"),
}
BACKENDS = tuple(_BACKENDS)


def installed(name: str) -> bool:
    """Whether the library behind a backend can be imported here (without importing it)."""
    return name in _BACKENDS and find_spec(name) is not None


def open_backend(name: str, path: str | Path, threads: int | None = None,
                 **options) -> Backend:
    """Open one graph file with the named backend; ``options`` are the backend's own (OpenVINO's
    ``inference_precision`` for BF16 variants), passed only when a variant records them."""
    if name not in _BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    module_name, class_name, extra = _BACKENDS[name]
    try:
        module = import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} is not installed ({exc})",
            hint=f"pip install 'samedge[{extra}]'",
        ) from exc
    return getattr(module, class_name)(Path(path), threads=threads, **options)


__all__ = ["BACKENDS", "Backend", "installed", "open_backend"]
