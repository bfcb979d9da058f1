"""TensorRT backend: a serialized engine run through Polygraphy's runner (name-based I/O).

Before deserializing, the engine's JSON sidecar (hashed with it in the bundle) is checked against
this device: supported TensorRT (``trt_compat.SUPPORTED``), the version and GPU compute capability
that built it (the CUDA driver's device query, so Jetson, which has no nvidia-smi, is checked
too). A version-compatible engine embeds its lean runtime, which TensorRT runs only when told to
trust the plan (``IRuntime.engine_host_code_allowed``); samedge allows it for those engines only,
after the bundle verified the file's sha256. Polygraphy's ``TrtRunner`` drives TensorRT's
name-based tensor API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) and
manages device buffers through its own ctypes CUDA wrapper: no torch, no pycuda. Feeds larger than
the engine's optimisation profile along its dynamic batch axis are run in slices of its maximum.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import tensorrt as trt
from polygraphy.backend.trt import TrtRunner

from samedge.errors import EngineCompatibilityError
from samedge.runtime.backends.trt_compat import (
    check_engine_compatibility,
    check_supported,
    gpu_compute_capability,
    run_in_batches,
)


def engine_record(path: Path) -> dict | None:
    """The JSON sidecar written beside an engine when it was built (None when absent)."""
    sidecar = Path(path).with_suffix(".json")
    return json.loads(sidecar.read_text()) if sidecar.is_file() else None


class TensorRtBackend:
    name = "tensorrt"

    def __init__(self, path: Path, threads: int | None = None):
        check_supported(trt.__version__)
        record = engine_record(path)
        check_engine_compatibility(record, trt.__version__, gpu_compute_capability())
        if "profile" not in record:
            raise EngineCompatibilityError(
                f"{Path(path).name}'s record has no optimisation profile (an older samedge built "
                "it)", hint="rebuild it on this device: samedge build BUNDLE --backend tensorrt")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        runtime.engine_host_code_allowed = bool(record.get("version_compatible"))
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise EngineCompatibilityError(
                f"TensorRT {trt.__version__} could not deserialize {Path(path).name} (see "
                "TensorRT's log above)", hint="rebuild it on this device: samedge build BUNDLE "
                                               "--backend tensorrt")
        self._profile = record["profile"]
        self._runner = TrtRunner(engine)
        self._runner.activate()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = [engine.get_tensor_mode(n) for n in names]
        self.input_names = tuple(n for n, m in zip(names, modes) if m == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n, m in zip(names, modes) if m == trt.TensorIOMode.OUTPUT)
        self._lock = threading.Lock()
        if "point_coords" in self.input_names:  # a decoder: never send more prompts than the
            # engine's optimisation profile takes (min, opt, max shapes of profile 0)
            self.decode_batch = int(engine.get_tensor_profile_shape("point_coords", 0)[2][0])

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: np.ascontiguousarray(v) for n, v in feed.items()}
        with self._lock:  # one execution context and its device buffers: one call at a time
            outputs = self._runner.infer(feed)
            # copy: the runner reuses its host buffers on the next call
            return {name: np.array(outputs[name], copy=True) for name in self.output_names}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_in_batches(self._infer, {n: inputs[n] for n in self.input_names},
                              self._profile)

    def __del__(self):
        runner = getattr(self, "_runner", None)
        if runner is not None and runner.is_active:
            runner.deactivate()
