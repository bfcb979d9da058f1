"""ONNX Runtime backend on the CPU execution provider.

The bundle's drift was measured on ONNX Runtime's CPU provider in FP32, so that is what runs,
even where onnxruntime-gpu offers CUDA: another provider is another arithmetic, and it is used
only when asked for by name (``providers``), never picked up silently.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from samedge.errors import BackendUnavailableError


class OnnxRuntimeBackend:
    name = "onnxruntime"
    # Prompts per decoder call the Predictor sends (it splits larger batches): calls of one
    # were never slower here and keep peak memory lowest (docs/performance.md).
    decode_batch = 1

    def __init__(self, path: Path, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime here has no {', '.join(missing)} (it has "
                f"{', '.join(ort.get_available_providers())})",
                hint="install the onnxruntime build that provides it (onnxruntime-gpu for CUDA)")
        self._session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        self._lock = threading.Lock()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: inputs[name] for name in self.input_names}
        with self._lock:  # concurrent runs are legal in ONNX Runtime but each holds its memory
            return dict(zip(self.output_names, self._session.run(None, feed)))
