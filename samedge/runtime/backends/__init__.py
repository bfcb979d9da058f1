"""Inference backends behind one small protocol; each is imported only when asked for.

Every backend's ``run`` may be called from any thread: each backend object runs one call at a
time (a lock), which OpenVINO's and TensorRT's single execution contexts need anyway and which
keeps ONNX Runtime's memory that of one call.
"""

from __future__ import annotations

import os
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

from samedge.errors import BackendUnavailableError, UsageError
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


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> int | None:
    """``threads`` if it is a whole number from 1 to the available cores (None: all of them).

    More threads than cores only oversubscribe (ONNX Runtime with 100000 threads took 16 GB and
    minutes); zero or negative counts mean nothing.
    """
    if threads is None:
        return None
    cores = available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise UsageError(f"threads={threads!r}: this machine lets samedge use 1 to {cores} cores",
                         hint=f"pass a thread count from 1 to {cores}, or leave it unset for all")
    return threads


def open_backend(name: str, path: str | Path, threads: int | None = None,
                 **options) -> Backend:
    """Open one graph file with the named backend; ``options`` are the backend's own (OpenVINO's
    ``inference_precision`` for BF16 variants), passed only when a variant records them."""
    if name not in _BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}",
                                      hint=f"choose one of {', '.join(BACKENDS)}")
    check_threads(threads)
    module_name, class_name, extra = _BACKENDS[name]
    try:
        module = import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} is not installed ({exc})",
            hint=f"pip install 'samedge[{extra}]'",
        ) from exc
    return getattr(module, class_name)(Path(path), threads=threads, **options)


__all__ = ["BACKENDS", "Backend", "available_cores", "check_threads", "installed", "open_backend"]
