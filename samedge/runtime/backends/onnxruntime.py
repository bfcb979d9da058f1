"""ONNX Runtime backend (CPU, or CUDA when onnxruntime-gpu finds a device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class OnnxRuntimeBackend:
    name = "onnxruntime"
    # Prompts per decoder call the Predictor sends (it splits larger batches): calls of one
    # were never slower here and keep peak memory lowest (docs/performance.md).
    decode_batch = 1

    def __init__(self, path: Path, threads: int | None = None):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: inputs[name] for name in self.input_names}
        return dict(zip(self.output_names, self._session.run(None, feed)))
