"""TensorRT backend: a serialized engine run through Polygraphy's runner (name-based I/O).

Polygraphy's ``TrtRunner`` uses TensorRT's name-based tensor API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``), present from TensorRT 8.5 (JetPack 5) through
10.x (JetPack 6/7) and 11, and manages device buffers without torch. The engine's sidecar JSON
(hashed with it in the bundle) records the TensorRT version and GPU it was built for; a mismatch
is refused before deserializing. Not verified on a GPU in this repository: see README.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import tensorrt as trt
from polygraphy.backend.trt import EngineFromBytes, TrtRunner

from samedge.runtime.backends.trt_compat import check_engine_compatibility, gpu_compute_capability


class TensorRtBackend:
    name = "tensorrt"

    def __init__(self, path: Path, threads: int | None = None):
        meta_path = Path(path).with_suffix(".json")
        if meta_path.is_file():
            check_engine_compatibility(json.loads(meta_path.read_text()), trt.__version__,
                                       gpu_compute_capability())
        self._runner = TrtRunner(EngineFromBytes(Path(path).read_bytes()))
        self._runner.activate()
        engine = self._runner.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = [engine.get_tensor_mode(n) for n in names]
        self.input_names = tuple(n for n, m in zip(names, modes) if m == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n, m in zip(names, modes) if m == trt.TensorIOMode.OUTPUT)
        self._lock = threading.Lock()
        if "point_coords" in self.input_names:  # a decoder: never send more prompts than the
            # engine's optimisation profile takes (min, opt, max shapes of profile 0)
            self.decode_batch = int(engine.get_tensor_profile_shape("point_coords", 0)[2][0])

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        with self._lock:  # one execution context and its device buffers: one call at a time
            outputs = self._runner.infer(feed)
            # copy: the runner reuses its host buffers on the next call
            return {name: np.array(outputs[name], copy=True) for name in self.output_names}

    def __del__(self):
        runner = getattr(self, "_runner", None)
        if runner is not None and runner.is_active:
            runner.deactivate()
